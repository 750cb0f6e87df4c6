"""Requests the service refuses before touching a job: names, routes, methods, sizes."""

import io
import itertools

import pytest
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map

from tests.helpers import API_TOKEN, JOB_TOKEN, bearer, snapshot

ROUTES = [
    ("POST", "progress", JOB_TOKEN),
    ("POST", "logs", JOB_TOKEN),
    ("GET", "logs", API_TOKEN),
]


@pytest.mark.parametrize(("method", "route", "token"), ROUTES)
@pytest.mark.parametrize(
    ("queue", "reason"),
    [
        ("ab", "the queue name must be 3 to 100 characters long"),
        ("q" * 101, "the queue name must be 3 to 100 characters long"),
        ("my:queue", "the queue name must not contain ':'"),
        ("%3Aqueue", "the queue name must not contain ':'"),
    ],
)
def test_bad_queue_name_is_a_400(client, r, job, method, route, token, queue, reason):
    job(queue=queue.replace("%3A", ":"))
    before = snapshot(r)
    response = client.open(
        f"/queues/{queue}/jobs/1/{route}", method=method, data=b"1", headers=bearer(token)
    )
    assert (response.status_code, response.get_data(as_text=True)) == (400, reason)
    assert snapshot(r) == before


def test_queue_name_lengths_are_configurable(make_app, r, job):
    key = job(queue="q")
    app = make_app(MIN_QUEUE_NAME_LENGTH=1)
    response = app.test_client().post(
        "/queues/q/jobs/1/progress", data=b"1", headers=bearer(JOB_TOKEN)
    )
    assert response.status_code == 200
    assert r.hget(key, "progress") == "1"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/queues",
        "/queues/orders/jobs/1",
        "/queues/orders/jobs/1/other",
        "/queues/orders/jobs//progress",
        "/queues/orders/progress",
    ],
)
def test_unknown_route_is_a_404(client, path):
    response = client.post(path, data=b"1", headers=bearer(JOB_TOKEN))
    assert response.status_code == 404
    assert response.mimetype == "text/plain"
    assert b"<" not in response.data  # plain text, not an HTML page


def test_routes_match_as_werkzeug_matches_them(app):
    """The shortcut for job routes finds the rule and values werkzeug's matcher finds,
    or fails as it fails, for every path and method."""
    plain = Map([rule.empty() for rule in app.url_map.iter_rules()])
    tails = [
        "progress",
        "logs",
        "events",
        "watch",
        "logs.txt",
        "watch.css",
        "watch/session",
        "events/token",
        "token",
        "session",
        "other",
        "logs/",
        "",
    ]
    job_ids = ["1", "a/b", "a//b", "/1", "", "jobs", "x/logs", "a\nb", "\n", "a/events"]
    paths = [
        f"/queues/{queue}/jobs/{job_id}/{tail}"
        for queue, job_id, tail in itertools.product(["orders", ""], job_ids, tails)
    ]
    paths += [
        "/queues/orders/jobs",
        "/queues/orders/job/1/logs",
        "/queues/o/r/jobs/1/logs",
        "/queues//orders/jobs/1/logs",
        "/queues/orders//jobs/1/logs",
        "/healthz",
        "/queues/orders/jobs/1/logs\n",
    ]

    def outcome(url_map, path, method):
        try:
            rule, values = url_map.bind("localhost").match(path, method, return_rule=True)
        except HTTPException as error:
            allowed = sorted(getattr(error, "valid_methods", None) or [])  # from a set
            return type(error), allowed, getattr(error, "new_url", None)
        return rule.endpoint, values

    for path, method in itertools.product(paths, ["GET", "HEAD", "POST", "PUT", "OPTIONS"]):
        assert outcome(app.url_map, path, method) == outcome(plain, path, method), (path, method)


@pytest.mark.parametrize(
    ("method", "route", "allowed"),
    [
        ("DELETE", "progress", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("PUT", "progress", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("POST", "events", {"GET", "HEAD", "OPTIONS"}),
        ("DELETE", "logs", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("PATCH", "logs", {"GET", "HEAD", "POST", "OPTIONS"}),
    ],
)
def test_wrong_method_is_a_405_with_allow(client, r, job, method, route, allowed):
    job()
    before = snapshot(r)
    response = client.open(
        f"/queues/orders/jobs/1/{route}", method=method, headers=bearer(JOB_TOKEN)
    )
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == allowed
    assert snapshot(r) == before


@pytest.mark.parametrize("route", ["progress", "logs"])
def test_oversized_body_is_a_413_and_writes_nothing(make_app, r, job, route):
    job()
    client = make_app(MAX_BODY_BYTES=64).test_client()
    before = snapshot(r)
    url = f"/queues/orders/jobs/1/{route}"
    response = client.post(url, data=b"1" * 65, headers=bearer(JOB_TOKEN))
    assert response.status_code == 413
    assert response.data == b"the body is larger than 64 bytes (MAX_BODY_BYTES)"
    # Without a Content-Length (chunked), reading stops at the limit too.
    stream = io.BytesIO(b'"' + b"x" * 100 + b'"')
    response = client.post(url, input_stream=stream, headers=bearer(JOB_TOKEN))
    assert response.status_code == 413
    assert snapshot(r) == before
    # Exactly the limit is accepted.
    response = client.post(url, data=b"7" * 64, headers=bearer(JOB_TOKEN))
    assert response.status_code == 200


def test_default_body_limit_is_one_mebibyte(make_app, r, job):
    job()
    client = make_app(MAX_LOG_LINE_BYTES=2 * 1024 * 1024).test_client()
    line = b"x" * (1024 * 1024)
    assert (
        client.post("/queues/orders/jobs/1/logs", data=line, headers=bearer(JOB_TOKEN)).status_code
        == 200
    )
    assert r.lindex("bull:orders:1:logs", 0) == line.decode()
    response = client.post(
        "/queues/orders/jobs/1/logs", data=line + b"x", headers=bearer(JOB_TOKEN)
    )
    assert response.status_code == 413
    assert r.llen("bull:orders:1:logs") == 1


@pytest.mark.parametrize(
    ("route", "fits", "reason"),
    [
        (
            "progress",
            b'"' + b"x" * (64 * 1024 - 2) + b'"',
            "the progress is larger than 65536 bytes",
        ),
        ("logs", b"x" * (64 * 1024), "the log line is longer than 65536 bytes"),
    ],
)
def test_progress_and_log_lines_are_capped_at_64_kib_by_default(
    client, r, job, route, fits, reason
):
    key = job()
    url = f"/queues/orders/jobs/1/{route}"
    assert client.post(url, data=fits, headers=bearer(JOB_TOKEN)).status_code == 200
    before = snapshot(r)
    too_large = fits[:-1] + b"xx" if route == "logs" else fits[:-1] + b'x"'
    response = client.post(url, data=too_large, headers=bearer(JOB_TOKEN))
    assert (response.status_code, response.get_data(as_text=True).split(" (")[0]) == (413, reason)
    assert snapshot(r) == before
    # Refused on its size, before it is parsed or its token is checked.
    response = client.post(url, data=b"[" * 65537, headers=bearer("not-the-token"))
    assert response.status_code == 413
    assert snapshot(r) == before
    assert r.exists(key)


def test_a_progress_that_grows_when_written_out_is_capped_too(make_app, r, job):
    job()
    client = make_app(MAX_PROGRESS_BYTES=16).test_client()
    before = snapshot(r)
    response = client.post(
        "/queues/orders/jobs/1/progress", data=b"[1e20]", headers=bearer(JOB_TOKEN)
    )
    assert response.status_code == 413
    assert response.data == b"the progress is larger than 16 bytes (MAX_PROGRESS_BYTES)"
    assert snapshot(r) == before


@pytest.mark.parametrize(
    ("method", "path", "token", "key"),
    [
        ("POST", "/queues/orders/jobs/1/progress", JOB_TOKEN, "bull:orders:events"),
        ("POST", "/queues/orders/jobs/1/progress", JOB_TOKEN, "bull:orders:meta"),
        ("POST", "/queues/orders/jobs/1/logs", JOB_TOKEN, "bull:orders:1:logs"),
        ("GET", "/queues/orders/jobs/1/logs", API_TOKEN, "bull:orders:1:logs"),
        ("GET", "/queues/orders/jobs/1/events", API_TOKEN, "bull:orders:events"),
        ("GET", "/queues/orders/jobs/1/events", API_TOKEN, "bull:orders:completed"),
    ],
)
def test_a_key_of_another_type_is_a_409_naming_it(client, job, r, caplog, method, path, token, key):
    job()
    r.delete(key)
    r.set(key, "not what BullMQ writes here")
    before = snapshot(r)
    response = client.open(path, method=method, data=b"1", headers=bearer(token))
    assert (response.status_code, response.text) == (
        409,
        f"{key} holds another type than BullMQ's layout gives it: mend or delete it",
    )
    assert snapshot(r) == before
    assert "Traceback" not in caplog.text
    assert f"{key} is not in BullMQ's layout" in caplog.text
