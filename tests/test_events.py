"""Reading a job's progress, and watching a job live as server-sent events."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import redis
from bullmq import Queue, Worker
from prometheus_client import REGISTRY

from app import create_app
from bullmq_http import event_stream
from bullmq_http.event_stream import parse_cursor
from bullmq_http.settings import ConfigError
from bullmq_http.tokens import watch_token
from harness.clients import EventStream, ServerSentEvent, add_active_job, open_raw_stream
from harness.servers import Gunicorn, RedisServer, wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, ROOT, StreamedBody, bearer, unavailable

SECRET = "a secret the instances share, 32 bytes or more"


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
        ("/queues/orders/jobs/1/progress", bearer(JOB_TOKEN), 401, "the API token is not valid"),
        ("/queues/orders/jobs/1/progress?x=1", bearer(API_TOKEN), 400,
         "unknown query parameter 'x': this route takes none"),
    ],
)  # fmt: skip
def test_progress_refusals(client, job, r, path, headers, status, message):
    job()
    response = client.get(path, headers=headers)
    assert (response.status_code, response.text) == (status, message)


# ---------------------------------------------------------------- the event stream


@dataclass
class Service:
    server: Gunicorn
    redis_server: RedisServer
    data: redis.Redis

    def post(self, path: str, body: bytes, token: str = JOB_TOKEN) -> int:
        return self.server.send("POST", path, body, token)

    @contextmanager
    def events(self, path: str, headers: dict[str, str] | None = None) -> Iterator[EventStream]:
        """Open a stream of events; yield its reader (whose status must be 200)."""
        conn = self.server.connect()  # reads time out after 10 s, before a heartbeat
        try:
            conn.request("GET", path, headers=bearer(API_TOKEN) if headers is None else headers)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
            yield EventStream(response)
        finally:
            conn.close()

    def refusal(self, path: str, headers: dict[str, str]) -> tuple[int, str]:
        conn = self.server.connect()
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    directory = tmp_path_factory.mktemp("events")
    tokens = directory / "tokens"
    tokens.write_text(f"dashboard {API_TOKEN} *\nnarrow narrow-token other-*\n")
    with RedisServer(directory / "redis") as redis_server:
        env = {
            "REDIS_URL": redis_server.url,
            "AUTH_TOKENS_FILE": str(tokens),
            "WATCH_TOKEN_SECRET": SECRET,
            "WEB_CONCURRENCY": "1",
        }
        data = redis.Redis.from_url(redis_server.url, decode_responses=True)
        with Gunicorn(directory, env) as server:
            yield Service(server, redis_server, data)
        data.close()


@pytest.fixture
def job_id(service):
    """A fresh active job in queue orders, with its id."""
    job_id = uuid.uuid4().hex[:8]
    add_active_job(service.data, "orders", job_id, JOB_TOKEN)
    return job_id


def take(stream: EventStream, count: int) -> list[ServerSentEvent]:
    return list(itertools.islice(stream, count))


def kinds(events: list[ServerSentEvent]) -> list[tuple[str, str]]:
    return [(event.event, event.data) for event in events]


def log(index: int, line: str) -> tuple[str, str]:
    return "log", json.dumps({"index": index, "line": line})


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
    assert got[-1] == ("completed", '{"returnvalue": {"sum": 3}}')
    # Every id is a cursor: the stream position and the lines seen so far.
    assert events[-1].id.endswith("/3")
    cursors = [parse_cursor(event.id) for event in events]
    assert cursors == sorted(cursors)


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
        ("progress", "2"), log(0, "done"), ("completed", '{"returnvalue": 7}')
    ]  # fmt: skip


def test_a_job_removed_as_it_completes_still_ends_with_completed(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        events, reader = read_in_background(stream)
        time.sleep(0.5)
        complete(service, job_id, "null", remove=True)
        reader.join(10)
        assert not reader.is_alive()
    assert kinds(events) == [("completed", '{"returnvalue": null}')]


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
        ("completed", "returnvalue", '"done"', ("completed", '{"returnvalue": "done"}')),
        ("failed", "failedReason", "boom", ("failed", '{"failedReason": "boom"}')),
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
    assert kinds(events) == [("removed", json.dumps({"jobId": job_id}))]


def test_the_event_reader_survives_its_connection_being_killed(service, job_id):
    path = f"/queues/orders/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        events, _ = read_in_background(stream)
        time.sleep(0.5)
        service.data.client_kill_filter(_type="normal", skipme=True)
        time.sleep(1.5)  # the event reader notices, and reconnects
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
        ("completed", '{"returnvalue": {"answer": 42}}'),
    ]
    assert kinds(results["bad"]) == [
        ("progress", '{"percent":50}'),
        log(0, "halfway"),
        ("failed", '{"failedReason": "it broke"}'),
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


# ------------------------------------------------------------------- watch tokens


def mint(service, queue: str, job_id: str, token: str = API_TOKEN) -> tuple[int, dict]:
    conn = service.server.connect()
    try:
        conn.request("POST", f"/queues/{queue}/jobs/{job_id}/events/token", None, bearer(token))
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if response.status == 200 else body.decode()
    finally:
        conn.close()


def test_a_watch_token_opens_its_jobs_stream_and_nothing_else(service, job_id):
    status, minted = mint(service, "orders", job_id)
    assert status == 200
    assert 290 <= minted["expires"] - time.time() <= 300
    token = minted["token"]
    path = f"/queues/orders/jobs/{job_id}"
    service.post(f"{path}/progress", b"7")
    with service.events(f"{path}/events?token={token}", headers={}) as stream:
        assert kinds(take(stream, 1)) == [("progress", "7")]
    # Not another job's stream, not a read of its logs, not an API token.
    add_active_job(service.data, "orders", "other", JOB_TOKEN)
    assert service.refusal(f"/queues/orders/jobs/other/events?token={token}", {}) == (
        401, "the watch token is not valid for this job"
    )  # fmt: skip
    assert service.refusal(f"{path}/logs", bearer(token))[0] == 401
    assert service.refusal(f"{path}/events?token=1.abc", {}) == (
        401, "the watch token is not valid for this job"
    )  # fmt: skip
    # Scoped API tokens mint only for their queues.
    assert mint(service, "orders", job_id, "narrow-token")[0] == 403
    # The access log never holds a watch token.
    assert token not in service.server.log.read_text()
    assert f"{path}/events?token=-" in service.server.log.read_text()


def test_a_watch_token_works_on_every_instance_sharing_the_secret(make_app, job, r):
    job()
    minting = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    response = minting.post("/queues/orders/jobs/1/events/token", headers=bearer(API_TOKEN))
    token = response.get_json()["token"]
    r.hset("bull:orders:1", "progress", "3")
    other = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    response = other.get(f"/queues/orders/jobs/1/events?token={token}", buffered=False)
    assert response.status_code == 200
    event = next(iter(EventStream(StreamedBody(response))))  # the job's state comes at once
    assert (event.event, event.data) == ("progress", "3")
    response.close()
    stranger = make_app(WATCH_TOKEN_SECRET="another secret, also 32 bytes or more").test_client()
    response = stranger.get(f"/queues/orders/jobs/1/events?token={token}")
    assert (response.status_code, response.text) == (
        401, "the watch token is not valid for this job"
    )  # fmt: skip


def test_an_expired_watch_token_is_refused(make_app, job):
    job()
    app = make_app(WATCH_TOKEN_SECRET=SECRET)
    token = watch_token(SECRET, "orders", "1", int(time.time()) - 1)
    response = app.test_client().get(f"/queues/orders/jobs/1/events?token={token}")
    assert (response.status_code, response.text) == (
        401, "the watch token has expired: ask for a new one"
    )  # fmt: skip


def test_without_a_secret_watch_tokens_are_off(client, job):
    job()
    response = client.post("/queues/orders/jobs/1/events/token", headers=bearer(API_TOKEN))
    assert (response.status_code, response.text) == (
        404, "watch tokens are off: set WATCH_TOKEN_SECRET, the same on every instance"
    )  # fmt: skip
    response = client.get("/queues/orders/jobs/1/events?token=123.abc")
    assert (response.status_code, response.text) == (
        401, "watch tokens are off on this server (WATCH_TOKEN_SECRET)"
    )  # fmt: skip


# ------------------------------------------------------------------------ at scale


@pytest.mark.server  # starts its own servers
def test_a_thousand_subscribers_share_a_bounded_number_of_connections(tmp_path):
    subscribers = 1000
    with RedisServer(tmp_path / "redis") as redis_server:
        data = redis.Redis.from_url(redis_server.url, decode_responses=True)
        add_active_job(data, "orders", "1", JOB_TOKEN)
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN,
               "WEB_CONCURRENCY": "1", "WORKER_CONNECTIONS": "1200",
               "MAX_STREAMS": "1000", "MAX_STREAMS_PER_TOKEN": "1000",
               "REDIS_MAX_CONNECTIONS": "10"}  # fmt: skip
        (tmp_path / "service").mkdir()
        with Gunicorn(tmp_path / "service", env) as server:

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
        data.close()
    assert answers == [b"HTTP/1.1 200 OK event: progress\ndata: 99"] * subscribers
    # The pool (at most REDIS_MAX_CONNECTIONS) and the event reader's one: never one each.
    assert clients <= 10 + 1


def test_sigterm_ends_open_streams_within_a_second(tmp_path, redis_url, r):
    add_active_job(r, "orders", "1", JOB_TOKEN)
    env = {"REDIS_URL": redis_url, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "1"}
    server = Gunicorn(tmp_path, env).start()
    service = Service(server, None, r)
    try:
        with service.events("/queues/orders/jobs/1/events") as stream:
            _, reader = read_in_background(stream)
            time.sleep(0.5)
            stopped = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            reader.join(10)
            ended = time.monotonic() - stopped
        server.process.wait(10)
        assert ended < 2.5  # a second, and the time to notice it
    finally:
        server.stop()


def readme_snippet(language: str, starts: str) -> str:
    """Return the README's code block in a language that holds `starts`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    [snippet] = [block for block in blocks if starts in block]
    return snippet


# Queue names and job ids the routes take, plain and less so.
TRICKY = [("orders", "1"), ("orders\na", "b"), ("q-é", 'x"y/z:1'), ("que\\", "[1]")]


def test_the_readmes_signers_sign_what_the_service_accepts(make_app, r):
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed")
    js = readme_snippet("js", "function watchToken")
    namespace: dict[str, Any] = {}
    exec(readme_snippet("python", "def watch_token"), namespace)  # noqa: S102
    expires = int(time.time()) + 60
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    signed = set()
    for queue, job_id in TRICKY:
        add_active_job(r, queue, job_id, JOB_TOKEN)
        run = subprocess.run(
            [node, "-e", js + "process.stdout.write(watchToken(...process.argv.slice(1, 4), "
             "Number(process.argv[4])));", SECRET, queue, job_id, str(expires)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        token = run.stdout
        assert token == namespace["watch_token"](SECRET, queue, job_id, expires)
        assert token == watch_token(SECRET, queue, job_id, expires)
        signed.add(token)
        path = f"/queues/{quote(queue)}/jobs/{quote(job_id, safe='')}/events?token={token}"
        response = client.get(path, buffered=False)
        assert response.status_code == 200
        response.close()
    assert len(signed) == len(TRICKY)  # no two jobs share a token
    # Fields joined by newlines would sign these two alike.
    assert watch_token(SECRET, "orders\na", "b", expires) != watch_token(
        SECRET, "orders", "a\nb", expires
    )


PAGE = "https://app.example.com"


@pytest.mark.parametrize(
    ("origin", "credential", "allowed"),
    [
        (PAGE, "watch", True),
        ("https://evil.example.com", "watch", False),
        (PAGE, "api", False),  # a browser must never hold an API token
    ],
)
def test_pages_on_allowed_origins_may_read_streams_opened_with_a_watch_token(
    make_app, job, origin, credential, allowed
):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET, WATCH_ALLOWED_ORIGINS=frozenset({PAGE}))
    token = watch_token(SECRET, "orders", "1", int(time.time()) + 60)
    path = "/queues/orders/jobs/1/events" + (f"?token={token}" if credential == "watch" else "")
    headers = {"Origin": origin, **(bearer(API_TOKEN) if credential == "api" else {})}
    response = client.test_client().get(path, headers=headers, buffered=False)
    assert response.status_code == 200
    assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
    assert response.headers["Vary"] == "Origin"
    response.close()
    # The preflight of a reconnect, which sends Last-Event-ID.
    preflight = client.test_client().options(path, headers={
        "Origin": origin, "Access-Control-Request-Headers": "last-event-id"})  # fmt: skip
    assert preflight.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
    if allowed:
        assert preflight.headers["Access-Control-Allow-Headers"] == "Last-Event-ID"


def test_without_allowed_origins_no_answer_carries_cors_headers(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    token = watch_token(SECRET, "orders", "1", int(time.time()) + 60)
    path = f"/queues/orders/jobs/1/events?token={token}"
    response = client.get(path, headers={"Origin": PAGE}, buffered=False)
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    response.close()


@pytest.mark.parametrize("value", ["app.example.com", "https://app.example.com/", "ftp://x.y"])
def test_an_allowed_origin_must_be_an_origin(monkeypatch, value):
    monkeypatch.setenv("WATCH_ALLOWED_ORIGINS", value)
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value) == (
        f"WATCH_ALLOWED_ORIGINS={value!r} must be origins like https://app.example.com, "
        "comma separated"
    )


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


def test_a_link_lives_as_long_as_its_backend_chose_up_to_the_maximum(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET, WATCH_TOKEN_MAX_SECONDS=7200).test_client()
    path = "/queues/orders/jobs/1/events"
    minted = client.post(f"{path}/token?seconds=7200", headers=bearer(API_TOKEN))
    assert minted.status_code == 200
    assert 7190 <= minted.json["expires"] - time.time() <= 7200
    too_long = client.post(f"{path}/token?seconds=7201", headers=bearer(API_TOKEN))
    assert (too_long.status_code, too_long.text) == (
        400,
        "seconds must be a whole number from 1 to 7200",
    )
    # Signed elsewhere: the same bound.
    far = watch_token(SECRET, "orders", "1", int(time.time()) + 7300)
    response = client.get(f"{path}?token={far}")
    assert (response.status_code, response.text) == (
        401,
        "the watch token lives longer than WATCH_TOKEN_MAX_SECONDS=7200 allows",
    )
    response = client.get(f"{path}?token={minted.json['token']}", buffered=False)
    assert response.status_code == 200
    response.close()


def test_a_page_exchanges_its_link_for_a_cookie_that_opens_its_job_only(make_app, job, r):
    job()
    job(job_id="2")
    r.rpush("bull:orders:1:logs", "first", "second <b>")
    client = make_app(WATCH_TOKEN_SECRET=SECRET, WATCH_SESSION_SECONDS=120).test_client()
    expires = int(time.time()) + 600
    token = watch_token(SECRET, "orders", "1", expires)
    response = client.post("/queues/orders/jobs/1/watch/session", data=token)
    summary = {"queue": "orders", "id": "1", "name": "job", "state": "active"}
    assert (response.status_code, response.json) == (
        200, {**summary, "expires": expires, "session_seconds": 120}
    )  # fmt: skip
    cookie = response.headers["Set-Cookie"]
    session = cookie.removeprefix("bullmq_watch=").split(";")[0]
    # What the page keeps is a session of its own, not the link's token, and it ends
    # before the link does.
    assert cookie.startswith("bullmq_watch=") and token not in cookie
    assert token.split(".")[-1] not in session
    attributes = {part.strip().split("=")[0] for part in cookie.split(";")[1:]}
    assert {"Max-Age", "Path", "HttpOnly", "SameSite"} <= attributes
    assert "Path=/queues/orders/jobs/1/" in cookie and "SameSite=Strict" in cookie
    assert "; Max-Age=120;" in cookie
    # The cookie opens this job's events and its lines as text, with no token in the URL.
    stream = client.get("/queues/orders/jobs/1/events", buffered=False)
    assert stream.status_code == 200
    stream.close()
    text = client.get("/queues/orders/jobs/1/logs.txt")
    assert (text.status_code, text.mimetype, text.data) == (
        200, "text/plain", b"first\nsecond <b>\n"
    )  # fmt: skip
    assert text.headers["Content-Disposition"] == "attachment; filename*=UTF-8''orders-1.log"
    # Another job's routes: the browser does not send it there, and it opens nothing.
    assert client.get("/queues/orders/jobs/2/events").status_code == 401
    client.set_cookie("bullmq_watch", session, path="/queues/orders/jobs/2/")
    refused = client.get("/queues/orders/jobs/2/logs.txt")
    assert (refused.status_code, refused.text) == (401, "the watch token is not valid for this job")
    # Nor an API route: reading a page of logs takes an API token.
    assert client.get("/queues/orders/jobs/1/logs").status_code == 401
    # A session is no link (?token=), and a link's token is no session (the cookie).
    assert client.get(f"/queues/orders/jobs/1/logs.txt?token={session}").status_code == 401
    fresh = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    fresh.set_cookie("bullmq_watch", token, path="/queues/orders/jobs/1/")
    assert fresh.get("/queues/orders/jobs/1/logs.txt").status_code == 401


def session_of(response) -> tuple[str, int]:
    """Return the session cookie a response set, and its Max-Age."""
    cookie = response.headers["Set-Cookie"]
    found = re.fullmatch(r"bullmq_watch=([^;]+);.* Max-Age=(\d+);.*", cookie)
    assert found, cookie
    return found[1], int(found[2])


def test_a_pages_session_ends_on_its_own_and_is_renewed_never_past_its_link(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET, WATCH_SESSION_SECONDS=2).test_client()
    link = watch_token(SECRET, "orders", "1", int(time.time()) + 3600)
    first, lasts = session_of(client.post("/queues/orders/jobs/1/watch/session", data=link))
    ends = int(first.split(".")[0])
    assert lasts == 2 and link not in first
    # Read before it ends, the session is renewed: a new cookie that ends later.
    wait_until(lambda: int(time.time()) >= ends - 1, 3, "a second to pass")
    renewed = client.get("/queues/orders/jobs/1/watch/session")
    assert (renewed.status_code, renewed.json["session_seconds"]) == (200, 2)
    second, _ = session_of(renewed)
    assert int(second.split(".")[0]) > ends
    # Past its end, the session opens nothing, though the link is good for an hour.
    wait_until(lambda: time.time() > int(second.split(".")[0]), 3, "the session's end")
    client.set_cookie("bullmq_watch", second, path="/queues/orders/jobs/1/")
    refused = client.get("/queues/orders/jobs/1/events")
    assert (refused.status_code, refused.text) == (
        401, "the page's session has ended: open its link again"
    )  # fmt: skip
    # Renewed, a session never outlives its link.
    client = make_app(WATCH_TOKEN_SECRET=SECRET, WATCH_SESSION_SECONDS=3600).test_client()
    link = watch_token(SECRET, "orders", "1", int(time.time()) + 30)
    assert session_of(client.post("/queues/orders/jobs/1/watch/session", data=link))[1] <= 30
    renewed = client.get("/queues/orders/jobs/1/watch/session")
    assert 0 < session_of(renewed)[1] <= 30 and renewed.json["session_seconds"] <= 30


def test_a_session_altered_by_hand_opens_nothing(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET, WATCH_SESSION_SECONDS=60).test_client()
    link = watch_token(SECRET, "orders", "1", int(time.time()) + 120)
    session, _ = session_of(client.post("/queues/orders/jobs/1/watch/session", data=link))
    ends, expires, share, minter, signature = session.split(".")
    later = str(int(ends) + 86_400)
    for forged in (
        f"{later}.{expires}.{share}.{minter}.{signature}",  # a longer session
        f"{ends}.{int(expires) + 86_400}.{share}.{minter}.{signature}",  # a longer link
        f"{ends}.{expires}.{'0' * 32}.{minter}.{signature}",  # another share
        f"{ends}.{expires}.{share}.{'1' * 32}.{signature}",  # another minter
        session[:-1],
    ):
        client.set_cookie("bullmq_watch", forged, path="/queues/orders/jobs/1/")
        refused = client.get("/queues/orders/jobs/1/watch/session")
        assert (refused.status_code, refused.text) == (
            401, "the watch token is not valid for this job"
        )  # fmt: skip


def test_a_page_reads_its_jobs_name_and_state_by_its_cookie(make_app, job, r):
    job(job_id="1", name="resize")
    r.hset("bull:orders:2", "name", "queued")
    job(job_id="3", name="done")
    r.zadd("bull:orders:completed", {"3": 1})
    r.hset("bull:orders:3", "returnvalue", "7")
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    expires = int(time.time()) + 600
    answers = {}
    for job_id in ("1", "2", "3"):
        token = watch_token(SECRET, "orders", job_id, expires)
        assert (
            client.post(f"/queues/orders/jobs/{job_id}/watch/session", data=token).status_code
            == 200
        )
        response = client.get(f"/queues/orders/jobs/{job_id}/watch/session")
        assert response.status_code == 200
        answers[job_id] = (response.json["name"], response.json["state"], response.json["expires"])
    # A worker holds 1 (its lock); 2 waits; 3 completed.
    assert answers == {
        "1": ("resize", "active", expires),
        "2": ("queued", "waiting", expires),
        "3": ("done", "completed", expires),
    }
    # An API token reads it too; no watch token, no expiry.
    response = client.get("/queues/orders/jobs/1/watch/session", headers=bearer(API_TOKEN))
    assert (response.status_code, response.json["expires"]) == (200, None)
    # No credential: 401; a job that is not there: 404.
    fresh = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    assert fresh.get("/queues/orders/jobs/1/watch/session").status_code == 401
    token = watch_token(SECRET, "orders", "9", expires)
    missing = fresh.post("/queues/orders/jobs/9/watch/session", data=token)
    assert (missing.status_code, missing.text) == (404, "job '9' not found in queue 'orders'")
    assert "Set-Cookie" not in missing.headers


def test_the_watch_page_is_served_with_strict_headers(make_app):
    client = make_app().test_client()
    response = client.get("/queues/orders/jobs/a%3Cb%3E%22x/watch")
    assert (response.status_code, response.mimetype) == (200, "text/html")
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "'unsafe-inline'" not in policy
    assert "connect-src 'self';" in policy and policy.endswith("frame-ancestors 'none'")
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"
    # The job id is text in the page, escaped; the page holds no job data.
    assert "<title>orders / a&lt;b&gt;&#34;x</title>" in response.text
    assert '<script src="watch.js" defer></script>' in response.text
    for name, mimetype in (("watch.js", "text/javascript"), ("watch.css", "text/css")):
        with client.get(f"/queues/orders/jobs/a%3Cb%3E%22x/{name}") as asset:
            assert (asset.status_code, asset.mimetype) == (200, mimetype)
            assert asset.data == (ROOT / "static" / name).read_bytes()
            assert asset.headers["X-Content-Type-Options"] == "nosniff"
    refused = client.get("/queues/orders/jobs/1/watch?token=1.x")
    assert (refused.status_code, refused.text) == (
        400,
        "unknown query parameter 'token': this route takes none",
    )
    framed = make_app(
        WATCH_FRAME_ANCESTORS=frozenset({"https://b.example", "https://a.example"})
    ).test_client()
    policy = framed.get("/queues/orders/jobs/1/watch").headers["Content-Security-Policy"]
    assert policy.endswith("frame-ancestors https://a.example https://b.example")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the watch token is not valid for this job"),
        (b"12.abc", "the watch token is not valid for this job"),
    ],
)
def test_a_page_with_a_bad_link_gets_no_cookie(make_app, job, body, message):
    job()
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    response = client.post("/queues/orders/jobs/1/watch/session", data=body)
    assert (response.status_code, response.text) == (401, message)
    assert "Set-Cookie" not in response.headers


def test_logs_as_text_pages_through_every_line(make_app, job, r):
    job()
    lines = [f"line {n} " + "x" * 1000 for n in range(1000)]
    r.rpush("bull:orders:1:logs", *lines)
    client = make_app(MAX_PAGE_BYTES=50_000).test_client()
    response = client.get("/queues/orders/jobs/1/logs.txt", headers=bearer(API_TOKEN))
    assert response.status_code == 200
    assert response.text == "".join(f"{line}\n" for line in lines)
    # A page on another origin must not run a job's line as a script, or read it.
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cross-Origin-Resource-Policy"] == "same-origin"
    missing = client.get("/queues/orders/jobs/9/logs.txt", headers=bearer(API_TOKEN))
    assert (missing.status_code, missing.text) == (404, "job '9' not found in queue 'orders'")


@pytest.mark.parametrize(
    ("said", "path"),
    [
        ("/bullmq/queues/orders/jobs/a%3Bb/", "/bullmq/queues/orders/jobs/a%3Bb/"),
        ("/bullmq/queues/orders/jobs/a;b/", "/bullmq/queues/orders/jobs/"),
        (";/queues/orders/jobs/a;b/", "/queues/orders/jobs/a%3Bb/"),  # not a path: unused
        ("/elsewhere/", "/queues/orders/jobs/a%3Bb/"),  # not this job's: unused
        ("/queues/orders/jobs/a;b/\x01x", "/queues/orders/jobs/a%3Bb/"),
    ],
)
def test_the_cookie_path_is_the_one_the_page_says_when_it_names_the_job(make_app, job, said, path):
    job(job_id="a;b")
    client = make_app(WATCH_TOKEN_SECRET=SECRET).test_client()
    token = watch_token(SECRET, "orders", "a;b", int(time.time()) + 60)
    response = client.post(
        "/queues/orders/jobs/a%3Bb/watch/session", data=token, headers={"X-Watch-Path": said}
    )
    assert response.status_code == 200
    assert f"; Path={path}" in response.headers["Set-Cookie"]


def test_the_cookie_path_is_the_jobs_path_as_the_client_wrote_it(service, job_id):
    """Under gunicorn the path is the one the browser asked for, which it matches the
    cookie against: escapes as it wrote them."""
    add_active_job(service.data, "orders", f"{job_id}/a b", JOB_TOKEN)
    token = watch_token(SECRET, "orders", f"{job_id}/a b", int(time.time()) + 60)
    conn = service.server.connect()
    try:
        conn.request("POST", f"/queues/orders/jobs/{job_id}%2Fa%20b/watch/session", token)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert f"Path=/queues/orders/jobs/{job_id}%2Fa%20b/;" in response.getheader("Set-Cookie")
