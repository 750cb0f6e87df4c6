"""POST /queues/<queue>/jobs/<id>/logs: one line appended, as BullMQ's Job.log does."""

import datetime
import re

import pytest

from tests.helpers import post, snapshot

URL = "/queues/orders/jobs/1/logs"


@pytest.mark.parametrize(
    ("body", "content_type", "line"),
    [
        (b"plain line", None, "plain line"),
        (b"plain line", "text/plain", "plain line"),
        (b"plain line", "text/plain; charset=utf-8", "plain line"),
        (b"a=1&b=2", "application/x-www-form-urlencoded", "a=1&b=2"),  # curl -d
        (b"  spaced\tline\n", "text/plain", "  spaced\tline\n"),
        ("Größe 東京 ✓".encode(), "text/plain", "Größe 東京 ✓"),
        (b'"json line"', "text/plain", '"json line"'),  # not JSON: the raw body
        (b'"json line"', "application/json", "json line"),
        (b'"multi\\nline \\u00e9"', "application/json", "multi\nline é"),
        (b' "padded" ', "application/json; charset=utf-8", "padded"),
        (b'"ld"', "application/ld+json", "ld"),
    ],
)
def test_line_is_appended(client, r, job, body, content_type, line):
    job()
    response = post(client, URL, body, content_type)
    assert (response.status_code, response.data) == (200, b"OK")
    assert r.lrange("bull:orders:1:logs", 0, -1) == [line]


def test_lines_keep_their_order(client, r, job):
    job()
    for n in range(5):
        assert post(client, URL, f"line {n}".encode()).status_code == 200
    assert r.lrange("bull:orders:1:logs", 0, -1) == [f"line {n}" for n in range(5)]


def test_keep_logs_option_keeps_the_newest_lines(client, r, job):
    job(opts={"kl": 3})
    for n in range(5):
        assert post(client, URL, f"line {n}".encode()).status_code == 200
    assert r.lrange("bull:orders:1:logs", 0, -1) == ["line 2", "line 3", "line 4"]


@pytest.mark.parametrize("opts", [{}, {"kl": 0}, {"kl": "x"}, {"kl": None}, {"other": 1}])
def test_no_usable_keep_logs_keeps_every_line(client, r, job, opts):
    job(opts=opts)
    for n in range(4):
        assert post(client, URL, f"line {n}".encode()).status_code == 200
    assert r.llen("bull:orders:1:logs") == 4


def test_unreadable_opts_keep_every_line(client, r, job):
    key = job()
    r.hset(key, "opts", "not json")
    assert post(client, URL, b"one").status_code == 200
    assert post(client, URL, b"two").status_code == 200
    assert r.lrange("bull:orders:1:logs", 0, -1) == ["one", "two"]


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"", None, "the log line is empty"),
        (b"", "text/plain", "the log line is empty"),
        (b'""', "application/json", "the log line is empty"),
        (b"\xc3\x28", "text/plain", "the log line is not valid UTF-8"),
        (b"\xc3\x28", "application/json", "the log line is not valid UTF-8"),
        (b"not json", "application/json", "the log line must be valid JSON (Expecting value"),
        (b"42", "application/json", 'a JSON log line must be a JSON string, like "a line"'),
        (b'["a"]', "application/json", 'a JSON log line must be a JSON string, like "a line"'),
        (b'{"a": 1}', "application/json", 'a JSON log line must be a JSON string, like "a'),
        (b"null", "application/json", 'a JSON log line must be a JSON string, like "a line"'),
        (b'"\\udc80"', "application/json", "the log line holds an unpaired UTF-16 surrogate"),
    ],
)
def test_bad_line_is_a_400_and_writes_nothing(client, r, job, body, content_type, reason):
    job()
    before = snapshot(r)
    response = post(client, URL, body, content_type)
    assert response.status_code == 400
    assert response.get_data(as_text=True).startswith(reason)
    assert snapshot(r) == before


def test_log_of_a_job_whose_hash_is_gone_is_a_404(client, r, job):
    key = job()
    r.delete(key)
    before = snapshot(r)
    response = post(client, URL, b"late line")
    assert response.status_code == 404
    assert response.data == b"job '1' not found in queue 'orders'"
    assert snapshot(r) == before


@pytest.mark.parametrize(
    ("cap", "opts", "kept"),
    [
        (3, {}, ["line 2", "line 3", "line 4"]),
        (3, {"kl": 2}, ["line 3", "line 4"]),  # the job's own keepLogs is smaller
        (2, {"kl": 4}, ["line 3", "line 4"]),  # the server's cap is smaller
        (10, {}, [f"line {n}" for n in range(5)]),
    ],
)
def test_max_logs_per_job_caps_every_job(make_app, r, job, cap, opts, kept):
    job(opts=opts)
    client = make_app(MAX_LOGS_PER_JOB=cap).test_client()
    for n in range(5):
        assert post(client, URL, f"line {n}".encode()).status_code == 200
    assert r.lrange("bull:orders:1:logs", 0, -1) == kept


def test_max_log_line_bytes_refuses_longer_lines(make_app, r, job):
    job()
    client = make_app(MAX_LOG_LINE_BYTES=8).test_client()
    assert post(client, URL, b"12345678").status_code == 200
    assert post(client, URL, '"1234567é"'.encode(), "application/json").status_code == 413
    before = snapshot(r)
    response = post(client, URL, b"123456789")
    assert response.status_code == 413
    assert response.data == b"the log line is longer than 8 bytes (MAX_LOG_LINE_BYTES)"
    assert snapshot(r) == before
    assert r.lrange("bull:orders:1:logs", 0, -1) == ["12345678"]


def test_lines_are_stored_after_the_time_they_came_when_the_operator_asks(make_app, r, job):
    """LOG_LINE_TIMESTAMPS=1: ISO 8601 in UTC to the millisecond, a space, the line, all
    one plain string as every BullMQ reader reads it; off by default."""
    job()
    assert post(make_app().test_client(), URL, b"as sent").status_code == 200
    client = make_app(LOG_LINE_TIMESTAMPS=True).test_client()
    before = datetime.datetime.now(datetime.UTC)
    assert post(client, URL, b"charged card").status_code == 200
    assert post(client, URL, b'"as JSON"', "application/json").status_code == 200
    after = datetime.datetime.now(datetime.UTC)
    plain, stamped, as_json = r.lrange("bull:orders:1:logs", 0, -1)
    assert plain == "as sent"
    for line, text in ((stamped, "charged card"), (as_json, "as JSON")):
        stamp, _, rest = line.partition(" ")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp) and rest == text
        at = datetime.datetime.fromisoformat(stamp)
        assert before - datetime.timedelta(milliseconds=1) <= at <= after
