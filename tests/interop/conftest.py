"""The real service under gunicorn, once per Redis set-up, for the BullMQ libraries."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from harness.servers import ClusterServers, Gunicorn, free_port
from tests.helpers import API_TOKEN, unavailable

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def node() -> str:
    """Return the node binary, with the BullMQ library installed beside this file;
    without them, skip locally but fail in CI."""
    found = shutil.which("node")
    installed = (HERE / "node_modules" / "bullmq").is_dir()
    if found and installed:
        return found
    reason = "node is not installed" if not found else "run `make test` to install tests/interop"
    unavailable(f"the Node suites cannot run: {reason}")


# Prefixes on one Redis server: the default, a plain other one, and a hash tag; then a
# Redis Cluster, where BullMQ needs a hash-tagged prefix. Each set on both sides.
SETUPS = ["bull", "acme", "{jobs}", "cluster {bull}"]


@dataclass(frozen=True)
class Service:
    url: str
    prefix: str
    redis_url: str = ""  # one Redis server
    cluster_nodes: str = ""  # or a cluster's seeds, host:port,...

    def data(self) -> redis.Redis | redis.RedisCluster:
        """Return a client of the Redis the service uses, for checking what it holds."""
        if self.cluster_nodes:
            host, port = self.cluster_nodes.split(",")[0].split(":")
            return redis.RedisCluster(host=host, port=int(port), decode_responses=True)
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def bullmq_connection(self) -> str | AsyncRedisCluster:
        """Return a connection for one bullmq (Python) Queue, Worker or QueueEvents."""
        if self.cluster_nodes:
            host, port = self.cluster_nodes.split(",")[0].split(":")
            return AsyncRedisCluster(host=host, port=int(port), decode_responses=True)
        return self.redis_url


def all_keys(client: redis.Redis | redis.RedisCluster, pattern: str) -> list[bytes | str]:
    """Return the keys matching a pattern, from every master of a cluster."""
    if isinstance(client, redis.RedisCluster):
        return client.keys(pattern, target_nodes=redis.RedisCluster.PRIMARIES)
    return client.keys(pattern)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[ClusterServers]:
    with ClusterServers(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session", params=SETUPS)
def service(request, redis_url, tmp_path_factory) -> Iterator[Service]:
    """Run the service under gunicorn with its production config, for one set-up."""
    *cluster, prefix = request.param.split()
    env = {"QUEUE_PREFIX": prefix, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "1"}
    env["STALLED_INTERVAL_MS"] = "1000"  # BullMQ's stalled check every second, not 30
    if cluster:
        seeds = ",".join(request.getfixturevalue("redis_cluster").seeds)
        env |= {"REDIS_CLUSTER": "1", "REDIS_CLUSTER_NODES": seeds}
        where = {"cluster_nodes": seeds}
    else:
        env |= {"REDIS_URL": redis_url}
        where = {"redis_url": redis_url}
    bind = f"127.0.0.1:{free_port()}"
    with Gunicorn(tmp_path_factory.mktemp("service"), env, bind=bind):
        yield Service(url=f"http://{bind}", prefix=prefix, **where)


@pytest.fixture
def data(service, r) -> Iterator[redis.Redis | redis.RedisCluster]:
    """Yield a client of the service's Redis, emptied before the test."""
    client = service.data()
    if service.cluster_nodes:
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    yield client
    client.close()
