"""The clients the tests and the benchmark play: a BullMQ worker holding a job
(add_active_job lays it out as BullMQ does), an HTTP connection over a unix socket, and
a reader of server-sent events that parses them as a browser's EventSource does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from bullmq_http.event_stream import RETRY_MS
from harness.servers import Gunicorn


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
