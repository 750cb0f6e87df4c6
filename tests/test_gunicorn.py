"""The service as deployed: gunicorn with its production config, and many clients at once."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from bullmq_http.gunicorn_worker import DeadlineWorker
from bullmq_http.healthcheck import UnixHTTPConnection
from harness.servers import (
    GUNICORN,
    Gunicorn,
    free_port,
    harness_environ,
    wait_until,
)
from tests.helpers import API_TOKEN, JOB_TOKEN, ROOT, bearer

THREADS, LINES = 8, 40


def test_concurrent_appends_store_every_line_once_in_order(serve, r, job):
    job()
    server = serve(WEB_CONCURRENCY="2")
    failures: list[str] = []

    def worker(n: int) -> None:
        conn = server.connect()  # one keep-alive connection per client
        for i in range(LINES):
            conn.request("POST", "/queues/orders/jobs/1/logs", f"t{n}-{i}", bearer(JOB_TOKEN))
            response = conn.getresponse()
            if (response.status, response.read()) != (200, b"OK"):
                failures.append(f"t{n}-{i}: {response.status}")
        conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    conn = server.connect()
    conn.request("GET", "/queues/orders/jobs/1/logs?length=1", headers=bearer(API_TOKEN))
    response = conn.getresponse()
    assert response.status == 200
    assert b'"count":320' in response.read()
    conn.close()

    assert failures == []
    stored = r.lrange("bull:orders:1:logs", 0, -1)
    assert sorted(stored) == sorted(f"t{n}-{i}" for n in range(THREADS) for i in range(LINES))
    for n in range(THREADS):
        mine = [line for line in stored if line.startswith(f"t{n}-")]
        assert mine == [f"t{n}-{i}" for i in range(LINES)]


def test_chunked_body_over_the_limit_is_a_413(serve, r, job):
    job()
    server = serve(MAX_BODY_BYTES="1000")
    conn = server.connect()
    body = iter([b"x" * 600, b"y" * 600])  # an iterable body is sent chunked
    conn.request("POST", "/queues/orders/jobs/1/logs", body, bearer(JOB_TOKEN), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    assert response.read() == b"the body is larger than 1000 bytes (MAX_BODY_BYTES)"
    conn.close()
    conn = server.connect()
    conn.request(
        "POST",
        "/queues/orders/jobs/1/logs",
        iter([b"a", b"b"]),
        bearer(JOB_TOKEN),
        encode_chunked=True,
    )
    assert conn.getresponse().status == 200
    conn.close()
    assert r.lrange("bull:orders:1:logs", 0, -1) == ["ab"]


def start_with(env):
    """Start gunicorn with the production config and a bad setting; return (code, stderr)."""
    result = subprocess.run(
        GUNICORN,
        cwd=ROOT,
        env={**harness_environ(), "BIND": "127.0.0.1:0", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode, result.stderr.strip()


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"REDIS_PORT": "six"}, "REDIS_PORT='six' must be a whole number from 1 to 65535"),
        (
            {"REDIS_TLS": "1", "REDIS_TLS_CA_FILE": "/no/such/ca.pem"},
            "REDIS_TLS_CA_FILE=/no/such/ca.pem cannot be used: [Errno 2] No such file or directory",
        ),
    ],
)
def test_a_bad_app_setting_stops_start_up_with_one_line(env, line):
    code, stderr = start_with(env)
    assert code == 1
    assert stderr == f"Error: {line}"


@pytest.mark.parametrize(
    ("variable", "value", "bounds"),
    [
        ("PORT", "http", "from 1 to 65535"),
        ("WORKER_CONNECTIONS", "0", "from 1 to 10000"),
        ("THREADS", "-1", "from 1 to 1024"),
        ("WEB_CONCURRENCY", "0", "from 1 to 256"),
    ],
)
def test_a_bad_server_setting_stops_start_up_with_one_line(variable, value, bounds):
    code, stderr = start_with({"BIND": "", variable: value})
    assert (code, stderr) == (1, f"{variable}={value!r} must be a whole number {bounds}")


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("WORKER_CLASS", "foo", "WORKER_CLASS='foo' must be gevent or gthread or sync"),
        # gunicorn parses this one itself as it is imported: serve.py reads it first.
        ("WEB_CONCURRENCY", "zero", "WEB_CONCURRENCY='zero' must be a whole number from 1 to 256"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT='xml' must be plain or json"),
        ("REQUEST_TIMEOUT", "0", "REQUEST_TIMEOUT='0' must be a number of seconds above 0 "
         "and at most 300"),
        ("BIND", "127.0.0.1:80,nowhere", "BIND='127.0.0.1:80,nowhere' must be host:port or "
         "unix:/path, comma separated"),
    ],
)  # fmt: skip
def test_every_other_bad_server_setting_is_one_line_too(variable, value, line):
    assert start_with({variable: value}) == (1, line)


def test_bind_takes_several_addresses(tmp_path, redis_url):
    """One instance serves a proxy over a unix socket and Prometheus over TCP."""
    port = free_port()
    sock = tmp_path / "service.sock"
    env = {"REDIS_URL": redis_url, "WEB_CONCURRENCY": "1"}
    with Gunicorn(tmp_path, env, bind=f"unix:{sock},127.0.0.1:{port}"):
        unix = UnixHTTPConnection(str(sock))
        tcp = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for conn, path in ((unix, "/healthz"), (tcp, "/metrics")):
            conn.request("GET", path)
            assert conn.getresponse().status == 200
            conn.close()


def healthcheck(env: dict[str, str]) -> tuple[int, str]:
    """Run the image's HEALTHCHECK command with `env`; return its exit status and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "bullmq_http.healthcheck"], cwd=ROOT,
        env={**harness_environ(), **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.returncode, done.stderr


@pytest.mark.parametrize("where", ["unix", "every address", "PORT"])
def test_the_healthcheck_asks_where_bind_or_port_says(tmp_path, redis_url, where):
    port = free_port()
    bind = {"unix": f"unix:{tmp_path / 'service.sock'}", "every address": f"0.0.0.0:{port}",
            "PORT": f"127.0.0.1:{port}"}[where]  # fmt: skip
    told = {"PORT": str(port)} if where == "PORT" else {"BIND": bind}
    with Gunicorn(tmp_path, {"REDIS_URL": redis_url, "WEB_CONCURRENCY": "1"}, bind=bind):
        assert healthcheck(told) == (0, "")
    status, said = healthcheck(told)
    assert status == 1 and said.startswith(f"{bind}: ")  # nothing listens there now


def test_sigterm_lets_requests_in_flight_finish(tmp_path, redis_url, r, job):
    job()
    server = Gunicorn(tmp_path, {"REDIS_URL": redis_url, "WEB_CONCURRENCY": "2"}).start()
    path = server.bind.removeprefix("unix:")
    clients = []
    try:
        for n in range(6):
            # Headers and half the body: gunicorn has handed the request to the app,
            # which is waiting for the rest of the body.
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(
                b"POST /queues/orders/jobs/1/logs HTTP/1.1\r\nHost: localhost\r\n"
                + f"Authorization: Bearer {JOB_TOKEN}\r\n".encode()
                + b"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"5\r\nline-\r\n"
            )
            clients.append((n, sock))
        # A request after them answered: the six were accepted before it (a listening
        # socket hands out connections in the order they came), each by a worker.
        assert server.send("GET", "/healthz") == 200
        server.process.send_signal(signal.SIGTERM)
        # The master closes the socket, then tells the workers to finish what they hold.
        wait_until(lambda: not os.path.exists(path), 10, "gunicorn to stop listening")
        answers = []
        for n, sock in clients:
            sock.sendall(f"1\r\n{n}\r\n0\r\n\r\n".encode())
            response = http.client.HTTPResponse(sock)
            response.begin()
            answers.append((response.status, response.read()))
            sock.close()  # done, as a client would be: the worker has nothing left to wait for
        assert server.process.wait(timeout=10) == 0
    finally:
        for _, sock in clients:
            sock.close()
        server.stop()
    assert answers == [(200, b"OK")] * 6
    assert sorted(r.lrange("bull:orders:1:logs", 0, -1)) == [f"line-{n}" for n in range(6)]


BOOT_SECONDS = 3.0


class SlowToBoot(DeadlineWorker):
    """The service's worker, slow to set up its signal handlers: a stop signal sent
    while it boots reaches it before they are in place."""

    def init_signals(self) -> None:
        time.sleep(BOOT_SECONDS)
        self.log.info("Worker %s handles signals", self.pid)
        super().init_signals()


def test_sigterm_while_a_worker_boots_stops_it(tmp_path, redis_url):
    args = ["--worker-class", f"{__name__}.SlowToBoot", "--graceful-timeout", "60"]
    env = {"REDIS_URL": redis_url, "WEB_CONCURRENCY": "1"}
    server = Gunicorn(tmp_path, env, args=args).start(timeout=BOOT_SECONDS + 20)
    try:
        [first] = server.wait_for_workers(1)
        os.kill(first, signal.SIGKILL)  # the master starts another in its place
        booting = "Booting worker with pid: "
        wait_until(lambda: server.log.read_text().count(booting) == 2, 10, "a new worker")
        server.process.send_signal(signal.SIGTERM)
        log = server.log.read_text()
        # Only the first worker had set up its handlers: the signal came mid-boot.
        assert log.count("handles signals") == 1, log
        # Not held for the 60 s graceful timeout: the worker took the signal as its own.
        assert server.process.wait(timeout=BOOT_SECONDS + 15) == 0
    finally:
        server.stop()
    log = server.log.read_text()
    assert "Worker graceful timeout" not in log
    assert log.count("Worker exiting") == 1, log  # the new one; the first was killed
