"""Redis going away: 503 with Retry-After, and 200 again once it is back, same process."""

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from bullmq_http.store import JobStore
from harness.clients import add_active_job
from harness.servers import RedisServer
from tests.helpers import API_TOKEN, JOB_TOKEN, bearer

PROGRESS = "/queues/orders/jobs/1/progress"
LOGS = "/queues/orders/jobs/1/logs"


@pytest.fixture
def server(tmp_path):
    """A Redis server of this test's own, which the test stops and starts."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


def seed(server):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    add_active_job(client, "orders", "1", JOB_TOKEN)
    return client


def requests(client):
    return [
        client.post(PROGRESS, data=b"50", headers=bearer(JOB_TOKEN)),
        client.post(LOGS, data=b"a line", headers=bearer(JOB_TOKEN)),
        client.get(LOGS, headers=bearer(API_TOKEN)),
        client.get("/readyz"),
    ]


def assert_served_and_stored(client, server):
    """Lay the job out afresh; every request must succeed, and store what it sent."""
    data = seed(server)
    assert [response.status_code for response in requests(client)] == [200] * 4
    assert data.hget("bull:orders:1", "progress") == "50"
    assert data.lrange("bull:orders:1:logs", 0, -1) == ["a line"]


def assert_unavailable(responses):
    for response in responses:
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.data == b"Redis is unavailable; retry shortly"


def test_stopped_redis_is_a_503_then_recovers(make_app, server, caplog):
    app = make_app(REDIS_URL=server.url, REDIS_TIMEOUT=0.5)
    client = app.test_client()
    seed(server)
    assert [response.status_code for response in requests(client)] == [200] * 4

    server.stop()
    with caplog.at_level(logging.WARNING, logger="app"):
        assert_unavailable(requests(client))
    # Each says which request it was and whose API token, never the token itself.
    warnings = [r.getMessage() for r in caplog.records if r.name == "app"]
    assert len(warnings) == 4
    assert warnings[0].startswith(f"Redis unavailable for POST {PROGRESS} (API token -, request ")
    assert warnings[2].startswith(
        f"Redis unavailable for GET {LOGS} (API token AUTH_TOKENS.1, request "
    )
    assert API_TOKEN not in "".join(warnings)
    assert client.get("/healthz").status_code == 200  # alive, just not ready

    server.start()
    assert_served_and_stored(client, server)


def test_a_restart_while_connections_idle_costs_no_request(make_app, server):
    # The pooled connections broke while idle, and the new server holds no scripts:
    # each request reconnects and sends its script again, and none fails.
    client = make_app(REDIS_URL=server.url).test_client()
    seed(server)
    assert [response.status_code for response in requests(client)] == [200] * 4

    server.stop()
    server.start()
    assert_served_and_stored(client, server)


def test_scripts_flushed_from_redis_are_sent_again(make_app, server):
    client = make_app(REDIS_URL=server.url).test_client()
    data = seed(server)
    assert [response.status_code for response in requests(client)] == [200] * 4
    data.script_flush()
    assert [response.status_code for response in requests(client)] == [200] * 4
    assert data.lrange("bull:orders:1:logs", 0, -1) == ["a line", "a line"]
    # Sent whole once, each script is cached again for the requests after.
    shas = [script.sha for script in (JobStore.set_progress_script, JobStore.add_log_script)]
    assert data.script_exists(*shas, JobStore.read_logs_script.sha) == [True, True, True]


def test_unresponsive_redis_times_out_as_a_503_then_recovers(make_app, server):
    app = make_app(REDIS_URL=server.url, REDIS_TIMEOUT=0.3)
    client = app.test_client()
    data = seed(server)
    assert client.get("/readyz").status_code == 200

    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        response = client.get(LOGS, headers=bearer(API_TOKEN))
        assert_unavailable([response, client.get("/readyz")])
    finally:
        os.kill(server.process.pid, signal.SIGCONT)

    assert [response.status_code for response in requests(client)] == [200] * 4
    assert data.hget("bull:orders:1", "progress") == "50"


def test_unreachable_redis_at_start_up_does_not_stop_the_app(make_app, tmp_path):
    url = f"unix://{tmp_path}/nothing-here.sock"
    client = make_app(REDIS_URL=url).test_client()
    assert client.get("/healthz").status_code == 200
    assert_unavailable(requests(client))


def test_connections_cut_while_writes_flow_store_every_line_at_most_once(serve, redis_url, r, job):
    """Redis's side of the service's connections is killed again and again while 16
    writers append lines: a command whose reply was lost is never sent again, so each
    line is stored once if answered 200, at most once if answered 503."""
    key = job()
    server = serve(WEB_CONCURRENCY="2", REDIS_MAX_CONNECTIONS="4")
    stop = threading.Event()
    kills = []

    def kill_connections() -> None:
        with redis.Redis.from_url(redis_url) as admin:
            while not stop.is_set():
                kills.append(admin.client_kill_filter(_type="normal", skipme=True))
                time.sleep(0.005)

    def write(n: int) -> list[tuple[str, int]]:
        sent = []
        conn = server.connect()
        try:
            for i in range(200):
                line = f"w{n}-{i}"
                conn.request("POST", LOGS, line, bearer(JOB_TOKEN))
                response = conn.getresponse()
                response.read()
                sent.append((line, response.status))
        finally:
            conn.close()
        return sent

    killer = threading.Thread(target=kill_connections)
    killer.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = [pair for sent in pool.map(write, range(16)) for pair in sent]
    finally:
        stop.set()
        killer.join(10)

    stored = r.lrange(f"{key}:logs", 0, -1)
    assert sum(kills) > 100  # connections were cut, many times
    assert {status for _, status in answers} <= {200, 503}
    assert len(stored) == len(set(stored))  # no line twice
    assert {line for line, status in answers if status == 200} <= set(stored)
