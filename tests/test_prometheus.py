"""The alert rules of docs/operations.md, loaded into a real Prometheus scraping the service."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.clients import add_active_job
from harness.servers import Gunicorn, RedisServer, dying_with_this_process, free_port, wait_until
from tests.helpers import JOB_TOKEN, ROOT, unavailable

pytestmark = pytest.mark.server  # every test here starts its own servers

MANUAL = ROOT / "docs" / "operations.md"


def readme_alert_rules() -> str:
    """Return the alert rules as the operator's manual gives them."""
    blocks = re.findall(r"```yaml\n(.*?)```", MANUAL.read_text(), re.DOTALL)
    [rules] = [block for block in blocks if block.startswith("groups:")]
    return rules


class Prometheus:
    """A Prometheus server scraping one target every second, with the given rules."""

    def __init__(self, directory: Path, target: str, rules: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            unavailable("prometheus is not installed (make test installs it where apt-get can)")
        (directory / "rules.yml").write_text(rules)
        (directory / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{directory / 'rules.yml'}]\n"
            "scrape_configs:\n"
            f"  - {{job_name: bullmq-http, static_configs: [{{targets: ['{target}']}}]}}\n"
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.log = (directory / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            dying_with_this_process([
                str(binary),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={self.address}",
            ]),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.address}/api/v1/{path}", timeout=5) as answer:
            return json.load(answer)["data"]

    def alerts(self) -> dict[str, str]:
        """Return the alerts pending or firing, by name, with their state."""
        return {
            alert["labels"]["alertname"]: alert["state"] for alert in self.api("alerts")["alerts"]
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def prometheus_and_service(tmp_path: Path) -> Iterator[tuple[Prometheus, Gunicorn, RedisServer]]:
    with RedisServer(tmp_path / "redis") as redis_server:
        with redis.Redis.from_url(redis_server.url) as data:
            add_active_job(data, "orders", "1", JOB_TOKEN)
        env = {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "2"}
        (tmp_path / "service").mkdir()
        bind = f"127.0.0.1:{free_port()}"
        with Gunicorn(tmp_path / "service", env, bind=bind) as server:
            server.wait_for_workers(2)
            (tmp_path / "prometheus").mkdir()
            prometheus = Prometheus(tmp_path / "prometheus", bind, readme_alert_rules())
            try:
                yield prometheus, server, redis_server
            finally:
                prometheus.stop()


def test_the_readme_alerts_see_the_first_redis_outage(prometheus_and_service):
    prometheus, server, redis_server = prometheus_and_service

    def scraped_twice() -> bool:
        try:
            found = prometheus.api("query?query=count_over_time(up[1m])")["result"]
        except OSError:
            return False  # not listening yet
        return bool(found) and float(found[0]["value"][1]) >= 2

    wait_until(scraped_twice, 30, "Prometheus to scrape the service twice")
    assert prometheus.alerts() == {}
    # The first outage since start: a burst of 503s between two scrapes, then quiet.
    redis_server.stop()
    for _ in range(10):
        assert server.send("POST", "/queues/orders/jobs/1/progress", b"1", JOB_TOKEN) == 503
    # Both alerts on errors see it (pending, until their `for` has passed).
    wait_until(
        lambda: {"BullmqHttpErrors", "BullmqHttpRedisUnavailable"} <= prometheus.alerts().keys(),
        30,
        "the alerts to see the outage",
    )
