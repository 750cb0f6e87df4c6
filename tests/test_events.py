"""Watching a job live as server-sent events: what a stream sends, resumes and survives."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import threading
import time
import uuid

import pytest
import redis
from bullmq import Queue, Worker
from prometheus_client import REGISTRY

from bullmq_http import event_stream
from bullmq_http.event_stream import parse_cursor
from harness.clients import EventStream, ServerSentEvent, add_active_job, open_raw_stream
from harness.servers import Gunicorn, wait_until
from tests.helpers import (
    API_TOKEN,
    JOB_TOKEN,
    Service,
    StreamedBody,
    bearer,
    kinds,
    one_crowded_worker,
    take,
)


def log(index: int, line: str) -> tuple[str, str]:
    return "log", json.dumps({"index": index, "line": line}, separators=(",", ":"))


def test_a_stream_opens_with_the_progress_and_the_newest_lines(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    assert service.post(f"{path}/progress", b'{"step":1}') == 200
    for n in range(15):
        assert service.post(f"{path}/logs", f"line {n}".encode()) == 200
    with service.events(f"{path}/events") as stream:
        events = take(stream, 11)
        assert stream.retry_ms == 2000
    assert kinds(events) == [("progress", '{"step":1}')] + [
        log(n, f"line {n}") for n in range(5, 15)
    ]
    with service.events(f"{path}/events?tail=0") as stream:
        assert kinds(take(stream, 1)) == [("progress", '{"step":1}')]


@pytest.mark.parametrize(
    ("query", "headers", "status", "message"),
    [
        ("?tail=1001", bearer(API_TOKEN), 400, "tail must be a whole number from 0 to 1000"),
        ("?tial=1", bearer(API_TOKEN), 400,
         "unknown query parameter 'tial': use tail, token and last_event_id"),
        ("", {**bearer(API_TOKEN), "Last-Event-ID": "yesterday"}, 400,
         "Last-Event-ID must be the id of an event this service sent"),
        ("", {}, 401, "send the token as 'Authorization: Bearer <token>'"),
        ("", bearer("narrow-token"), 403, "this token may not read queue 'orders'"),
    ],
)  # fmt: skip
def test_stream_refusals(service, job_id, query, headers, status, message):
    path = f"/queues/orders/jobs/{job_id}/events{query}"
    assert service.refusal(path, headers) == (status, message)


def test_a_missing_job_is_a_404_not_a_stream(service):
    path = "/queues/orders/jobs/missing/events"
    assert service.refusal(path, bearer(API_TOKEN)) == (
        404, "job 'missing' not found in queue 'orders'"
    )  # fmt: skip


def complete(service: Service, job_id: str, returnvalue: str, remove: bool = False) -> None:
    """Complete a job as BullMQ's moveToFinished leaves it: in the completed set, with
    its return value (or, with removeOnComplete, gone), and a completed event on the
    queue's stream; all at once."""
    finish = service.data.pipeline(transaction=True)
    if remove:
        finish.delete(f"bull:orders:{job_id}")
    else:
        finish.zadd("bull:orders:completed", {job_id: 1})
        finish.hset(f"bull:orders:{job_id}", "returnvalue", returnvalue)
    finish.xadd("bull:orders:events",
                {"event": "completed", "jobId": job_id, "returnvalue": returnvalue})  # fmt: skip
    finish.execute()


def watched_once(service: Service, path: str) -> list[ServerSentEvent]:
    """Set the job's progress to 1, watch it until that arrives, and go away; return
    what was seen."""
    service.post(f"{path}/progress", b"1")
    with service.events(f"{path}/events") as stream:
        return take(stream, 1)


def resume_after(seen: list[ServerSentEvent]) -> dict[str, str]:
    """Return the headers of a browser reconnecting after the last event it saw."""
    return {**bearer(API_TOKEN), "Last-Event-ID": seen[-1].id}


def read_in_background(stream: EventStream) -> tuple[list[ServerSentEvent], threading.Thread]:
    """Read a stream to its end in a thread; return the list it fills, and the thread."""
    events: list[ServerSentEvent] = []

    def read() -> None:
        try:
            for event in stream:
                events.append(event)
        except (OSError, ValueError, http.client.HTTPException):
            pass  # the test closed the connection first

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return events, thread


def test_writes_through_the_service_arrive_as_they_happen_and_finishing_ends(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        events, reader = read_in_background(stream)
        for n in range(3):
            assert service.post(f"{path}/progress", str(n).encode()) == 200
            assert service.post(f"{path}/logs", f"line {n}".encode()) == 200
        wait_until(lambda: len(events) == 6, 10, "the events")
        # BullMQ finishes the job: the stream ends with it.
        complete(service, job_id, '{"sum": 3}')
        reader.join(10)
        assert not reader.is_alive()
    progress = [("progress", str(n)) for n in range(3)]
    lines = [log(n, f"line {n}") for n in range(3)]
    got = kinds(events)
    assert [e for e in got if e[0] == "progress"] == progress
    assert [e for e in got if e[0] == "log"] == lines
    assert got[-1] == ("completed", '{"returnvalue":{"sum":3}}')
    # Every id is a cursor: the stream position and the lines seen so far.
    assert events[-1].id.endswith("/3")
    cursors = [parse_cursor(event.id) for event in events]
    assert cursors == sorted(cursors)


def test_lines_of_bullmq_and_of_the_service_arrive_once_each_and_in_order(service, job_id):
    """The service's lines come as published, BullMQ's own (job.log) by the poll."""
    path, logs = f"/queues/orders/jobs/{job_id}", f"bull:orders:{job_id}:logs"
    written = []
    with service.events(f"{path}/events") as stream:
        events, _ = read_in_background(stream)
        for n in range(60):
            if n % 4 == 0:
                service.data.rpush(logs, f"bullmq {n}")  # as BullMQ's job.log() writes
            else:
                assert service.post(f"{path}/logs", f"service {n}".encode()) == 200
            written.append(log(n, f"{'bullmq' if n % 4 == 0 else 'service'} {n}"))
        # A last line: whatever came twice would have come before it.
        assert service.post(f"{path}/logs", b"last") == 200
        wait_until(lambda: events and events[-1].data.endswith('"last"}'), 10, "the last line")
    assert kinds(events) == [*written, log(60, "last")]
    assert service.data.llen(logs) == 61


def test_a_reconnecting_client_gets_exactly_what_it_missed(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    service.post(f"{path}/progress", b"1")
    service.post(f"{path}/logs", b"before")
    with service.events(f"{path}/events") as stream:
        seen = take(stream, 2)
    assert kinds(seen) == [("progress", "1"), log(0, "before")]
    # While it is away:
    service.post(f"{path}/progress", b"2")
    service.post(f"{path}/logs", b"away 1")
    service.post(f"{path}/progress", b"3")
    service.post(f"{path}/logs", b"away 2")
    with service.events(f"{path}/events", resume_after(seen)) as stream:
        missed = take(stream, 4)
        service.post(f"{path}/progress", b"4")
        after = take(stream, 1)
    assert kinds(missed) == [("progress", "2"), ("progress", "3"),
                             log(1, "away 1"), log(2, "away 2")]  # fmt: skip
    assert kinds(after) == [("progress", "4")]


def test_a_client_away_while_the_job_finished_gets_the_rest_and_the_end(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    seen = watched_once(service, path)
    service.post(f"{path}/progress", b"2")
    service.post(f"{path}/logs", b"done")
    complete(service, job_id, "7")
    with service.events(f"{path}/events", resume_after(seen)) as stream:
        events = list(stream)  # it ends by itself
    assert kinds(events) == [
        ("progress", "2"), log(0, "done"), ("completed", '{"returnvalue":7}')
    ]  # fmt: skip


def test_a_job_removed_as_it_completes_still_ends_with_completed(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        events, reader = read_in_background(stream)
        time.sleep(0.5)
        complete(service, job_id, "null", remove=True)
        reader.join(10)
        assert not reader.is_alive()
    assert kinds(events) == [("completed", '{"returnvalue":null}')]


def test_a_stream_trimmed_past_the_cursor_gives_the_current_progress(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    seen = watched_once(service, path)
    service.post(f"{path}/progress", b"2")
    service.post(f"{path}/progress", b"3")
    service.data.xtrim("bull:orders:events", maxlen=0)
    with service.events(f"{path}/events", resume_after(seen)) as stream:
        assert kinds(take(stream, 1)) == [("progress", "3")]


@pytest.mark.parametrize(
    ("finished", "field", "value", "final"),
    [
        ("completed", "returnvalue", '"done"', ("completed", '{"returnvalue":"done"}')),
        ("failed", "failedReason", "boom", ("failed", '{"failedReason":"boom"}')),
    ],
)
def test_a_finished_job_gets_its_state_and_end_at_once(
    service, job_id, finished, field, value, final
):
    path = f"/queues/orders/jobs/{job_id}"
    service.post(f"{path}/progress", b"100")
    service.post(f"{path}/logs", b"last line")
    service.data.zadd(f"bull:orders:{finished}", {job_id: 1})
    service.data.hset(f"bull:orders:{job_id}", field, value)
    with service.events(f"{path}/events") as stream:
        events = list(stream)  # it ends by itself
    assert kinds(events) == [("progress", "100"), log(0, "last line"), final]


def test_a_job_removed_while_watched_ends_the_stream(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        events, reader = read_in_background(stream)
        time.sleep(0.5)
        service.data.delete(f"bull:orders:{job_id}")
        reader.join(10)
        assert not reader.is_alive()
    assert kinds(events) == [("removed", json.dumps({"jobId": job_id}, separators=(",", ":")))]


def readers(data: redis.Redis) -> set[str]:
    """Return the ids of the Redis connections blocked reading event streams: the
    event readers'."""
    return {str(c["id"]) for c in data.client_list() if c.get("cmd") in ("xread", "xreadgroup")}


def test_the_event_reader_survives_its_connection_being_killed(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        events, _ = read_in_background(stream)
        wait_until(lambda: readers(service.data), 10, "the event reader to block on Redis")
        killed = readers(service.data)
        service.data.client_kill_filter(_type="normal", skipme=True)
        # It notices, and reads again on a connection of its own.
        wait_until(lambda: readers(service.data) - killed, 10, "the event reader back")
        assert service.post(f"{path}/progress", b'"after"') == 200
        wait_until(lambda: events, 10, "the event")
    assert kinds(events) == [("progress", '"after"')]


def test_a_redis_restart_costs_an_open_stream_nothing(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        events, reader = read_in_background(stream)
        time.sleep(0.5)
        service.data.shutdown(save=True)  # it keeps its data, as a real restart would
        service.redis_server.process.wait(10)
        service.redis_server.start()
        # Requests see 503 at worst until the pool reconnects; the stream stays open.
        wait_until(lambda: service.post(f"{path}/progress", b"5") == 200, 10, "a write")
        wait_until(lambda: events, 10, "the event")
        assert reader.is_alive()
    assert kinds(events) == [("progress", "5")]


def test_bullmq_writes_arrive_and_the_end_is_bullmqs(service):
    """A real BullMQ worker updates progress, logs and completes; a failing one fails."""
    results: dict[str, list[ServerSentEvent]] = {}

    async def scenario() -> None:
        name = f"events-{uuid.uuid4().hex[:8]}"
        connection = {"connection": service.redis_server.url}
        queue = Queue(name, connection)
        started, go = asyncio.Event(), asyncio.Event()

        async def process(job, token):
            started.set()
            await go.wait()
            await job.updateProgress({"percent": 50})
            await job.log("halfway")
            if job.name == "bad":
                raise RuntimeError("it broke")
            return {"answer": 42}

        worker = Worker(name, process, connection)
        try:
            for job_name in ("good", "bad"):
                started.clear()
                go.clear()
                job = await queue.add(job_name, {}, {"attempts": 1})
                await asyncio.wait_for(started.wait(), 10)
                path = f"/queues/{name}/jobs/{job.id}/events"

                def watch(path=path, job_name=job_name):
                    with service.events(path) as stream:
                        results[job_name] = list(stream)

                watching = asyncio.create_task(asyncio.to_thread(watch))
                await asyncio.sleep(0.5)
                go.set()
                await asyncio.wait_for(watching, 15)
        finally:
            # Both jobs are done: nothing is left to finish. A graceful close waits, with
            # no bound, for every task of the worker's, its own fetch of a next job among
            # them; forced, it cancels them and closes its connections.
            await worker.close(force=True)
            await queue.close()

    asyncio.run(scenario())
    assert kinds(results["good"]) == [
        ("progress", '{"percent":50}'),
        log(0, "halfway"),
        ("completed", '{"returnvalue":{"answer":42}}'),
    ]
    assert kinds(results["bad"]) == [
        ("progress", '{"percent":50}'),
        log(0, "halfway"),
        ("failed", '{"failedReason":"it broke"}'),
    ]


def test_idle_streams_get_heartbeats_and_are_counted_while_open(make_app, job, monkeypatch):
    job()
    monkeypatch.setattr(event_stream, "HEARTBEAT_SECONDS", 0.2)
    client = make_app().test_client()
    before = REGISTRY.get_sample_value("bullmq_http_open_event_streams")
    response = client.get("/queues/orders/jobs/1/events", headers=bearer(API_TOKEN), buffered=False)
    body = StreamedBody(response)
    # Nothing happens to the job: after the retry field, a comment, within seconds.
    assert [body.readline() for _ in range(3)] == [b"retry: 2000\n", b"\n", b": keep-alive\n"]
    assert REGISTRY.get_sample_value("bullmq_http_open_event_streams") == before + 1
    response.close()
    assert REGISTRY.get_sample_value("bullmq_http_open_event_streams") == before


def test_a_new_event_source_resumes_from_the_cursor_in_its_query(service, job_id):
    """A page that opens a new EventSource cannot send Last-Event-ID: the query can. A
    browser's own reconnect sends the header, which is newer, and wins."""
    path = f"/queues/orders/jobs/{job_id}"
    service.post(f"{path}/logs", b"seen")
    with service.events(f"{path}/events") as stream:
        [seen] = take(stream, 1)
    service.post(f"{path}/logs", b"missed")
    with service.events(f"{path}/events?last_event_id={seen.id}") as stream:
        assert kinds(take(stream, 1)) == [log(1, "missed")]
    with service.events(f"{path}/events?last_event_id=0-0/0", resume_after([seen])) as stream:
        assert kinds(take(stream, 1)) == [log(1, "missed")]
    assert service.refusal(f"{path}/events?last_event_id=nonsense", bearer(API_TOKEN)) == (
        400, "Last-Event-ID must be the id of an event this service sent"
    )  # fmt: skip


# ------------------------------------------------------------------------ at scale


@pytest.mark.server  # starts its own servers
def test_a_thousand_subscribers_share_a_bounded_number_of_connections(tmp_path):
    subscribers = 1000
    with one_crowded_worker(tmp_path, MAX_STREAMS_PER_TOKEN="1000") as (server, data):
        add_active_job(data, "orders", "1", JOB_TOKEN)

        async def subscriber(opened: asyncio.Event, go: asyncio.Event) -> bytes:
            path = "/queues/orders/jobs/1/events?tail=0"
            head, reader, writer = await open_raw_stream(server, path, API_TOKEN)
            opened.set()
            await go.wait()
            event = await reader.readuntil(b"\n\n")  # inside a chunk of the body
            writer.close()
            found = re.search(rb"event: \w+\ndata: .*", event)
            return head.split(b"\r\n", 1)[0] + b" " + (found[0] if found else event)

        async def crowd() -> tuple[list[bytes], int]:
            go = asyncio.Event()
            opened = [asyncio.Event() for _ in range(subscribers)]
            tasks = [asyncio.create_task(subscriber(o, go)) for o in opened]
            await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 60)
            clients = len(data.client_list()) - 1  # all but this test's own
            path = "/queues/orders/jobs/1/progress"
            await asyncio.to_thread(server.send, "POST", path, b"99", JOB_TOKEN)
            go.set()
            return await asyncio.wait_for(asyncio.gather(*tasks), 60), clients

        answers, clients = asyncio.run(crowd())
    assert answers == [b"HTTP/1.1 200 OK event: progress\ndata: 99"] * subscribers
    # The pool (at most REDIS_MAX_CONNECTIONS) and the event reader's two (its reads, and
    # its listening for lines): never one each.
    assert clients <= 10 + 2


def test_sigterm_ends_open_streams(tmp_path, redis_url, r):
    """They end at once, not when gunicorn's graceful timeout (30 s) runs out: the reader
    is given far less. How soon (a second) is measured by `make bench`."""
    add_active_job(r, "orders", "1", JOB_TOKEN)
    env = {"REDIS_URL": redis_url, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "1"}
    server = Gunicorn(tmp_path, env).start()
    service = Service(server, None, r)
    try:
        with service.events("/queues/orders/jobs/1/events") as stream:
            _, reader = read_in_background(stream)
            wait_until(lambda: readers(r), 10, "the event reader to block on Redis")
            server.process.send_signal(signal.SIGTERM)
            reader.join(10)
            assert not reader.is_alive()  # the stream ended, well before 30 s
        assert server.process.wait(10) == 0
    finally:
        server.stop()
