"""POST /queues/<queue>/jobs/<id>/progress: what a worker sees and what Redis holds."""

import pytest

from tests.helpers import API_TOKEN, JOB_TOKEN, NOT_AN_API_TOKEN, bearer, post, snapshot

URL = "/queues/orders/jobs/1/progress"


@pytest.mark.parametrize(
    ("body", "stored"),
    [
        (b"42", "42"),
        (b"12.5", "12.5"),
        (b"-0.25", "-0.25"),
        (b"1.0", "1"),  # JSON.stringify(1.0) is "1"
        (b"1e2", "100"),
        (b"1e21", "1e+21"),
        # Every JSON number is a double to JavaScript, large integers too.
        (b"123456789012345678901234567890", "1.2345678901234568e+29"),
        (b"9007199254740993", "9007199254740992"),
        (b"1e-05", "0.00001"),
        (b"1e-7", "1e-7"),
        (b'{"b": 1, "10": 2, "2": 3}', '{"2":3,"10":2,"b":1}'),
        (b'"halfway"', '"halfway"'),
        (b"true", "true"),
        (b"null", "null"),
        (b"[1, 2, 3]", "[1,2,3]"),
        (b' { "step" : 3 , "of" : 10 } ', '{"step":3,"of":10}'),
        ('{"msg": "Größe 東京 ✓"}'.encode(), '{"msg":"Größe 東京 ✓"}'),
        (b'{"msg": "\\u00e9\\n"}', '{"msg":"é\\n"}'),
        (b'"\\ud83d\\ude00"', '"\U0001f600"'),
        # A lone surrogate is not UTF-8: written as an escape, as JSON.stringify does.
        (b'"\\ud800"', '"\\ud800"'),
    ],
)
def test_progress_is_stored_as_bullmq_stores_it(client, r, job, body, stored):
    key = job()
    response = post(client, URL, body)
    assert (response.status_code, response.data) == (200, b"OK")
    assert response.mimetype == "text/plain"
    assert r.hget(key, "progress") == stored
    [(_, event)] = r.xrange("bull:orders:events")
    assert event == {"event": "progress", "jobId": "1", "data": stored}
    assert r.hgetall("bull:orders:meta") == {"opts.maxLenEvents": "10000"}


def test_content_type_does_not_matter(client, r, job):
    key = job()
    for content_type in ("application/json", "text/plain", None):
        assert post(client, URL, b"7", content_type=content_type).status_code == 200
        assert r.hget(key, "progress") == "7"
    assert r.xlen("bull:orders:events") == 3


def test_each_update_adds_an_event_and_keeps_the_latest(client, r, job):
    key = job()
    for percent in (10, 50, 100):
        assert post(client, URL, str(percent)).status_code == 200
    assert r.hget(key, "progress") == "100"
    events = [fields["data"] for _, fields in r.xrange("bull:orders:events")]
    assert events == ["10", "50", "100"]


def test_event_stream_is_capped_by_the_queues_maxlen(client, r, job):
    key = job()
    r.hset("bull:orders:meta", "opts.maxLenEvents", 5)
    r.xadd("bull:orders:events", {"event": "old"}, id="1-1")
    for n in range(200):
        r.xadd("bull:orders:events", {"event": "old"}, id=f"2-{n}")
    assert post(client, URL, b"1").status_code == 200
    assert r.hget(key, "progress") == "1"
    assert r.hget("bull:orders:meta", "opts.maxLenEvents") == "5"
    # MAXLEN ~ trims whole macro nodes only, as BullMQ's own script does.
    assert r.xlen("bull:orders:events") < 201
    assert r.xrevrange("bull:orders:events", count=1)[0][1]["data"] == "1"


def test_job_ids_may_contain_colons_and_slashes(client, r, job):
    key = job(job_id="repeat:a1b2:1700000000000")
    response = post(client, "/queues/orders/jobs/repeat:a1b2:1700000000000/progress", b"5")
    assert response.status_code == 200
    assert r.hget(key, "progress") == "5"
    key = job(job_id="tenant/7")
    response = post(client, "/queues/orders/jobs/tenant%2F7/progress", b"6")
    assert response.status_code == 200
    assert r.hget(key, "progress") == "6"


def test_queue_prefix_is_configurable(make_app, r, job):
    key = job(prefix="{jobs}")
    client = make_app(QUEUE_PREFIX="{jobs}").test_client()
    assert post(client, URL, b"3").status_code == 200
    assert r.hget(key, "progress") == "3"
    assert r.xlen("{jobs}:orders:events") == 1
    assert not r.exists("bull:orders:events")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "the progress must be valid JSON (Expecting value"),
        (b"   ", "the progress must be valid JSON (Expecting value"),
        (b"{", "the progress must be valid JSON (Expecting property name"),
        (b"42 43", "the progress must be valid JSON (Extra data"),
        (b"'single'", "the progress must be valid JSON"),
        (b"NaN", "the progress must be valid JSON (NaN is not JSON)"),
        (b"-Infinity", "the progress must be valid JSON (-Infinity is not JSON)"),
        (b'{"p": Infinity}', "the progress must be valid JSON (Infinity is not JSON)"),
        (b"1e400", "the progress must be valid JSON (the number 1e400 is too large)"),
        (b"-1e309", "the progress must be valid JSON (the number -1e309 is too large)"),
        (b"1" * 400, "the progress must be valid JSON (the number 1111"),
        (b"[" * 50_000, "the progress is nested too deeply to be read as JSON"),
        (b"\xff\xfe", "the progress is not valid UTF-8"),
        (b'"caf\xe9"', "the progress is not valid UTF-8"),
        ("\ufeff42".encode(), "the progress must be valid JSON (Unexpected UTF-8 BOM"),
    ],
)
def test_bad_progress_is_a_400_and_writes_nothing(client, r, job, body, reason):
    job()
    before = snapshot(r)
    response = post(client, URL, body)
    assert response.status_code == 400
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True).startswith(reason)
    assert snapshot(r) == before


def test_progress_of_a_job_whose_hash_is_gone_is_a_404(client, r, job):
    key = job()
    r.delete(key)
    before = snapshot(r)
    response = post(client, URL, b"1")
    assert response.status_code == 404
    assert response.data == b"job '1' not found in queue 'orders'"
    assert snapshot(r) == before


def test_api_token_is_not_a_job_token(client, r, job):
    job()
    before = snapshot(r)
    response = post(client, URL, b"1", token=API_TOKEN)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert snapshot(r) == before


# ------------------------------------------------------------------ GET progress


def test_progress_is_0_until_set_then_as_stored(client, job):
    job()
    path = "/queues/orders/jobs/1/progress"
    response = client.get(path, headers=bearer(API_TOKEN))
    assert (response.status_code, response.mimetype, response.data) == (
        200, "application/json", b"0"
    )  # fmt: skip
    client.post(path, data=b'{"step": 2, "of": 1e3}', headers=bearer(JOB_TOKEN))
    response = client.get(path, headers=bearer(API_TOKEN))
    assert (response.status_code, response.data) == (200, b'{"step":2,"of":1000}')


@pytest.mark.parametrize(
    ("path", "headers", "status", "message"),
    [
        ("/queues/orders/jobs/2/progress", bearer(API_TOKEN), 404,
         "job '2' not found in queue 'orders'"),
        ("/queues/orders/jobs/1/progress", {}, 401,
         "send the token as 'Authorization: Bearer <token>'"),
        ("/queues/orders/jobs/1/progress", bearer(JOB_TOKEN), 401, NOT_AN_API_TOKEN),
        ("/queues/orders/jobs/1/progress?x=1", bearer(API_TOKEN), 400,
         "unknown query parameter 'x': this route takes none"),
    ],
)  # fmt: skip
def test_progress_refusals(client, job, r, path, headers, status, message):
    job()
    response = client.get(path, headers=headers)
    assert (response.status_code, response.text) == (status, message)
