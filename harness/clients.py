"""The clients the tests and the benchmark play: a BullMQ worker holding a job
(add_active_job lays it out as BullMQ does); one HTTP request on a connection of its
own (http_call), or as the bytes a socket sends (raw_request); and a reader of
server-sent events that parses them as a browser's EventSource does.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis

from bullmq_http.event_stream import RETRY_MS

if TYPE_CHECKING:
    from harness.servers import Gunicorn


@dataclass(frozen=True)
class Answer:
    """A whole HTTP response."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def http_call(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> Answer:
    """Send one request on `conn` (a connection of its own, closed after), with `token`
    as its bearer token if given; return the whole answer."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body, sent)
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()


def raw_request(
    method: str, path: str, token: str | None = None, body: bytes | None = None, head: str = ""
) -> bytes:
    """Return one HTTP/1.1 request as the bytes a socket sends: with `token` as its
    bearer token, `head` holding further header lines as sent (each ending in CRLF), and
    a body with its Content-Length."""
    lines = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if token is not None:
        lines += f"Authorization: Bearer {token}\r\n"
    if body is not None:
        lines += f"Content-Length: {len(body)}\r\n"
    return f"{lines}{head}\r\n".encode() + (body or b"")


def add_active_job(
    r: redis.Redis | redis.RedisCluster,
    queue: str,
    job_id: str,
    token: str,
    *,
    opts: Mapping[str, Any] | None = None,
    lock_ms: int | None = 30_000,
    prefix: str = "bull",
    name: str = "job",
) -> str:
    """Lay out a job as a BullMQ worker holds it: hash, active list, and a lock that
    expires in lock_ms (None: never); return the job's key."""
    key = f"{prefix}:{queue}:{job_id}"
    now = int(time.time() * 1000)
    r.hset(
        key,
        mapping={
            "name": name,
            "data": json.dumps({"n": 1}),
            "opts": json.dumps({"attempts": 1, **(opts or {})}),
            "timestamp": now,
            "delay": 0,
            "priority": 0,
            "processedOn": now,
            "ats": 1,
        },
    )
    r.lpush(f"{prefix}:{queue}:active", job_id)
    r.set(f"{key}:lock", token, px=lock_ms)
    return key


@dataclass(frozen=True)
class ServerSentEvent:
    """One event of a text/event-stream, as a browser's EventSource hands it on."""

    id: str
    event: str
    data: str


class Lines(Protocol):
    """A response body read line by line: an http.client.HTTPResponse, say."""

    def readline(self) -> bytes: ...


class EventStream:
    """A reader of a text/event-stream response, parsing it as EventSource does."""

    def __init__(self, response: Lines) -> None:
        self.response = response
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self.comments: list[str] = []

    def __iter__(self) -> Iterator[ServerSentEvent]:
        """Yield each event as it arrives; end when the server ends the stream."""
        event, data = "message", list[str]()
        while line := self.response.readline():
            text = line.decode().rstrip("\r\n")
            if not text:
                if data:
                    yield ServerSentEvent(self.last_event_id, event, "\n".join(data))
                event, data = "message", []
                continue
            name, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if not name:
                self.comments.append(value)
            elif name == "id":
                self.last_event_id = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "retry" and value.isdigit():
                self.retry_ms = int(value)


async def open_raw_stream(
    server: Gunicorn, path: str, token: str
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream of events on a bare connection, as one of many clients at once;
    return the response's head, up to the stream's first field, and the connection."""
    if server.bind.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(server.bind.removeprefix("unix:"))
    else:
        host, port = server.bind.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: bullmq-http\r\nAuthorization: Bearer {token}\r\n\r\n"
        .encode()
    )  # fmt: skip
    return await reader.readuntil(f"retry: {RETRY_MS}\n\n".encode()), reader, writer
