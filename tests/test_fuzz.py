"""The live service, fuzzed against its own OpenAPI description, and its body parsing."""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import OPENAPI
from harness.clients import add_active_job
from harness.servers import Gunicorn, free_port
from tests.helpers import API_TOKEN, JOB_TOKEN, bearer, snapshot

# The stream of an active job's events stays open while the job runs: its own tests
# (tests/test_events.py) read it as a browser would.
schema = schemathesis.openapi.from_path(OPENAPI).exclude(operation_id="jobEvents")


@pytest.fixture(scope="module")
def live(redis_url, tmp_path_factory):
    """Serve the app under gunicorn with its production config; yield its base URL."""
    bind = f"127.0.0.1:{free_port()}"
    env = {"REDIS_URL": redis_url, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "1"}
    with Gunicorn(tmp_path_factory.mktemp("fuzz"), env, bind=bind):
        yield f"http://{bind}"


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_live_service_keeps_its_contract(case, live, r):
    # The description's examples name queue "orders", job "1": keep it active, so that
    # the fuzzing reaches the 200s as well as every refusal.
    add_active_job(r, "orders", "1", JOB_TOKEN)
    token = JOB_TOKEN if case.method == "POST" and "/events/" not in case.path else API_TOKEN
    case.call_and_validate(base_url=live, headers=bearer(token))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    json_values.map(lambda value: repr(value).encode()),  # Python, not JSON: NaN, inf, '
    json_values.map(lambda value: json.dumps(value).encode()),
)
content_types = st.sampled_from(
    [None, "application/json", "application/json; charset=utf-8", "text/plain", "text/csv"]
)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def post_to_an_active_job(client, r, route: str, body: bytes, content_type: str | None):
    """Lay out a fresh active job, post to it; return (response, Redis before)."""
    r.flushdb()
    add_active_job(r, "orders", "1", JOB_TOKEN)
    before = snapshot(r)
    response = client.post(
        f"/queues/orders/jobs/1/{route}",
        data=body,
        content_type=content_type,
        headers=bearer(JOB_TOKEN),
    )
    return response, before


@FUZZ
@given(body=bodies, content_type=content_types)
def test_any_progress_body_is_stored_or_clearly_refused(client, r, body, content_type):
    response, before = post_to_an_active_job(client, r, "progress", body, content_type)
    if response.status_code == 200:
        # Equal as JavaScript reads them: every number a double.
        stored = r.hget("bull:orders:1", "progress")
        assert json.loads(stored, parse_int=float) == json.loads(body, parse_int=float)
        assert r.xlen("bull:orders:events") == 1
    else:
        assert response.status_code == 400
        assert response.get_data(as_text=True).startswith("the progress ")
        assert snapshot(r) == before


@FUZZ
@given(body=bodies, content_type=content_types)
def test_any_log_body_is_stored_or_clearly_refused(client, r, body, content_type):
    response, before = post_to_an_active_job(client, r, "logs", body, content_type)
    if response.status_code == 200:
        stored = r.lrange("bull:orders:1:logs", 0, -1)
        is_json = content_type is not None and content_type.startswith("application/json")
        assert stored == [json.loads(body) if is_json else body.decode("utf-8")]
    else:
        assert response.status_code == 400
        reason = response.get_data(as_text=True)
        assert reason.startswith(("the log line ", "a JSON log line must be a JSON string"))
        assert snapshot(r) == before
