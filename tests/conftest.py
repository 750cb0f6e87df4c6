"""Fixtures: a real Redis server for the whole run, a clean database and app per test."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from app import create_app
from dev import RedisServer

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


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """Yield a client of the test database, emptied before the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def app(redis_url: str, r: redis.Redis):
    """Return a fresh app against the test database."""
    return create_app({"REDIS_URL": redis_url, "AUTH_TOKENS": [API_TOKEN], "TESTING": True})


@pytest.fixture
def client(app):
    """Return a test client of the app."""
    return app.test_client()


def add_active_job(
    r: redis.Redis,
    queue: str,
    job_id: str,
    token: str,
    *,
    opts: Mapping[str, Any] | None = None,
    lock_ms: int = 30_000,
    prefix: str = "bull",
) -> str:
    """Lay out a job as a BullMQ worker holds it: hash, active list, lock; return its key."""
    key = f"{prefix}:{queue}:{job_id}"
    now = int(time.time() * 1000)
    r.hset(
        key,
        mapping={
            "name": "test-job",
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


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------- real gunicorn


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 keep-alive connection over a unix socket."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect_to(bind: str) -> http.client.HTTPConnection:
    """Open an HTTP connection to a gunicorn BIND address (host:port or unix:path)."""
    if bind.startswith("unix:"):
        return UnixHTTPConnection(bind.removeprefix("unix:"))
    host, port = bind.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=10)


@contextmanager
def gunicorn(
    directory: Path, env: Mapping[str, str], bind: str | None = None
) -> Iterator[Callable[[], http.client.HTTPConnection]]:
    """Run the app under gunicorn with its production config, by default on a unix socket.

    Yields a factory of connections to it; its output goes to directory/gunicorn.log.
    """
    bind = bind or f"unix:{directory / 'gunicorn.sock'}"
    log = directory / "gunicorn.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
            cwd=ROOT,
            env={**os.environ, **env, "BIND": bind},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            conn = connect_to(bind)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.05)
            finally:
                conn.close()
        yield lambda: connect_to(bind)
    finally:
        process.terminate()
        process.wait(timeout=30)
