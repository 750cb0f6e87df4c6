"""Streams of events under floods and faults: limits per worker and per credential,
deadlines, bounded replay, hostile tokens and cursors, and an event reader that survives
whatever Redis holds.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from bullmq_http import event_reader, event_stream
from bullmq_http.store import JobStore
from bullmq_http.tokens import watch_token
from harness.clients import EventStream, ServerSentEvent, raw_request
from harness.servers import Gunicorn, wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, StreamedBody, bearer

SECRET = "a secret the instances share, 32 bytes or more"
EVENTS = "/queues/orders/jobs/1/events"


class OpenStream:
    """A stream of events opened through a test client, read in a thread so that every
    wait for it is bounded."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.reader = EventStream(StreamedBody(response))
        self.events: queue.Queue[ServerSentEvent | None] = queue.Queue()
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        for event in self.reader:
            self.events.put(event)
        self.events.put(None)  # the stream ended

    def next(self, timeout: float = 10.0) -> ServerSentEvent | None:
        """Return the next event, or None when the stream ended; fail after timeout."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing within {timeout:g} seconds") from None

    def until_end(self, timeout: float = 10.0) -> list[ServerSentEvent]:
        """Return the events up to the stream's end; fail if it does not end in time."""
        deadline = time.monotonic() + timeout
        seen = []
        while (event := self.next(max(0.01, deadline - time.monotonic()))) is not None:
            seen.append(event)
        return seen

    def close(self) -> None:
        """Close the response, as the server does when the stream has ended."""
        self.thread.join(10)
        assert not self.thread.is_alive(), "the stream is still open"
        self.response.close()


@pytest.fixture
def opened() -> Iterator[Callable[..., tuple[int, Any]]]:
    """Yield a function that opens a stream through a test client; it returns the
    status and, for a 200, the OpenStream, else the response. After the test, every
    stream is ended (its app's event reader stopped) and closed."""
    apps: set[Flask] = set()
    opened_: list[OpenStream] = []

    def open_(client: FlaskClient, path: str = EVENTS, **headers: str) -> tuple[int, Any]:
        response = client.get(path, headers=headers, buffered=False)
        apps.add(client.application)
        if response.status_code != 200:
            return response.status_code, response
        opened_.append(OpenStream(response))
        return 200, opened_[-1]

    yield open_
    for app in apps:
        app.extensions["bullmq_http"].event_reader.stop()
    for stream in opened_:
        stream.close()


def api(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}", **extra}


# ------------------------------------------------------------- per credential


def test_an_api_token_at_its_limit_gets_429_while_another_token_opens(make_app, job, r, opened):
    job()
    app = make_app(AUTH_TOKENS=[API_TOKEN, "another-token"], MAX_STREAMS_PER_TOKEN=3)
    client = app.test_client()
    held = [opened(client, **api()) for _ in range(3)]
    assert [status for status, _ in held] == [200] * 3
    status, refused = opened(client, **api())
    assert (status, refused.headers["Retry-After"], refused.text) == (
        429,
        "10",
        "this API token holds its most open streams of events here "
        "(MAX_STREAMS_PER_TOKEN=3): close one, then retry",
    )
    assert opened(client, Authorization="Bearer another-token")[0] == 200
    # Streams that end give their places back: the job is removed, then laid out again.
    r.delete("bull:orders:1")
    for _, stream in held:
        assert [event.event for event in stream.until_end()] == ["removed"]
        stream.close()
    job()
    assert [opened(client, **api())[0] for _ in range(4)] == [200, 200, 200, 429]


def test_refused_and_missing_streams_give_their_place_back(make_app, job, opened):
    job()
    client = make_app(MAX_STREAMS_PER_TOKEN=2).test_client()
    for _ in range(5):
        assert opened(client, "/queues/orders/jobs/missing/events", **api())[0] == 404
        assert opened(client, **api(**{"Last-Event-ID": "0-0/x"}))[0] == 400
    assert [opened(client, **api())[0] for _ in range(3)] == [200, 200, 429]


def test_a_watch_token_opened_in_many_tabs_holds_only_its_share(make_app, job, opened):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET, MAX_STREAMS_PER_WATCH_TOKEN=2).test_client()
    expires = int(time.time()) + 300
    token = watch_token(SECRET, "orders", "1", expires)
    statuses = [opened(client, f"{EVENTS}?token={token}")[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    _, refused = opened(client, f"{EVENTS}?token={token}")
    assert refused.text == (
        "this watch token holds its most open streams of events here "
        "(MAX_STREAMS_PER_WATCH_TOKEN=2): close one, then retry"
    )
    # Another browser's token for the same job has its own share.
    other = watch_token(SECRET, "orders", "1", expires - 1)
    assert opened(client, f"{EVENTS}?token={other}")[0] == 200
    # A link exchanged for the page's cookie is the same token, and the same share.
    assert client.post("/queues/orders/jobs/1/watch/session", data=token).status_code == 200
    assert opened(client, EVENTS)[0] == 429


def test_watch_tokens_an_api_token_mints_hold_no_more_streams_than_it_may(make_app, job, opened):
    """Each minted token has its own share, but all of them together count against the
    API token that minted them: minting more tokens opens no more streams."""
    job()
    app = make_app(
        AUTH_TOKENS=[API_TOKEN, "another-token"],
        WATCH_TOKEN_SECRET=SECRET,
        MAX_STREAMS_PER_TOKEN=3,
        MAX_STREAMS_PER_WATCH_TOKEN=10,
    )
    client = app.test_client()
    minted = [
        client.post("/queues/orders/jobs/1/events/token", headers=api()).json["token"]
        for _ in range(5)
    ]
    statuses = [opened(client, f"{EVENTS}?token={token}")[0] for token in minted]
    assert statuses == [200, 200, 200, 429, 429]
    _, refused = opened(client, f"{EVENTS}?token={minted[4]}")
    assert refused.text == (
        "the API token that minted this watch token holds its most open streams of events "
        "here (MAX_STREAMS_PER_TOKEN=3): close one, then retry"
    )
    assert opened(client, **api())[0] == 429  # the minter's own share is spent too
    assert opened(client, Authorization="Bearer another-token")[0] == 200
    # A link signed offline counts against itself alone.
    link = watch_token(SECRET, "orders", "1", int(time.time()) + 300)
    assert opened(client, f"{EVENTS}?token={link}")[0] == 200


def test_minting_is_bounded_per_api_token(make_app, job):
    """Each API token mints at most WATCH_TOKENS_PER_MINUTE tokens a minute here: past
    it, 429 and when to retry, nothing minted; another API token is not held back."""
    job()
    app = make_app(
        AUTH_TOKENS=[API_TOKEN, "another-token"],
        WATCH_TOKEN_SECRET=SECRET,
        WATCH_TOKENS_PER_MINUTE=3,
    )
    client = app.test_client()
    mint = "/queues/orders/jobs/1/events/token"
    statuses = [client.post(mint, headers=api()).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    refused = client.post(mint, headers=api())
    assert (refused.status_code, refused.text) == (
        429,
        "this API token has minted its most watch tokens for now "
        "(WATCH_TOKENS_PER_MINUTE=3): retry after Retry-After seconds, "
        "or hand out the tokens already minted",
    )
    # The bucket refills evenly over the minute: room for one more a third of it on.
    assert 19 <= int(refused.headers["Retry-After"]) <= 20
    assert client.post(mint, headers={"Authorization": "Bearer another-token"}).status_code == 200


def test_a_minted_watch_tokens_minter_cannot_be_changed(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    token = client.post("/queues/orders/jobs/1/events/token", headers=api()).json["token"]
    expires, _, signature = token.split(".")
    for forged in (f"{expires}.{signature}", f"{expires}.{'0' * 32}.{signature}"):
        response = client.get(f"{EVENTS}?token={forged}")
        assert (response.status_code, response.text) == (
            401,
            "the watch token is not valid for this job",
        )


def test_a_stream_opened_with_a_watch_token_ends_when_it_expires(make_app, job, opened):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    expires = int(time.time()) + 2
    status, stream = opened(client, f"{EVENTS}?token={watch_token(SECRET, 'orders', '1', expires)}")
    assert status == 200
    assert stream.until_end(timeout=10) == []  # nothing happened to the job; it ended
    assert time.time() >= expires
    assert stream.reader.comments == ["the watch token expired: open the stream with a new one"]


def test_a_worker_at_its_own_limit_answers_503_at_once(make_app, job, opened):
    job()
    client = make_app(MAX_STREAMS=2, AUTH_TOKENS=[API_TOKEN, "another-token"]).test_client()
    assert [opened(client, **api())[0] for _ in range(2)] == [200, 200]
    status, refused = opened(client, Authorization="Bearer another-token")
    assert (status, refused.headers["Retry-After"], refused.text) == (
        503,
        "2",
        "this worker holds its most streams of events (MAX_STREAMS=2); retry shortly",
    )


# ------------------------------------------------------------- the documented defaults


@pytest.mark.parametrize(
    ("credential", "setting", "default"),
    [("api", "MAX_STREAMS_PER_TOKEN", 100), ("watch", "MAX_STREAMS_PER_WATCH_TOKEN", 10)],
)
def test_a_credentials_streams_are_capped_at_the_documented_default(
    make_app, job, opened, credential, setting, default
):
    """No setting given: the cap is the default docs/operations.md's table states."""
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    token = watch_token(SECRET, "orders", "1", int(time.time()) + 300)
    path, headers = (EVENTS, api()) if credential == "api" else (f"{EVENTS}?token={token}", {})
    assert [opened(client, path, **headers)[0] for _ in range(default)] == [200] * default
    status, refused = opened(client, path, **headers)
    assert (status, f"({setting}={default})" in refused.text) == (429, True)


@pytest.mark.parametrize(("worker_class", "held"), [("gthread", 4), ("sync", 0)])
def test_a_workers_streams_are_capped_as_documented_for_its_class(
    make_app, job, opened, worker_class, held
):
    """MAX_STREAMS unset: half of THREADS (8) under gthread, none under sync, as
    docs/operations.md's table says (and four fifths of WORKER_CONNECTIONS under gevent:
    the table's test checks the words, test_crowds a thousand streams)."""
    job()
    client = make_app(WORKER_CLASS=worker_class).test_client()
    assert [opened(client, **api())[0] for _ in range(held)] == [200] * held
    status, refused = opened(client, **api())
    assert (status, f"(MAX_STREAMS={held})" in refused.text) == (503, True)


# ------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "token",
    ["1.%C3%A9", "%C3%A9.abc", "1.%00", "99999999999999999999.abc", ".", "", "1." + "a" * 5000],
)
def test_a_watch_token_of_any_bytes_is_a_401(make_app, job, token):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    response = client.get(f"{EVENTS}?token={token}")
    assert (response.status_code, response.text) == (
        401,
        "the watch token is not valid for this job",
    )
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "cursor",
    [
        "1-18446744073709551616/0",  # a sequence above Redis's 64 bits
        "18446744073709551616-0/0",
        "1-0/9007199254740992",  # more log lines than a list can be read as
        "1-0/-1",
        "1-0",
    ],
)
def test_a_cursor_this_service_could_not_have_made_is_a_400(make_app, job, cursor):
    job()
    response = make_app().test_client().get(EVENTS, headers=api(**{"Last-Event-ID": cursor}))
    assert (response.status_code, response.text) == (
        400,
        "Last-Event-ID must be the id of an event this service sent",
    )


def test_a_cursor_ahead_of_the_stream_gets_the_current_state_and_what_follows(
    make_app, job, r, opened
):
    """A cursor from before Redis lost its data (a failover to a replica behind, say)
    must not make the events that follow look as if they were sent already."""
    job()
    client = make_app().test_client()
    client.post("/queues/orders/jobs/1/progress", data=b"5", headers=bearer(JOB_TOKEN))
    status, stream = opened(client, **api(**{"Last-Event-ID": "99999999999999-0/40"}))
    assert status == 200
    first = stream.next()
    assert (first.event, first.data) == ("progress", "5")
    client.post("/queues/orders/jobs/1/logs", data=b"next line", headers=bearer(JOB_TOKEN))
    client.post("/queues/orders/jobs/1/progress", data=b"6", headers=bearer(JOB_TOKEN))
    got = [stream.next(), stream.next()]
    assert sorted((event.event, event.data) for event in got) == [
        ("log", '{"index":0,"line":"next line"}'),
        ("progress", "6"),
    ]


def resume_from_0_0_amid(make_app, r, opened, entries: int, size: int) -> tuple[Any, Any, int]:
    """Fill the queue's event stream with `entries` of other jobs' progress of `size`
    bytes, set job 1's progress to 77, and resume its stream from 0-0/0; return the
    first event, the stream, and the bytes Redis sent meanwhile."""
    filler = "x" * size
    pipe = r.pipeline(transaction=False)
    for n in range(entries):
        pipe.xadd("bull:orders:events", {"event": "progress", "jobId": f"other{n}", "data": filler})
    pipe.execute()
    client = make_app().test_client()
    client.post("/queues/orders/jobs/1/progress", data=b"77", headers=bearer(JOB_TOKEN))
    sent_before = r.info("stats")["total_net_output_bytes"]
    status, stream = opened(client, **api(**{"Last-Event-ID": "0-0/0"}))
    assert status == 200
    first = stream.next()
    return first, stream, r.info("stats")["total_net_output_bytes"] - sent_before


def test_resuming_from_0_0_reads_a_bounded_part_of_a_long_event_stream(make_app, job, r, opened):
    job()
    # About 20 MB of other jobs' events.
    first, stream, sent = resume_from_0_0_amid(make_app, r, opened, 20_000, 1000)
    assert (first.event, first.data) == ("progress", "77")
    assert stream.reader.comments == ["too much happened since Last-Event-ID: the current progress"]
    # At most REPLAY_ENTRIES entries of about 1 KB, and the job's own state.
    assert sent < 1.5 * event_stream.REPLAY_ENTRIES * 1100


def test_resuming_amid_large_values_of_other_jobs_costs_redis_a_bounded_number_of_bytes(
    make_app, job, r, opened
):
    """Any job token writes progress of up to 64 KiB: a resume must not read every
    job's values to find its own job's."""
    job()
    # About 20 MB of other jobs' events.
    first, _, sent = resume_from_0_0_amid(make_app, r, opened, 300, 64 * 1024)
    assert (first.event, first.data) == ("progress", "77")
    assert sent < 100_000  # the job's own entry and state, none of the others' values


def test_resuming_past_more_than_replay_bytes_of_the_jobs_own_gets_its_current_progress(
    make_app, job, r, opened
):
    job()
    client = make_app().test_client()
    top = r.xadd("bull:orders:events", {"event": "progress", "jobId": "other", "data": "1"})
    large = "7" * 60_000
    for n in range(40):  # 2.4 MB of the job's own progress
        progress = json.dumps(f"{n} {large}")
        answer = client.post(
            "/queues/orders/jobs/1/progress", data=progress, headers=bearer(JOB_TOKEN)
        )
        assert answer.status_code == 200
    sent_before = r.info("stats")["total_net_output_bytes"]
    status, stream = opened(client, **api(**{"Last-Event-ID": f"{top}/0"}))
    assert status == 200
    first = stream.next()
    sent = r.info("stats")["total_net_output_bytes"] - sent_before
    assert (first.event, first.data) == ("progress", progress)
    assert stream.reader.comments == ["too much happened since Last-Event-ID: the current progress"]
    assert sent < event_stream.REPLAY_BYTES + 200_000


def test_a_stream_that_stops_reading_holds_at_most_inbox_bytes_then_resumes(
    make_app, job, r, opened
):
    job()
    app = make_app()
    client = app.test_client()
    progress = client.post("/queues/orders/jobs/1/progress", data="1", headers=bearer(JOB_TOKEN))
    assert progress.status_code == 200
    response = client.get(EVENTS, headers=api(), buffered=False)
    assert response.status_code == 200
    body = EventStream(StreamedBody(response))
    first = next(iter(body))  # the stream is open; now it reads no more
    reader = app.extensions["bullmq_http"].event_reader
    (subscription,) = reader.jobs["orders", "1"].subscriptions
    large = "5" * 60_000
    for n in range(40):  # 2.4 MB of progress while the stream reads nothing
        progress = json.dumps(f"{n} {large}")
        answer = client.post(
            "/queues/orders/jobs/1/progress", data=progress, headers=bearer(JOB_TOKEN)
        )
        assert answer.status_code == 200
    wait_until(lambda: subscription.ended == event_reader.BEHIND, 10, "the stream to be ended")
    assert subscription.inbox_bytes <= event_reader.INBOX_BYTES
    # The stream ends, and resumed from its cursor it gets the job's progress now.
    assert list(body) == []
    response.close()
    status, resumed = opened(client, **api(**{"Last-Event-ID": first.id}))
    assert status == 200
    current = resumed.next()
    assert (current.event, current.data) == ("progress", progress)


def test_resuming_at_line_0_reads_pages_within_max_page_bytes(
    make_app, job, r, opened, monkeypatch
):
    job()
    line = "y" * 100_000
    r.rpush("bull:orders:1:logs", *[f"{n} {line}" for n in range(40)])
    pages: list[int] = []
    log_page = JobStore.log_page

    def counted(self, *args):
        page = log_page(self, *args)
        pages.append(sum(map(len, page)))
        return page

    monkeypatch.setattr(JobStore, "log_page", counted)
    client = make_app(MAX_PAGE_BYTES=250_000).test_client()
    top = r.xadd("bull:orders:events", {"event": "progress", "jobId": "other", "data": "1"})
    status, stream = opened(client, **api(**{"Last-Event-ID": f"{top}/0"}))
    assert status == 200
    indexes = [int(stream.next().data.split(",")[0].removeprefix('{"index":')) for _ in range(40)]
    assert indexes == list(range(40))  # every line, once, in order
    assert pages and max(pages) <= 250_000


# ------------------------------------------------------------- the event reader


def listening(r: redis.Redis, job_id: str = "1") -> bool:
    """Whether an event reader listens for the lines of a job of queue orders."""
    channel = f"bull:orders:{job_id}:logs"
    return r.pubsub_numsub(channel) == [(channel, 1)]


def test_a_line_written_through_the_service_reaches_its_streams_before_any_poll(
    make_app, job, r, opened, monkeypatch
):
    monkeypatch.setattr(event_reader, "POLL_SECONDS", 60.0)  # it polls once, as it starts
    job()
    client = make_app().test_client()
    _, stream = opened(client, **api())
    wait_until(lambda: listening(r), 10, "the event reader to listen for the job's lines")
    written = client.post("/queues/orders/jobs/1/logs", data=b"at once", headers=bearer(JOB_TOKEN))
    assert written.status_code == 200
    event = stream.next()
    assert (event.event, json.loads(event.data)) == ("log", {"index": 0, "line": "at once"})
    assert r.lrange("bull:orders:1:logs", 0, -1) == ["at once"]


def test_what_others_publish_on_a_jobs_channel_is_passed_over(make_app, job, r, opened):
    job()
    client = make_app().test_client()
    _, stream = opened(client, **api())
    wait_until(lambda: listening(r), 10, "the event reader to listen for the job's lines")
    for message in ("not a line", "", "-1 before the first", "5 not the next line", "\xff"):
        r.publish("bull:orders:1:logs", message)
    for line in (b"first", b"second"):
        assert (
            client.post(
                "/queues/orders/jobs/1/logs", data=line, headers=bearer(JOB_TOKEN)
            ).status_code
            == 200
        )
    got = [stream.next(), stream.next()]
    assert [(e.event, json.loads(e.data)) for e in got] == [
        ("log", {"index": 0, "line": "first"}),
        ("log", {"index": 1, "line": "second"}),
    ]
    assert client.get("/readyz").status_code == 200


def test_bytes_that_are_not_utf8_in_any_queue_leave_every_stream_alive(
    make_app, job, redis_url, opened
):
    job()
    client = make_app().test_client()
    status, stream = opened(client, **api())
    assert status == 200
    raw = redis.Redis.from_url(redis_url)
    raw.xadd("bull:orders:events", {"event": "failed", "jobId": "9", "failedReason": b"\x89PNG"})
    raw.xadd("bull:orders:events", {"event": b"\xff\xfe", "jobId": b"\xc3"})
    raw.xadd("bull:orders:events", {"event": "progress", "jobId": "1", "data": b"\x89"})
    raw.close()
    client.post("/queues/orders/jobs/1/progress", data=b"8", headers=bearer(JOB_TOKEN))
    assert [(e.event, e.data) for e in (stream.next(), stream.next())] == [
        ("progress", "\ufffd"),
        ("progress", "8"),
    ]
    assert client.get("/readyz").status_code == 200


def test_a_return_value_nested_too_deep_to_parse_stops_no_stream(make_app, job, r, opened):
    """BullMQ stores any processor's return value; one nested deeper than Python's JSON
    reader goes must stop neither the reader nor any stream, of its queue or another's,
    nor fail /readyz."""
    job()
    job(job_id="deep")
    job(queue="other")
    client = make_app().test_client()
    _, orders = opened(client, **api())
    _, deep = opened(client, "/queues/orders/jobs/deep/events", **api())
    _, other = opened(client, "/queues/other/jobs/1/events", **api())
    nested = "[" * 5000 + "]" * 5000
    for job_id in ("unwatched", "deep"):
        r.zadd("bull:orders:completed", {job_id: 1})
        r.hset(f"bull:orders:{job_id}", "returnvalue", nested)
        r.xadd("bull:orders:events", {"event": "completed", "jobId": job_id, "returnvalue": nested})
    client.post("/queues/orders/jobs/1/progress", data=b"3", headers=bearer(JOB_TOKEN))
    client.post("/queues/other/jobs/1/progress", data=b"4", headers=bearer(JOB_TOKEN))
    assert [(e.event, e.data) for e in (orders.next(), other.next())] == [
        ("progress", "3"),
        ("progress", "4"),
    ]
    (end,) = deep.until_end()
    assert (end.event, json.loads(end.data)) == ("completed", {"returnvalue": nested})
    assert client.get("/readyz").status_code == 200
    # The deep value's stream opened after the job ended tells the same.
    _, again = opened(client, "/queues/orders/jobs/deep/events", **api())
    assert [(e.event, json.loads(e.data)) for e in again.until_end()] == [
        ("completed", {"returnvalue": nested})
    ]


def test_the_reader_with_no_queue_left_to_read_reads_nothing(make_app, redis_url):
    """The last stream may close between the reader's look at its queues and its read:
    a read of no queue at all must be no error."""
    reader = make_app().extensions["bullmq_http"].event_reader
    client = redis.Redis.from_url(redis_url)
    try:
        reader.read_events(client)
        reader.poll(client, events=True)
    finally:
        client.close()
    assert reader.failure is None and reader.queues == {}


def test_a_queue_key_of_another_type_ends_that_queues_streams_only(make_app, job, r, opened):
    job()
    job(queue="other")
    client = make_app().test_client()
    _, orders = opened(client, **api())
    _, other = opened(client, "/queues/other/jobs/1/events", **api())
    r.delete("bull:other:events")
    r.set("bull:other:events", "not a stream")
    assert other.until_end() == []
    client.post("/queues/orders/jobs/1/progress", data=b"3", headers=bearer(JOB_TOKEN))
    event = orders.next()
    assert (event.event, event.data) == ("progress", "3")
    assert client.get("/readyz").status_code == 200


def test_a_failing_event_reader_is_logged_counted_reported_and_starts_again(
    make_app, job, opened, monkeypatch, caplog
):
    job()
    app: Flask = make_app()
    client = app.test_client()
    read_events = event_reader.EventReader.read_events
    broken = threading.Event()
    broken.set()

    def read_or_fail(self, redis_client):
        if broken.is_set():
            raise RuntimeError("a fault of the event reader's own")
        return read_events(self, redis_client)

    monkeypatch.setattr(event_reader.EventReader, "read_events", read_or_fail)
    errors_before = REGISTRY.get_sample_value("bullmq_http_watcher_errors_total") or 0
    _, stream = opened(client, **api())
    ready = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r, 10, "503")
    assert (
        ready.text == "the event reader is failing: RuntimeError: a fault of the event reader's own"
    )
    assert REGISTRY.get_sample_value("bullmq_http_watcher_errors_total") > errors_before
    assert "the event reader failed; it starts again in" in caplog.text
    broken.clear()
    wait_until(lambda: client.get("/readyz").status_code == 200, 20, "the event reader to recover")
    client.post("/queues/orders/jobs/1/progress", data=b"4", headers=bearer(JOB_TOKEN))
    event = stream.next(timeout=20)
    assert (event.event, event.data) == ("progress", "4")


# ------------------------------------------------------------- under gunicorn


def request(path: str, method: str = "GET", body: bytes = b"", token: str = API_TOKEN) -> bytes:
    """Return one raw HTTP/1.1 request, by default a GET with the API token."""
    return raw_request(method, path, token, body)


async def connect(server: Gunicorn, **socket_options: int) -> tuple[Any, Any]:
    """Open a connection to the server, with SO_* options set before it connects."""
    host, port = server.bind.rsplit(":", 1)
    sock = socket.socket()
    for name, value in socket_options.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await asyncio.open_connection(sock=sock)


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read a response's head, and its body when it has a length: a stream's is left."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status, *lines = head.split("\r\n")[:-2]
    fields = (line.partition(": ") for line in lines)
    headers = {name.lower(): value for name, _, value in fields}
    length = headers.get("content-length")
    body = await reader.readexactly(int(length)) if length else b""
    return int(status.split()[1]), headers, body


async def ask(server: Gunicorn, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send one request on a connection of its own; return the status and body."""
    reader, writer = await connect(server)
    try:
        writer.write(raw)
        status, _, body = await asyncio.wait_for(answer(reader), timeout)
        return status, body
    finally:
        writer.close()


def logged_no_error(server: Gunicorn) -> bool:
    """Return whether the server has logged no error and no traceback."""
    log = server.log.read_text()
    return "Traceback" not in log and "[ERROR]" not in log


def open_streams(server: Gunicorn) -> float | None:
    """Return the worker's open streams, as /metrics counts them."""
    conn = server.connect()
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(r"^bullmq_http_open_event_streams (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else None


def test_a_crowd_of_streams_past_the_limit_leaves_room_for_writes_and_probes(serve, r, job):
    """More stream clients than the worker has connections, each retrying at once when
    refused: the worker holds MAX_STREAMS of them, refuses the rest at once, and serves
    probes and writes all the while."""
    key = job()
    crowd, connections = 300, 250  # MAX_STREAMS: four fifths, 200
    server = serve(WORKER_CONNECTIONS=str(connections), MAX_STREAMS_PER_TOKEN="1000")

    async def stream_client(stop: asyncio.Event, refusals: list[dict[str, str]]) -> bytes:
        """Open a stream, retrying at once while refused; then wait for an event."""
        while not stop.is_set():
            reader, writer = await connect(server)
            writer.write(request(f"{EVENTS}?tail=0"))
            status, headers, _ = await answer(reader)
            if status == 200:  # held until the end
                await reader.readuntil(b"retry: 2000\n\n")
                event = await asyncio.wait_for(reader.readuntil(b"\n\n\r\n"), 60)
                await stop.wait()
                writer.close()
                return event
            refusals.append({"status": str(status), **headers})
            writer.close()
            await asyncio.sleep(0.05)
        return b""

    async def scenario() -> tuple[list[bytes], list[dict[str, str]], list[tuple[int, bytes]]]:
        stop, refusals = asyncio.Event(), list[dict[str, str]]()
        clients = [asyncio.create_task(stream_client(stop, refusals)) for _ in range(crowd)]
        await asyncio.sleep(3)  # the crowd at the limit, the rest knocking again and again
        served = []
        for n in range(10):
            served.append(await ask(server, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"))
            progress = request("/queues/orders/jobs/1/progress", "POST", str(n).encode(), JOB_TOKEN)
            served.append(await ask(server, progress))
        stop.set()
        return await asyncio.wait_for(asyncio.gather(*clients), 60), refusals, served

    events, refusals, served = asyncio.run(scenario())

    assert served == [(200, b"OK")] * 20
    assert r.hget(key, "progress") == "9"
    held = [event for event in events if event]
    assert len(held) == 200  # MAX_STREAMS, each of which got the first write
    assert all(b"event: progress\ndata: 0\n" in event for event in held)
    assert refusals and {refusal["status"] for refusal in refusals} == {"503"}
    assert {refusal["retry-after"] for refusal in refusals} == {"2"}


def test_idle_eviction_never_closes_a_connection_whose_request_arrived(serve, r, job):
    key = job()
    server = serve(WORKER_CONNECTIONS="300", MAX_STREAMS="250", MAX_STREAMS_PER_TOKEN="1000")

    async def scenario() -> list[tuple[int, bytes] | BaseException]:
        streams_ = []
        for _ in range(250):  # the streams a worker may hold
            reader, writer = await connect(server)
            writer.write(request(f"{EVENTS}?tail=0"))
            assert (await answer(reader))[0] == 200
            streams_.append(writer)
        await asyncio.sleep(1.5)  # the streams are long past a new connection's grace
        writes = [
            ask(server, request("/queues/orders/jobs/1/progress", "POST", b"1", JOB_TOKEN), 30)
            for _ in range(200)
        ]
        answers = await asyncio.gather(*writes, return_exceptions=True)
        for writer in streams_:
            writer.close()
        return answers

    assert asyncio.run(scenario()) == [(200, b"OK")] * 200
    assert r.xlen("bull:orders:events") == 200
    assert r.hget(key, "progress") == "1"
    assert logged_no_error(server)


def test_many_idle_clients_are_closed_quietly_to_make_room(serve):
    server = serve(WORKER_CONNECTIONS="100")

    async def scenario() -> list[tuple[int, bytes]]:
        answers, held = [], []
        for _ in range(400):  # four times what the worker holds, each kept open
            reader, writer = await connect(server)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = await asyncio.wait_for(answer(reader), 10)
            answers.append((status, body))
            held.append(writer)
        for writer in held:
            writer.close()
        return answers

    assert asyncio.run(scenario()) == [(200, b"OK")] * 400
    assert logged_no_error(server)


def open_stream_socket(
    server: Gunicorn, raw: bytes | None = None, **socket_options: int
) -> socket.socket:
    """Open a stream of job 1's events on a plain socket, with SO_* options set before
    it connects, by the raw request given (a GET with the API token by default); return
    the socket once the worker counts the stream open."""
    sock = socket.socket()
    for name, value in socket_options.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    host, port = server.bind.rsplit(":", 1)
    sock.connect((host, int(port)))
    sock.sendall(raw or request(f"{EVENTS}?tail=0"))
    wait_until(lambda: open_streams(server) == 1, 10, "the stream to open")
    return sock


def stall_a_stream(server: Gunicorn) -> Callable[[], None]:
    """Open a stream of job 1's events whose client reads nothing, and write progress
    until its buffers are full; return the function that closes the client."""
    sock = open_stream_socket(server, SO_RCVBUF=4096)
    big = b'"' + b"p" * 60_000 + b'"'
    for _ in range(40):  # 2.4 MB of events to a client that reads none
        assert server.send("POST", "/queues/orders/jobs/1/progress", big, JOB_TOKEN) == 200
    return sock.close


def dechunk(body: bytes) -> bytes:
    """Return a chunked body's bytes, failing on any framing that is not exact."""
    data = b""
    while (found := re.match(rb"([0-9A-Fa-f]+)\r\n", body)) is not None:
        size, body = int(found[1], 16), body[found.end() :]
        if size == 0:
            assert body == b"\r\n", body[:80]
            return data
        assert body[size : size + 2] == b"\r\n", body[size : size + 80]
        data, body = data + body[:size], body[size + 2 :]
    raise AssertionError(f"not a chunk: {body[:80]!r}")


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/1.0"])
def test_a_slow_reader_gets_every_event_once_whole_and_in_order(serve, r, job, protocol):
    """Events written far faster than a stream's client reads them: what its socket
    cannot take at once waits for it, and the client gets each event once, whole and in
    order, framed as its HTTP version frames a body (chunks; or bytes up to the close),
    then the end."""
    job()
    server = serve()
    raw = (
        f"GET {EVENTS}?tail=0 {protocol}\r\nHost: test\r\nAuthorization: Bearer {API_TOKEN}\r\n\r\n"
    )
    sock = open_stream_socket(server, raw.encode(), SO_RCVBUF=4096)
    sock.settimeout(20)
    # 60 values of up to 12 KB, 360 KB in all: far more than the sockets' buffers hold,
    # within what a stream may fall behind (INBOX_BYTES).
    values = [json.dumps(f"{n}:" + "v" * (n * 397 % 12_000)) for n in range(60)]
    for value in values:  # the client reads nothing meanwhile
        assert (
            server.send("POST", "/queues/orders/jobs/1/progress", value.encode(), JOB_TOKEN) == 200
        )
    assert server.send("POST", "/queues/orders/jobs/1/complete", b'"done"', JOB_TOKEN) == 200
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n") and (more := sock.recv(65536)):
        received += more
    sock.close()

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(f"{protocol} 200 OK".encode())
    if protocol == "HTTP/1.1":
        assert b"transfer-encoding: chunked" in head.lower()
        body = dechunk(body)
    fields = [dict(line.split(": ", 1) for line in block.split("\n"))
              for block in body.decode().split("\n\n")[1:-1]]  # fmt: skip
    assert [(event["event"], event["data"]) for event in fields] == [
        *(("progress", value) for value in values),
        ("completed", '{"returnvalue":"done"}'),
    ]
    ids = [event["id"] for event in fields]
    assert ids == sorted(
        set(ids), key=lambda cursor: [int(part) for part in re.split("[-/]", cursor)]
    )
    assert r.hget("bull:orders:1", "progress") == values[-1]
    assert logged_no_error(server)


def test_head_of_a_stream_is_its_head_alone_and_the_connection_goes_on(serve, job):
    """HEAD answers the head a stream's GET gets, and nothing after it, however the
    job's events come (werkzeug never runs a HEAD's stream, so the event reader has no
    stream to send to); the keep-alive connection then serves the next request."""
    job()
    server = serve()
    host, port = server.bind.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(request(f"{EVENTS}?tail=0", "HEAD"))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-type: text/event-stream" in received.lower()
        assert server.send("POST", "/queues/orders/jobs/1/progress", b"1", JOB_TOKEN) == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        while not received.endswith(b"\r\n\r\nOK"):
            received += sock.recv(4096)
    finally:
        sock.close()
    healthz = received.split(b"\r\n\r\n", 1)[1]
    assert healthz.startswith(b"HTTP/1.1 200 OK\r\n")
    assert open_streams(server) == 0
    assert logged_no_error(server)


def test_a_client_reset_while_events_pour_in_ends_its_stream_quietly(serve, r, job):
    """The event reader's send to a client that is gone fails: the stream ends, frees its
    place, and the worker logs no error; writes go on."""
    job()
    server = serve()
    sock = open_stream_socket(server)
    # Closed with a reset (SO_LINGER 0): the next send to it fails at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    for n in range(20):
        body = str(n).encode()
        assert server.send("POST", "/queues/orders/jobs/1/progress", body, JOB_TOKEN) == 200
    wait_until(lambda: open_streams(server) == 0, 10, "the stream to end")
    assert r.hget("bull:orders:1", "progress") == "19"
    assert logged_no_error(server)


def test_a_client_that_stops_reading_is_cut_off_at_the_send_deadline(serve, job):
    job()
    server = serve(SEND_TIMEOUT="1")
    close = stall_a_stream(server)
    try:
        wait_until(lambda: open_streams(server) == 0, 20, "the stalled stream to be cut")
        # Writes were never held up by it.
        assert server.send("POST", "/queues/orders/jobs/1/progress", b"1", JOB_TOKEN) == 200
    finally:
        close()
    log = server.log.read_text()
    assert "closed a connection whose client read nothing for 1 s (SEND_TIMEOUT)" in log
    assert "Traceback" not in log


def test_sigterm_ends_a_stream_whose_client_stopped_reading_within_seconds(serve, job):
    job()
    server = serve(SEND_TIMEOUT="60")
    close = stall_a_stream(server)
    try:
        assert server.process is not None
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(15)  # the graceful timeout is 30 s: the stream did not hold it
        assert time.monotonic() - stopped < 15
    finally:
        close()
        server.stop()


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_stream_whose_client_hung_up_frees_its_place_within_seconds(serve, job, worker_class):
    """A reader that reloads or switches tabs opens its next stream at once, not after
    the heartbeat that would find the old one gone."""
    job()
    server = serve(WORKER_CLASS=worker_class, MAX_STREAMS_PER_TOKEN="1")

    async def scenario() -> list[int]:
        reader, writer = await connect(server)
        writer.write(request(f"{EVENTS}?tail=0"))
        assert (await answer(reader))[0] == 200
        writer.close()  # the client leaves; nothing is written to its stream after
        statuses = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reader, writer = await connect(server)
            writer.write(request(f"{EVENTS}?tail=0"))
            statuses.append((await answer(reader))[0])
            writer.close()
            if statuses[-1] == 200:
                break
            await asyncio.sleep(0.25)
        return statuses

    statuses = asyncio.run(scenario())
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {429}
