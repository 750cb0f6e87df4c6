"""GET /queues/<queue>/jobs/<id>/logs: a page of a job's logs, for an API token or a
watch token of the job."""

import json
import time

import pytest

from bullmq_http.tokens import watch_token
from tests.helpers import API_TOKEN, JOB_TOKEN, NOT_AN_API_TOKEN, WATCH_SECRET, bearer, snapshot

URL = "/queues/orders/jobs/1/logs"
LINES = [f"line {n}" for n in range(25)]


@pytest.fixture
def logged(job, r):
    job()
    r.rpush("bull:orders:1:logs", *LINES)


def get(client, query="", token=API_TOKEN):
    return client.get(f"{URL}{query}", headers=bearer(token))


@pytest.mark.parametrize(
    ("query", "logs"),
    [
        ("", LINES[:10]),
        ("?start=0&length=10", LINES[:10]),
        ("?start=10", LINES[10:20]),
        ("?start=20&length=10", LINES[20:]),
        ("?start=24&length=1", ["line 24"]),
        ("?start=25", []),
        ("?start=1000", []),
        ("?length=100", LINES),
        ("?order=asc&start=3&length=2", ["line 3", "line 4"]),
        ("?order=desc", LINES[::-1][:10]),
        ("?order=desc&start=10&length=10", LINES[::-1][10:20]),
        ("?order=desc&start=20&length=10", LINES[::-1][20:]),
        ("?order=desc&start=25", []),
        (f"?start={2**53 - 1}", []),
        (f"?order=desc&start={2**53 - 1}&length=100", []),
    ],
)
def test_pages(client, r, logged, query, logs):
    before = snapshot(r)
    response = get(client, query)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"count": 25, "logs": logs}
    assert snapshot(r) == before


def test_non_ascii_lines_come_back_as_utf8(client, r, job):
    job()
    r.rpush("bull:orders:1:logs", "Größe 東京 ✓", b"\xff broken")
    response = get(client)
    assert json.loads(response.data.decode("utf-8")) == {
        "count": 2,
        "logs": ["Größe 東京 ✓", "\ufffd broken"],
    }
    assert "Größe".encode() in response.data


def test_a_job_without_logs_has_none(client, job):
    job()
    response = get(client)
    assert (response.status_code, response.get_json()) == (200, {"count": 0, "logs": []})


def test_a_job_that_does_not_exist_is_a_404(client, r):
    r.rpush("bull:orders:1:logs", "orphan line")  # logs left behind by a removed job
    response = get(client)
    assert response.status_code == 404
    assert response.data == b"job '1' not found in queue 'orders'"


def test_a_queue_level_key_is_not_a_job(client, r, job):
    job()
    r.xadd("bull:orders:events", {"event": "x"})
    response = client.get("/queues/orders/jobs/events/logs", headers=bearer(API_TOKEN))
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("?start=-1", "start must be a whole number from 0 to 9007199254740991"),
        ("?start=abc", "start must be a whole number from 0 to 9007199254740991"),
        ("?start=", "start must be a whole number from 0 to 9007199254740991"),
        ("?start=1.5", "start must be a whole number from 0 to 9007199254740991"),
        ("?start=%C2%B2", "start must be a whole number from 0 to 9007199254740991"),
        ("?start=9007199254740992", "start must be a whole number from 0 to 9007199254740991"),
        ("?start=" + "9" * 40, "start must be a whole number from 0 to 9007199254740991"),
        ("?length=0", "length must be a whole number from 1 to 100"),
        ("?length=101", "length must be a whole number from 1 to 100"),
        ("?length=+5", "length must be a whole number from 1 to 100"),
        ("?order=newest", "order must be asc or desc"),
        ("?order=DESC", "order must be asc or desc"),
        ("?strat=20", "unknown query parameter 'strat': use start, length, order and token"),
        (
            "?start=0&_=1700000000",
            "unknown query parameter '_': use start, length, order and token",
        ),
    ],
)
def test_bad_parameters_are_a_400(client, r, logged, query, reason):
    before = snapshot(r)
    response = get(client, query)
    assert (response.status_code, response.get_data(as_text=True)) == (400, reason)
    assert snapshot(r) == before


def test_job_token_is_not_an_api_token(client, logged):
    response = get(client, token=JOB_TOKEN)
    assert response.status_code == 401
    assert response.data == NOT_AN_API_TOKEN.encode()


@pytest.mark.parametrize(
    ("query", "logs"),
    [
        ("?length=100", ["a" * 40, "b" * 40]),  # the third would pass 100 bytes
        ("?order=desc&length=100", ["d" * 10, "c" * 40, "b" * 40]),
        ("?start=2&length=100", ["c" * 40, "d" * 10]),
        ("?order=desc&start=3", ["a" * 40]),
    ],
)
def test_a_page_holds_whole_lines_up_to_max_page_bytes(make_app, r, job, query, logs):
    job()
    r.rpush("bull:orders:1:logs", "a" * 40, "b" * 40, "c" * 40, "d" * 10)
    response = get(make_app(MAX_PAGE_BYTES=100).test_client(), query)
    assert response.get_json() == {"count": 4, "logs": logs}


def test_a_line_larger_than_a_page_is_still_returned_whole(make_app, r, job):
    job()
    r.rpush("bull:orders:1:logs", "x" * 500, "y")
    response = get(make_app(MAX_PAGE_BYTES=100).test_client())
    assert response.get_json() == {"count": 2, "logs": ["x" * 500]}


def test_a_page_holds_at_most_the_documented_1_mib_by_default(make_app, r, job):
    """MAX_PAGE_BYTES unset: 1,048,576 bytes of whole lines, as docs/operations.md's
    table says: five lines of 200 KiB, not six."""
    job()
    lines = [chr(ord("a") + n) * 200 * 1024 for n in range(12)]
    r.rpush("bull:orders:1:logs", *lines)
    response = get(make_app().test_client())
    assert response.get_json() == {"count": 12, "logs": lines[:5]}


@pytest.fixture
def out_of_memory(r):
    """Make Redis refuse writes as at maxmemory, for the length of a test."""
    r.config_set("maxmemory", 1)
    yield
    r.config_set("maxmemory", 0)


def test_logs_can_be_read_while_redis_refuses_writes_for_memory(client, r, logged, out_of_memory):
    response = get(client, "?start=20")
    assert (response.status_code, response.get_json()) == (200, {"count": 25, "logs": LINES[20:]})
    response = client.post(URL, data=b"one more", headers=bearer(JOB_TOKEN))
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    assert r.llen("bull:orders:1:logs") == 25


def test_a_watch_token_and_the_pages_session_read_pages_of_their_job_only(make_app, r, job):
    """The watch page reads earlier lines with what opened it: its link's token, or the
    session cookie it traded the token for; neither reads another job's."""
    job()
    job(job_id="2")
    r.rpush("bull:orders:1:logs", *LINES)
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    token = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) + 300)
    page = client.get(f"{URL}?start=5&length=3&token={token}")
    assert page.get_json() == {"count": len(LINES), "logs": LINES[5:8]}
    assert client.post("/queues/orders/jobs/1/watch/session", data=token).status_code == 200
    assert client.get(f"{URL}?start=0&length=2").get_json() == {
        "count": len(LINES), "logs": LINES[:2]
    }  # fmt: skip
    other = client.get(f"/queues/orders/jobs/2/logs?token={token}")
    assert (other.status_code, other.text) == (401, "the watch token is not valid for this job")
