"""The real service under gunicorn, once per queue prefix, for the BullMQ libraries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dev import Gunicorn, free_port
from tests.conftest import API_TOKEN

# The default, a plain other one, and a Redis Cluster hash tag: set on both sides.
PREFIXES = ["bull", "acme", "{jobs}"]


@dataclass(frozen=True)
class Service:
    url: str
    prefix: str
    redis_url: str


@pytest.fixture(scope="session", params=PREFIXES)
def service(request, redis_url, tmp_path_factory) -> Iterator[Service]:
    """Run the service under gunicorn with its production config, for one prefix."""
    prefix = request.param
    bind = f"127.0.0.1:{free_port()}"
    env = {
        "REDIS_URL": redis_url,
        "QUEUE_PREFIX": prefix,
        "AUTH_TOKENS": API_TOKEN,
        "WEB_CONCURRENCY": "1",
    }
    with Gunicorn(tmp_path_factory.mktemp("service"), env, bind=bind):
        yield Service(url=f"http://{bind}", prefix=prefix, redis_url=redis_url)
