"""The Node BullMQ suite (bullmq.test.mjs), run against the service once per prefix."""

import os
import subprocess
from pathlib import Path

from tests.helpers import API_TOKEN
from tests.interop.conftest import all_keys

HERE = Path(__file__).resolve().parent


def test_node_bullmq_suite(node, service, data):
    # Each scenario has its own deadline in the suite; --test-force-exit ends node even
    # when a client a failed scenario opened is still connected.
    command = [node, "--test", "--test-force-exit", "--test-reporter=tap", "bullmq.test.mjs"]
    result = subprocess.run(
        command,
        cwd=HERE,
        env={
            **os.environ,
            "BULLMQ_HTTP_URL": service.url,
            "REDIS_URL": service.redis_url,
            "REDIS_CLUSTER_NODES": service.cluster_nodes,
            "QUEUE_PREFIX": service.prefix,
            "API_TOKEN": API_TOKEN,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
    assert "# pass 10" in result.stdout  # every scenario ran
    # What the suite wrote is in Redis under this prefix, and under no other.
    assert all_keys(data, f"{service.prefix}:interop-*:events")
    for other in {"bull", "acme", "{jobs}", "{bull}"} - {service.prefix}:
        assert not all_keys(data, f"{other}:*")
