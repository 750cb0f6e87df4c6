"""Broken HTTP from raw sockets: short bodies, bad chunks, stalls, and unparsable requests.

A body is whole only when all of it arrived; anything less is refused and writes
nothing. Each answer is plain text, and nothing here is logged as a server error.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from harness.clients import raw_request
from harness.servers import Gunicorn, free_port, wait_until
from tests.helpers import JOB_TOKEN, snapshot

DEADLINE = 1.0  # REQUEST_TIMEOUT of the server under test, in seconds


@pytest.fixture(scope="module")
def server(redis_url, tmp_path_factory) -> Iterator[Gunicorn]:
    env = {"REDIS_URL": redis_url, "REQUEST_TIMEOUT": str(DEADLINE), "WEB_CONCURRENCY": "1"}
    with Gunicorn(
        tmp_path_factory.mktemp("broken"), env, bind=f"127.0.0.1:{free_port()}"
    ) as the_server:
        yield the_server


def connect(server: Gunicorn) -> socket.socket:
    host, port = server.bind.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Read until the server closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def exchange(server: Gunicorn, data: bytes, *, half_close: bool = True) -> tuple[bytes, float]:
    """Send raw bytes (then, unless told, end the sending side); return what came back
    before the server closed, and after how many seconds."""
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock), time.monotonic() - started


def parse(response: bytes) -> tuple[int, dict[str, str], str]:
    """Return the status, headers (lower-case names) and body of one raw response."""
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body.decode()


def raw_post(route: str, head: str) -> bytes:
    """Return the head of a POST to job 1's route, `head` its further header lines."""
    return raw_request("POST", f"/queues/orders/jobs/1/{route}", JOB_TOKEN, head=head)


def server_errors(server: Gunicorn) -> list[str]:
    log = server.log.read_text()
    return [line for line in log.splitlines() if "[ERROR]" in line or "Traceback" in line]


CHUNKED = "Transfer-Encoding: chunked\r\n"


@pytest.mark.parametrize(
    ("route", "headers", "sent", "reason"),
    [
        # Declared 3 bytes, sent "10", then the client stopped sending.
        ("progress", "Content-Length: 3\r\n", b"10", "the body ended after 2 of the 3 bytes"),
        (
            "logs",
            "Content-Length: 24\r\n",
            b"payment of $1000",
            "the body ended after 16 of the 24 bytes declared",
        ),
        # A chunked body whose last (zero-size) chunk never came.
        ("progress", CHUNKED, b"2\r\n10\r\n", "the body ended before all of it arrived"),
        (
            "logs",
            CHUNKED,
            b"10\r\npayment of $1000\r\n",
            "the body ended before all of it arrived",
        ),
        # Malformed chunks.
        ("progress", CHUNKED, b"zz\r\n", "the chunked body is malformed (Invalid chunk size"),
        ("logs", CHUNKED, b"2\r\nabcdef", "the chunked body is malformed"),
    ],
)
def test_a_body_cut_short_or_malformed_is_a_400_and_writes_nothing(
    server, r, job, route, headers, sent, reason
):
    job()
    before = snapshot(r)
    response, _ = exchange(server, raw_post(route, headers) + sent)
    status, response_headers, body = parse(response)
    assert (status, response_headers["content-type"]) == (400, "text/plain; charset=utf-8")
    assert body.startswith(reason)
    assert snapshot(r) == before
    assert server_errors(server) == []


def test_a_whole_body_on_a_raw_socket_is_stored(server, r, job):
    key = job()
    response, _ = exchange(server, raw_post("progress", "Content-Length: 3\r\n") + b"100")
    assert parse(response)[0] == 200
    assert r.hget(key, "progress") == "100"


def test_a_client_that_disconnects_mid_body_is_not_a_server_error(server, r, job):
    job()
    before = snapshot(r)
    refused = '"POST /queues/orders/jobs/1/logs" 400'
    logged = server.log.read_text().count(refused)  # the server is the module's
    for _ in range(5):
        with connect(server) as sock:
            sock.sendall(raw_post("logs", "Content-Length: 100\r\n") + b"half a li")
        # Closed without reading: the 400 goes nowhere, but the access log has it.
    wait_until(
        lambda: server.log.read_text().count(refused) == logged + 5,
        10,
        "the five requests answered",
    )
    assert snapshot(r) == before
    assert server_errors(server) == []


def test_a_body_that_stalls_is_a_408_at_the_deadline_and_writes_nothing(server, r, job):
    job()
    before = snapshot(r)
    response, seconds = exchange(
        server, raw_post("progress", "Content-Length: 3\r\n") + b"10", half_close=False
    )
    status, headers, body = parse(response)
    assert (status, headers["connection"]) == (408, "close")
    assert body == "the body did not arrive in time (REQUEST_TIMEOUT): send it at once"
    assert DEADLINE <= seconds < DEADLINE + 5
    assert snapshot(r) == before


def test_a_body_that_trickles_is_a_408_at_the_deadline(server, r, job):
    job()
    before = snapshot(r)
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(raw_post("logs", "Content-Length: 100\r\n"))
        # One byte at a time, each well within the deadline, the whole never.
        with pytest.raises(OSError):
            for _ in range(int(DEADLINE * 20) + 20):
                sock.sendall(b"x")
                time.sleep(0.1)
        response = read_all(sock)
    assert parse(response)[0] == 408
    assert time.monotonic() - started < DEADLINE + 5
    assert snapshot(r) == before


def test_headers_that_stall_are_a_408_at_the_deadline(server):
    response, seconds = exchange(
        server, b"POST /queues/orders/jobs/1/progress HTTP/1.1\r\nHo", half_close=False
    )
    status, headers, body = parse(response)
    assert (status, headers["connection"]) == (408, "close")
    assert body == f"the request did not arrive within {DEADLINE:g} seconds (REQUEST_TIMEOUT)"
    assert DEADLINE <= seconds < DEADLINE + 5


@pytest.mark.parametrize(
    ("sent", "status", "reason"),
    [
        (b"GARBAGE\r\n\r\n", 400, "Invalid Request Line"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414, "Request Line is too large"),
        (b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n", 400, "Invalid HTTP Header"),
    ],
)
def test_requests_gunicorn_cannot_parse_are_answered_in_plain_text(server, sent, status, reason):
    response, _ = exchange(server, sent)
    got_status, headers, body = parse(response)
    assert (got_status, headers["content-type"]) == (status, "text/plain; charset=utf-8")
    assert reason in body
    assert "<" not in body


def test_a_forged_log_line_stays_inside_its_own_line(server):
    sent = b"GET /x%FF%0D%0A1.2.3.4%20%22POST%20/q%22%20200%1B[2J HTTP/1.1\r\nHost: t\r\n\r\n"
    response, _ = exchange(server, sent)
    assert parse(response)[0] == 404
    lines = [line for line in server.log.read_text().splitlines() if '"GET /x' in line]
    assert len(lines) == 1
    assert r'"GET /x\xff\x0d\x0a1.2.3.4\x20\x22POST\x20/q\x22\x20200\x1b[2J" 404 ' in lines[0]
    assert not any(line.startswith("1.2.3.4") for line in server.log.read_text().splitlines())
