"""What the tests share that is not a fixture: tokens, and helpers to read what the
service answered and Redis holds."""

from __future__ import annotations

import itertools
import os
import queue
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
from flask.testing import FlaskClient

from harness.clients import EventStream, ServerSentEvent, http_call
from harness.servers import Gunicorn, RedisServer

ROOT = Path(__file__).resolve().parent.parent
# What a bearer token that is not an API token is told on an API token's route.
NOT_AN_API_TOKEN = (
    "not a valid API token: this route takes an API token (AUTH_TOKENS), not a job's lock token"
)
API_TOKEN = "test-api-token"
JOB_TOKEN = "0b5d8a34-6c2e-4c44-9a4e-3f0f1f6b1e2a:1"  # what a BullMQ worker sets


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Return everything the database holds, key by key, to compare before and after."""
    contents: dict[str, Any] = {}
    for key in r.scan_iter():
        kind = r.type(key)
        if kind == "hash":
            contents[key] = r.hgetall(key)
        elif kind == "list":
            contents[key] = r.lrange(key, 0, -1)
        elif kind == "stream":
            contents[key] = r.xrange(key)
        elif kind == "string":
            contents[key] = r.get(key)
        else:
            contents[key] = kind
    return contents


def unavailable(reason: str) -> NoReturn:
    """Skip a test for what this machine lacks; under CI=true, where every test must
    run (the project's own files install what they need), fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI runs every test")
    pytest.skip(reason)


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


def post(
    client: FlaskClient,
    url: str,
    body: bytes | str,
    content_type: str | None = None,
    token: str = JOB_TOKEN,
) -> Any:
    """Post a body through a test client, with `token` as its bearer token (by default
    the job token); return the response."""
    return client.post(url, data=body, content_type=content_type, headers=bearer(token))


class StreamedBody:
    """The body of a test client's streamed response, read line by line, as the next
    event of a stream waits: next_event bounds the wait."""

    def __init__(self, response: Any) -> None:
        self.chunks = iter(response.response)
        self.buffer = b""

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = next(self.chunks, None)
            if chunk is None:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


def open_events(client: FlaskClient, path: str) -> Iterator[ServerSentEvent]:
    """Open a job's stream of events through a test client, with the API token."""
    response = client.get(path, headers=bearer(API_TOKEN), buffered=False)
    assert response.status_code == 200, response.get_data()
    return iter(EventStream(StreamedBody(response)))


def next_event(events: Iterator[ServerSentEvent], timeout: float = 10.0) -> ServerSentEvent:
    """Return the stream's next event, failing after `timeout` seconds without one."""
    arrived: queue.Queue[ServerSentEvent | None] = queue.Queue()
    threading.Thread(target=lambda: arrived.put(next(events, None)), daemon=True).start()
    try:
        event = arrived.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no event within {timeout:g} seconds") from None
    assert event is not None, "the stream ended"
    return event


# The watch tokens' secret of the servers the tests start.
WATCH_SECRET = "a secret the instances share, 32 bytes or more"


@dataclass
class Service:
    """The service under gunicorn with a Redis server of its own (conftest's `service`)."""

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
            # What a proxy in front relies on: nginx passes each event at once, on
            # X-Accel-Buffering (deploy/nginx.conf), and no cache keeps one.
            assert response.getheader("X-Accel-Buffering") == "no"
            assert response.getheader("Cache-Control") == "no-cache"
            yield EventStream(response)
        finally:
            conn.close()

    def refusal(self, path: str, headers: dict[str, str]) -> tuple[int, str]:
        """GET a path that the service refuses; return the status and the reason."""
        answer = http_call(self.server.connect(), "GET", path, headers=headers)
        return answer.status, answer.text


def take(stream: EventStream, count: int) -> list[ServerSentEvent]:
    """Return the next `count` events of a stream."""
    return list(itertools.islice(stream, count))


def kinds(events: list[ServerSentEvent]) -> list[tuple[str, str]]:
    """Return each event's kind and data."""
    return [(event.event, event.data) for event in events]


# What a user reads: the README, and the documents it links to.
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


def readme_snippet(language: str, holding: str) -> str:
    """Return the one code block in a language, of the README and docs/, that holds
    `holding`."""
    text = "\n".join(path.read_text() for path in DOCS)
    blocks = re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)
    [snippet] = [block for block in blocks if holding in block]
    return snippet


@contextmanager
def one_crowded_worker(directory: Path, **settings: str) -> Iterator[tuple[Gunicorn, redis.Redis]]:
    """Serve the app on one gunicorn worker of 1,200 connections, holding up to 1,000
    long requests, with a pool of 10 Redis connections to a Redis server of its own;
    yield the server and a client of that Redis."""
    with RedisServer(directory / "redis") as redis_server:
        data = redis.Redis.from_url(redis_server.url, decode_responses=True)
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN,
               "WEB_CONCURRENCY": "1", "WORKER_CONNECTIONS": "1200", "MAX_STREAMS": "1000",
               "REDIS_MAX_CONNECTIONS": "10", **settings}  # fmt: skip
        (directory / "service").mkdir()
        try:
            with Gunicorn(directory / "service", env) as server:
                yield server, data
        finally:
            data.close()
