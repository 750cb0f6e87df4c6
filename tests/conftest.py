"""Fixtures: a real Redis server for the whole run, a clean database and app per test."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from dev import (
    EventStream,
    RedisServer,
    ServerSentEvent,
    add_active_job,
    harness_environ,
    redis_server_version,
)

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "test-api-token"
JOB_TOKEN = "0b5d8a34-6c2e-4c44-9a4e-3f0f1f6b1e2a:1"  # what a BullMQ worker sets


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the URL of a Redis server: REDIS_URL if set, else a throwaway one."""
    url = os.environ.get("REDIS_URL")
    if url:
        with redis.Redis.from_url(url) as client:
            if client.dbsize():
                pytest.exit(f"REDIS_URL={url} is not empty, and the tests flush it", 2)
        yield url
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(autouse=True)
def no_settings_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear the service's settings from the environment: each test sets its own."""
    keep = harness_environ()
    for name in os.environ.keys() - keep.keys():
        monkeypatch.delenv(name)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """Yield a client of the test database, emptied before the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def make_app(redis_url: str, r: redis.Redis) -> Iterator[Callable[..., Flask]]:
    """Yield a function that makes a fresh app against the test database, with the API
    token and any other settings given; close their connections after the test."""
    apps: list[Flask] = []

    def make(**settings: Any) -> Flask:
        base = {"REDIS_URL": redis_url, "AUTH_TOKENS": [API_TOKEN], "TESTING": True}
        apps.append(create_app({**base, **settings}))
        return apps[-1]

    yield make
    for app in apps:
        watcher = app.extensions["bullmq_http.watcher"]
        watcher.stop()
        if watcher.thread is not None:
            watcher.thread.join(10)  # it closes its connections on the way out
        app.extensions["bullmq_http"].close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """Return a fresh app against the test database."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Return a test client of the app."""
    return app.test_client()


@pytest.fixture
def job(r: redis.Redis) -> Callable[..., str]:
    """Return a function that lays out an active job (queue "orders", id "1") in Redis."""

    def make(queue: str = "orders", job_id: str = "1", token: str = JOB_TOKEN, **kw: Any) -> str:
        return add_active_job(r, queue, job_id, token, **kw)

    return make


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


def pytest_report_header() -> str:
    """Name the Redis server binary the run starts (REDIS_SERVER chooses it)."""
    return f"redis server: {redis_server_version()}"
