"""What the tests share that is not a fixture: tokens, and helpers to read what the
service answered and Redis holds."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
from flask.testing import FlaskClient

from harness.clients import EventStream, ServerSentEvent

ROOT = Path(__file__).resolve().parent.parent
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
