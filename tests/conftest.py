"""Fixtures: a real Redis server for the whole run, a clean database and app per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from harness.clients import add_active_job
from harness.servers import Gunicorn, RedisServer, free_port, harness_environ, redis_server_version
from tests.helpers import API_TOKEN, JOB_TOKEN, WATCH_SECRET, Service


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the URL of a Redis server: REDIS_URL if set (an empty database, left as
    empty as it was found), else a throwaway one."""
    url = os.environ.get("REDIS_URL")
    if url:
        with redis.Redis.from_url(url) as client:
            if client.dbsize():
                pytest.exit(f"REDIS_URL={url} is not empty, and the tests flush it", 2)
            try:
                yield url
            finally:
                client.flushdb()
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
def serve(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., Gunicorn]]:
    """Yield a function that serves the app under gunicorn, with its production config,
    against the test database: the API token, one worker and a TCP port on loopback,
    then the settings given (as environment variables); `args` go to gunicorn. Each
    server is stopped after the test."""
    servers: list[Gunicorn] = []

    def start(*, args: Sequence[str] = (), **settings: str) -> Gunicorn:
        directory = tmp_path / f"gunicorn-{len(servers)}"
        directory.mkdir()
        env = {"REDIS_URL": redis_url, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "1"}
        server = Gunicorn(
            directory, {**env, **settings}, bind=f"127.0.0.1:{free_port()}", args=args
        )
        servers.append(server)
        return server.start()

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def job(r: redis.Redis) -> Callable[..., str]:
    """Return a function that lays out an active job (queue "orders", id "1") in Redis."""

    def make(queue: str = "orders", job_id: str = "1", token: str = JOB_TOKEN, **kw: Any) -> str:
        return add_active_job(r, queue, job_id, token, **kw)

    return make


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service under gunicorn, with a Redis server of its own, for a module's tests:
    API tokens from a file (dashboard reads every queue, narrow other-*), watch tokens on."""
    directory = tmp_path_factory.mktemp("events")
    tokens = directory / "tokens"
    tokens.write_text(f"dashboard {API_TOKEN} * read,work\nnarrow narrow-token other-*\n")
    with RedisServer(directory / "redis") as redis_server:
        env = {
            "REDIS_URL": redis_server.url,
            "AUTH_TOKENS_FILE": str(tokens),
            "WATCH_TOKEN_SECRET": WATCH_SECRET,
            "WEB_CONCURRENCY": "1",
        }
        data = redis.Redis.from_url(redis_server.url, decode_responses=True)
        with Gunicorn(directory, env) as server:
            yield Service(server, redis_server, data)
        data.close()


@pytest.fixture
def job_id(service: Service) -> str:
    """A fresh active job in queue orders, with its id."""
    job_id = uuid.uuid4().hex[:8]
    add_active_job(service.data, "orders", job_id, JOB_TOKEN)
    return job_id


def pytest_report_header() -> str:
    """Name the Redis server binary the run starts (REDIS_SERVER chooses it)."""
    return f"redis server: {redis_server_version()}"


# The fixtures that start servers (Redis, gunicorn, nginx, a browser, a container), here
# and in the modules that have their own: a test that uses one is marked `server`.
SERVER_FIXTURES = {"redis_url", "service", "stack", "nginx", "podman", "site", "browser"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `server` every test that starts or needs a server through a fixture (a test
    that starts one itself is marked where it is written): `make check` runs the
    others, `make test` all."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
