"""Behind a real nginx, with deploy/nginx.conf, talking to gunicorn on a unix socket."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from harness.clients import EventStream, add_active_job, http_call
from harness.servers import Gunicorn, RedisServer, free_port, wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, bearer
from tests.nginx_front import nginx_binary, start_nginx

APP_BODY_LIMIT = 1000  # below nginx's 1m, so that each of the two limits can be hit


@dataclass
class Stack:
    port: int
    redis_server: RedisServer
    gunicorn: Gunicorn
    data: redis.Redis
    directory: Path
    nginx: int  # the master's process id

    def request(self, method, path, body=None, headers=None):
        """Send a request to nginx; return (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        answer = http_call(conn, method, path, body, headers)
        return answer.status, answer.headers, answer.body

    def logged_address(self, request_id: str) -> str:
        """Return the client address the app logged for a request id (the line is
        written once the answer has gone, so wait for it)."""

        def line() -> str | None:
            lines = self.gunicorn.log.read_text().splitlines()
            return next((line for line in lines if f" {request_id} " in line), None)

        logged = wait_until(line, 5, f"the access-log line of {request_id}")
        found = re.search(r'\] (\S+) "', logged)
        assert found, logged
        return found[1]


@pytest.fixture(scope="module")
def nginx() -> str:
    return nginx_binary()


@pytest.fixture(scope="module", params=[1, 0], ids=["trusted", "untrusted"])
def stack(request, nginx, tmp_path_factory):
    """Redis, gunicorn on a unix socket and nginx in front, with the example config."""
    directory = tmp_path_factory.mktemp("nginx")
    port = free_port()
    with RedisServer(directory / "redis") as redis_server:
        env = {
            "REDIS_URL": redis_server.url,
            "AUTH_TOKENS": API_TOKEN,
            "TRUSTED_PROXIES": str(request.param),
            "MAX_BODY_BYTES": str(APP_BODY_LIMIT),
            "WEB_CONCURRENCY": "1",
        }
        with Gunicorn(directory, env) as server:
            process = start_nginx(nginx, directory, Path(server.bind.removeprefix("unix:")), port)
            data = redis.Redis.from_url(redis_server.url, decode_responses=True)
            stack = Stack(port, redis_server, server, data, directory, process.pid)
            try:
                yield stack, bool(request.param)
            finally:
                process.terminate()
                process.wait(timeout=10)
                process.stderr.close()
                data.close()


@pytest.fixture
def job(stack):
    the_stack, _ = stack
    the_stack.data.flushdb()
    return add_active_job(the_stack.data, "orders", "1", JOB_TOKEN)


def test_every_route_works_under_the_prefix(stack, job):
    s, trusted = stack
    base = "/bullmq/queues/orders/jobs/1"
    assert s.request("POST", f"{base}/progress", b'{"step": 2}', bearer(JOB_TOKEN))[::2] == (
        200,
        b"OK",
    )
    assert s.request("POST", f"{base}/logs", b"via nginx", bearer(JOB_TOKEN))[0] == 200
    status, headers, body = s.request("GET", f"{base}/logs?order=desc", None, bearer(API_TOKEN))
    assert (status, json.loads(body)) == (200, {"count": 1, "logs": ["via nginx"]})
    assert s.data.hget(job, "progress") == '{"step":2}'
    assert s.request("GET", "/bullmq/healthz")[::2] == (200, b"OK")
    assert s.request("GET", "/bullmq/readyz")[::2] == (200, b"OK")
    status, _, body = s.request("GET", "/bullmq/openapi.json")
    assert status == 200
    assert json.loads(body)["servers"] == [{"url": "/bullmq" if trusted else "/"}]
    # Refusals come through as the app said them.
    status, headers, body = s.request("POST", f"{base}/progress", b"1", bearer("wrong"))
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    assert s.request("GET", "/bullmq/queues/orders/jobs/2/logs", None, bearer(API_TOKEN))[0] == 404


@pytest.mark.parametrize(
    "path", ["/bullmq/metrics", "/bullmq//metrics", "/bullmq/%6Detrics", "/bullmq/metrics?a=1"]
)
def test_metrics_are_not_served_under_the_prefix(stack, path):
    s, _ = stack
    status, _, body = s.request("GET", path)
    assert status == 404
    assert b"bullmq_http" not in body
    # The service itself serves them, to whoever reaches its own socket.
    conn = s.gunicorn.connect()
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert (response.status, response.read().count(b"bullmq_http_requests_total") > 0) == (
            200,
            True,
        )
    finally:
        conn.close()


def test_a_stream_of_events_passes_unbuffered(stack, job):
    s, _ = stack
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    try:
        conn.request("GET", "/bullmq/queues/orders/jobs/1/events", headers=bearer(API_TOKEN))
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Type")) == (
            200, "text/event-stream; charset=utf-8"
        )  # fmt: skip
        stream = EventStream(response)
        events = iter(stream)
        base = "/bullmq/queues/orders/jobs/1"
        for n in range(3):
            # Each small event comes through at once, not when a buffer fills.
            assert (
                s.request("POST", f"{base}/progress", str(n).encode(), bearer(JOB_TOKEN))[0] == 200
            )
            event = next(events)
            assert (event.event, event.data) == ("progress", str(n))
    finally:
        conn.close()


def test_the_client_address_is_believed_only_from_trusted_hops(stack, job):
    s, trusted = stack
    request_id = uuid.uuid4().hex
    # A client that claims an address of its own: nginx appends the one it saw.
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Request-ID": request_id}
    status, answer_headers, _ = s.request("GET", "/bullmq/healthz", None, headers)
    assert (status, answer_headers["X-Request-ID"]) == (200, request_id)
    address = s.logged_address(request_id)
    assert address != "203.0.113.7"
    assert (address == "127.0.0.1") == trusted


def test_oversized_bodies_are_413_from_nginx_and_from_the_app(stack, job):
    s, _ = stack
    url = "/bullmq/queues/orders/jobs/1/logs"
    # Over the app's MAX_BODY_BYTES: the app refuses it, and says so.
    status, _, body = s.request("POST", url, b"x" * (APP_BODY_LIMIT + 1), bearer(JOB_TOKEN))
    assert (status, body) == (
        413,
        f"the body is larger than {APP_BODY_LIMIT} bytes (MAX_BODY_BYTES)".encode(),
    )
    # Over nginx's client_max_body_size: nginx refuses it before gunicorn sees it.
    status, _, _ = s.request("POST", url, b"x" * (1024 * 1024 + 1), bearer(JOB_TOKEN))
    assert status == 413
    assert s.data.llen("bull:orders:1:logs") == 0


def test_readyz_under_the_prefix_follows_redis(stack, job):
    s, _ = stack
    assert s.request("GET", "/bullmq/readyz")[0] == 200
    s.redis_server.stop()
    try:
        status, headers, body = s.request("GET", "/bullmq/readyz")
        assert (status, headers["Retry-After"]) == (503, "1")
        assert body == b"Redis is unavailable; retry shortly"
        assert s.request("GET", "/bullmq/healthz")[0] == 200
    finally:
        s.redis_server.start()
    assert s.request("GET", "/bullmq/readyz")[::2] == (200, b"OK")


def test_nginx_logs_no_watch_token(stack, job):
    s, _ = stack
    for query in ("token=1.SECRET-ONE", "tok%65n=1.SECRET-TWO&tail=3"):
        status, _, body = s.request("GET", f"/bullmq/queues/orders/jobs/1/events?{query}")
        assert (status, body) == (401, b"watch tokens are off on this server (WATCH_TOKEN_SECRET)")
    line = '"GET /bullmq/queues/orders/jobs/1/events HTTP/1.1" 401'
    log = s.directory / "access.log"
    # nginx writes a request's line after its answer has gone: wait for both lines
    wait_until(lambda: log.exists() and log.read_text().count(line) >= 2, 5, "both lines")
    logged = log.read_text()
    assert logged.count(line) == 2
    assert "SECRET" not in logged


def test_nginx_error_log_holds_no_watch_token_when_the_upstream_fails(nginx, tmp_path, redis_url):
    """nginx writes the request line, query and all, with every upstream error: the
    recipe keeps those out of every error log it writes."""
    socket = tmp_path / "gunicorn.sock"
    env = {"REDIS_URL": redis_url, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "1"}
    (tmp_path / "app").mkdir()
    port = free_port()
    with Gunicorn(tmp_path / "app", env, bind=f"unix:{socket}"):
        process = start_nginx(nginx, tmp_path, socket, port)
    try:  # gunicorn is gone: each request is a 502, an upstream error to nginx
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for route in ("events?token=1.SECRET-ONE", "logs.txt?token=1.SECRET-TWO"):
            conn.request("GET", f"/bullmq/queues/orders/jobs/1/{route}")
            response = conn.getresponse()
            assert (response.status, response.read()[:0]) == (502, b"")
        conn.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()
    logged = [path.read_text() for path in tmp_path.glob("*.log")]
    assert any('"GET /bullmq/queues/orders/jobs/1/events HTTP/1.1" 502' in log for log in logged)
    assert not any("SECRET" in log for log in logged)


def test_an_nginx_reload_ends_within_its_timeout_with_streams_open(stack, job):
    s, _ = stack
    children = Path(f"/proc/{s.nginx}/task/{s.nginx}/children")
    old_workers = set(children.read_text().split())
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        conn.request("GET", "/bullmq/queues/orders/jobs/1/events", headers=bearer(API_TOKEN))
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline() == b"retry: 2000\n"
        os.kill(s.nginx, signal.SIGHUP)  # nginx -s reload
        # The old worker leaves within worker_shutdown_timeout (10 s), cutting the
        # stream: a network error to the client, which reconnects with Last-Event-ID.
        wait_until(lambda: not old_workers & set(children.read_text().split()), 20, "old ones")
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()
    assert s.request("GET", "/bullmq/healthz")[0] == 200  # the new workers serve
