"""GET /metrics: Prometheus's text format, every gunicorn worker's figures added up."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from harness.clients import add_active_job
from harness.servers import Gunicorn, RedisServer, wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, bearer

PROGRESS = "/queues/<queue>/jobs/<path:job_id>/progress"
LOGS = "/queues/<queue>/jobs/<path:job_id>/logs"


def scrape(server: Gunicorn) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Return every sample /metrics gives, by name and labels."""
    conn = server.connect()
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/plain; version=")
        text = response.read().decode()
    finally:
        conn.close()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    """Return one sample's value, 0 when there is none."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples, route: str, method: str, status: str) -> float:
    return value(samples, "bullmq_http_requests_total", route=route, method=method, status=status)


def scripts(samples, script: str, outcome: str) -> float:
    return value(samples, "bullmq_http_script_outcomes_total", script=script, outcome=outcome)


ACCESS_LINE = re.compile(r'\[[^]]+\] \[(\d+)\] \S+ "')


def serving_pids(server: Gunicorn) -> Counter[str]:
    """Return how many access-log lines each worker wrote."""
    lines = server.log.read_text().splitlines()
    return Counter(found[1] for line in lines if (found := ACCESS_LINE.match(line)))


@pytest.fixture
def stack(tmp_path):
    with RedisServer(tmp_path / "redis") as redis_server:
        data = redis.Redis.from_url(redis_server.url, decode_responses=True)
        add_active_job(data, "orders", "1", JOB_TOKEN)
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "2"}
        server = Gunicorn(tmp_path / "service", env)
        server.directory.mkdir()
        server.start()
        server.wait_for_workers(2)
        try:
            yield redis_server, data, server
        finally:
            server.stop()
            data.close()


def test_counts_add_up_across_workers(stack):
    redis_server, data, server = stack
    job = "/queues/orders/jobs/1"
    statuses: Counter[tuple[str, str, int]] = Counter()

    def mix():
        """Send a known mix of requests, each on its own connection."""
        for _ in range(5):
            statuses[PROGRESS, "POST", server.send("POST", f"{job}/progress", b"7", JOB_TOKEN)] += 1
            statuses[LOGS, "POST", server.send("POST", f"{job}/logs", b"a line", JOB_TOKEN)] += 1
        for _ in range(3):
            statuses[PROGRESS, "POST", server.send("POST", f"{job}/progress", b"7", "wrong")] += 1
        for _ in range(2):
            statuses[
                LOGS, "GET", server.send("GET", "/queues/orders/jobs/2/logs", None, API_TOKEN)
            ] += 1
            statuses[LOGS, "GET", server.send("GET", f"{job}/logs")] += 1
            statuses["unmatched", "GET", server.send("GET", "/nowhere")] += 1

    # Until both workers have served some of it: the sums then cover two processes.
    wait_until(lambda: mix() or len(serving_pids(server)) == 2, 30, "both workers to serve")
    rounds = statuses[PROGRESS, "POST", 200] // 5
    assert statuses == {
        (PROGRESS, "POST", 200): 5 * rounds,
        (LOGS, "POST", 200): 5 * rounds,
        (PROGRESS, "POST", 401): 3 * rounds,
        (LOGS, "GET", 404): 2 * rounds,
        (LOGS, "GET", 401): 2 * rounds,
        ("unmatched", "GET", 404): 2 * rounds,
    }
    assert data.llen("bull:orders:1:logs") == 5 * rounds

    # Redis goes away: writes answer 503, counted by status and by the error's kind.
    redis_server.stop()
    outage = [server.send("POST", f"{job}/progress", b"8", JOB_TOKEN) for _ in range(4)]
    assert outage == [503] * 4

    samples = scrape(server)
    for (route, method, status), count in statuses.items():
        assert requests(samples, route, method, str(status)) == count, (route, method, status)
    assert requests(samples, PROGRESS, "POST", "503") == 4
    errors = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "bullmq_http_redis_errors_total" and value
    }  # the others stay 0
    assert errors == {frozenset({("kind", "ConnectionError")}): 4}
    assert scripts(samples, "set_progress", "written") == 5 * rounds
    assert scripts(samples, "add_log", "written") == 5 * rounds
    assert scripts(samples, "set_progress", "not_lock_holder") == 3 * rounds
    assert scripts(samples, "read_logs", "no_such_job") == 2 * rounds
    # A histogram observation per request, by route.
    durations = value(samples, "bullmq_http_request_duration_seconds_count", route=PROGRESS)
    assert durations == 5 * rounds + 3 * rounds + 4
    sizes = value(samples, "bullmq_http_request_body_bytes_sum", route=LOGS)
    assert sizes == len(b"a line") * 5 * rounds
    # 404 and 401 bodies for the reads, "OK" for each line written.
    assert value(samples, "bullmq_http_response_body_bytes_sum", route=LOGS) > 10 * rounds
    assert value(samples, "bullmq_http_worker_restarts_total") == 0


def test_a_worker_that_dies_is_counted_and_its_requests_kept(stack):
    _, _, server = stack
    for _ in range(6):
        assert server.send("GET", "/healthz") == 200
    before = requests(scrape(server), "/healthz", "GET", "200")
    assert before >= 6  # and the harness's own checks that the server is up

    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2,
        20,
        "the worker to be replaced",
    )
    samples = scrape(server)
    assert value(samples, "bullmq_http_worker_restarts_total") == 1
    # The dead worker's requests are still counted.
    assert requests(samples, "/healthz", "GET", "200") == before


def test_a_reload_keeps_the_figures_and_counts_its_restarts(stack):
    _, _, server = stack
    for _ in range(5):
        assert server.send("GET", "/healthz") == 200
    before = requests(scrape(server), "/healthz", "GET", "200")
    old = set(server.worker_pids())
    server.process.send_signal(signal.SIGHUP)  # new workers, the old ones leave
    wait_until(
        lambda: not old & set(pids := server.worker_pids()) and len(pids) == 2,
        30,
        "the workers to be replaced",
    )

    def both_restarts_counted():
        """The master counts each old worker as it reaps it."""
        samples = scrape(server)
        return samples if value(samples, "bullmq_http_worker_restarts_total") == 2 else None

    samples = wait_until(both_restarts_counted, 10, "both restarts to be counted")
    assert requests(samples, "/healthz", "GET", "200") == before


def test_metrics_can_be_turned_off(make_app, job):
    job()
    client = make_app(METRICS=False).test_client()
    labels = {"route": PROGRESS, "method": "POST", "status": "200"}
    before = REGISTRY.get_sample_value("bullmq_http_requests_total", labels) or 0.0
    response = client.post("/queues/orders/jobs/1/progress", data=b"1", headers=bearer(JOB_TOKEN))
    assert response.status_code == 200
    assert (REGISTRY.get_sample_value("bullmq_http_requests_total", labels) or 0.0) == before
    response = client.get("/metrics")
    assert (response.status_code, response.text) == (404, "metrics are turned off (METRICS=0)")


def test_in_one_process_metrics_come_from_its_own_registry(make_app, job):
    job()
    client = make_app().test_client()
    labels = {"route": PROGRESS, "method": "POST", "status": "200"}
    before = REGISTRY.get_sample_value("bullmq_http_requests_total", labels) or 0.0
    response = client.post("/queues/orders/jobs/1/progress", data=b"1", headers=bearer(JOB_TOKEN))
    assert response.status_code == 200
    assert REGISTRY.get_sample_value("bullmq_http_requests_total", labels) == before + 1
    text = client.get("/metrics").text
    assert f'bullmq_http_requests_total{{method="POST",route="{PROGRESS}",status="200"}}' in text


def test_queue_names_and_job_ids_never_become_labels(make_app, job):
    job()
    client = make_app().test_client()
    client.post("/queues/orders/jobs/1/progress", data=b"1", headers=bearer(JOB_TOKEN))
    client.post("/queues/secret-queue/jobs/job-77/logs", data=b"x", headers=bearer(JOB_TOKEN))
    client.open("/healthz", method="BREW")
    text = client.get("/metrics").text
    assert "orders" not in text and "secret-queue" not in text and "job-77" not in text
    assert 'method="other",route="unmatched",status="405"' in text


def test_json_logs(tmp_path, redis_url, r, job):
    job()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"dashboard {API_TOKEN} *\n")
    env = {"REDIS_URL": redis_url, "AUTH_TOKENS_FILE": str(tokens), "LOG_FORMAT": "json"}
    with Gunicorn(tmp_path, env) as server:
        conn = server.connect()
        conn.request("GET", "/queues/orders/jobs/1/logs?start=0", headers={
            **bearer(API_TOKEN), "X-Request-ID": "req-1"})  # fmt: skip
        assert conn.getresponse().status == 200
        conn.close()
    lines = [json.loads(line) for line in Path(server.log).read_text().splitlines()]
    access = [line for line in lines if line.get("request_id") == "req-1"]
    assert len(access) == 1
    entry = access[0]
    assert entry.keys() == {"time", "pid", "client", "method", "path", "status",
                            "duration_ms", "request_id", "token"}  # fmt: skip
    # On the harness's unix socket the client has no address: "-".
    assert (entry["client"], entry["method"], entry["status"], entry["token"]) == (
        "-", "GET", 200, "dashboard"
    )  # fmt: skip
    assert entry["path"] == "/queues/orders/jobs/1/logs?start=0"
    assert isinstance(entry["duration_ms"], float)
    # gunicorn's own lines, and the app's, are objects too.
    booting = [line for line in lines if line.get("logger") == "gunicorn.error"]
    assert any(line["message"].startswith("Booting worker") for line in booting)
    assert all(line["level"] for line in booting)


@pytest.mark.server  # starts its own servers
def test_json_warnings(tmp_path):
    url = f"unix://{tmp_path}/nothing-here.sock"
    with Gunicorn(tmp_path, {"REDIS_URL": url, "LOG_FORMAT": "json"}) as server:
        conn = server.connect()
        conn.request("GET", "/readyz", headers={"X-Request-ID": "req-2"})
        assert conn.getresponse().status == 503
        conn.close()
    lines = [json.loads(line) for line in Path(server.log).read_text().splitlines()]
    warnings = [line for line in lines if line.get("message", "").startswith("Redis unavailable")]
    assert len(warnings) == 1
    assert (warnings[0]["level"], warnings[0]["logger"]) == ("WARNING", "app")
    assert warnings[0]["message"].startswith(
        "Redis unavailable for GET /readyz (API token -, request req-2): "
    )


def test_the_series_the_alerts_read_exist_at_zero_before_the_first_error(stack):
    """Prometheus's rate() sees no increase in a series that is born counting: the first
    outage would pass unseen by the manual's alerts."""
    redis_server, _, server = stack
    samples = scrape(server)
    first_503 = (
        "bullmq_http_requests_total",
        frozenset({"route": PROGRESS, "method": "POST", "status": "503"}.items()),
    )
    connection_errors = ("bullmq_http_redis_errors_total",
                         frozenset({"kind": "ConnectionError"}.items()))  # fmt: skip
    assert (samples.get(first_503), samples.get(connection_errors)) == (0.0, 0.0)
    redis_server.stop()
    path = "/queues/orders/jobs/1/progress"
    assert server.send("POST", path, b"1", JOB_TOKEN) == 503
    samples = scrape(server)
    assert (samples.get(first_503), samples.get(connection_errors)) == (1.0, 1.0)


def test_dead_workers_are_folded_and_every_count_only_grows(serve, tmp_path):
    directory = tmp_path / "metrics"
    server = serve(WEB_CONCURRENCY="2", PROMETHEUS_MULTIPROC_DIR=str(directory))
    server.wait_for_workers(2)
    seen: list[float] = []
    stop = threading.Event()

    def scrape_all_along() -> None:
        while not stop.is_set():
            try:
                seen.append(requests(scrape(server), "/healthz", "GET", "200"))
            except (OSError, http.client.HTTPException):
                pass  # served by the worker as it was killed
            time.sleep(0.02)

    before = requests(scrape(server), "/healthz", "GET", "200")
    scraper = threading.Thread(target=scrape_all_along)
    scraper.start()
    try:
        for _ in range(12):
            for _ in range(3):
                assert server.send("GET", "/healthz") == 200
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda victim=victim: (
                    victim not in (pids := server.worker_pids()) and len(pids) == 2
                ),
                20,
                "the worker to be replaced",
            )
    finally:
        stop.set()
        scraper.join(10)
    assert requests(scrape(server), "/healthz", "GET", "200") == before + 36
    assert seen == sorted(seen)  # no scrape ever saw a count go down
    assert server.process is not None
    alive = {str(pid) for pid in (server.process.pid, *server.worker_pids())}
    owners = {path.stem.rsplit("_", 1)[1] for path in directory.glob("*.db")}
    assert owners <= alive | {"dead"}  # nothing left of the 12 dead workers
