"""Hundreds of clients at once, as a fleet of workers or an attacker makes them: slow ones,
idle ones, and bursts at a healthy or a stalled Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from harness.clients import raw_request
from harness.servers import Gunicorn
from tests.helpers import JOB_TOKEN

T = TypeVar("T")
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float  # from sending the request to its whole answer


def raw_post(route: str, body: bytes) -> bytes:
    """Return a whole POST to job 1's route, with the job's token."""
    return raw_request("POST", f"/queues/orders/jobs/1/{route}", JOB_TOKEN, body)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-l"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


class Client:
    """One keep-alive HTTP connection, over asyncio streams."""

    def __init__(self, server: Gunicorn) -> None:
        self.host, port = server.bind.rsplit(":", 1)
        self.port = int(port)

    async def open(self) -> Client:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def ask(self, request: bytes, timeout: float = 10.0) -> Answer:
        started = time.monotonic()
        self.writer.write(request)
        status, body = await asyncio.wait_for(read_answer(self.reader), timeout)
        return Answer(status, body, time.monotonic() - started)

    async def closed(self, timeout: float) -> bytes:
        """Return what the server sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


async def ask_once(server: Gunicorn, request: bytes) -> Answer:
    client = await Client(server).open()
    try:
        return await client.ask(request)
    finally:
        client.close()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def test_hundreds_of_slow_clients_neither_block_others_nor_outstay_the_deadline(serve, r, job):
    key = job()
    deadline, slow = 4.0, 400  # generous: the others must be served within it
    server = serve(REQUEST_TIMEOUT=str(deadline), WEB_CONCURRENCY="2")

    async def trickle(client: Client) -> tuple[bytes, float]:
        """Send headers, then a body byte every half second, never the whole body;
        return what the server answered before closing, and when it closed."""
        started = time.monotonic()
        client.writer.write(raw_post("logs", b"x" * 100)[:-100])
        received = b""
        while time.monotonic() - started < deadline + 10:
            try:
                chunk = await asyncio.wait_for(client.reader.read(65536), 0.5)
            except TimeoutError:
                if not received:
                    client.writer.write(b"x")
                continue
            if not chunk:
                break
            received += chunk
        client.close()
        return received, time.monotonic() - started

    async def scenario() -> tuple[list[Answer], bool, list[tuple[bytes, float]]]:
        clients = [await Client(server).open() for _ in range(slow)]
        trickles = [asyncio.create_task(trickle(client)) for client in clients]
        served = [
            await ask_once(server, HEALTHZ),
            await ask_once(server, raw_post("progress", b"42")),
            await ask_once(server, HEALTHZ),
        ]
        # Served while every slow client still held its connection, not after the
        # deadline freed the workers of them.
        held = not any(task.done() for task in trickles)
        return served, held, await asyncio.gather(*trickles)

    served, held, endings = run(scenario())

    assert [(answer.status, answer.body) for answer in served] == [(200, b"OK")] * 3
    assert held
    assert r.hget(key, "progress") == "42"
    # Each slow client was answered 408 and closed at its deadline, not before.
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer, _ in endings)
    assert all(deadline <= seconds < deadline + 10 for _, seconds in endings)
    assert r.llen(f"{key}:logs") == 0


def test_idle_clients_give_way_to_new_ones_when_a_worker_is_full(serve):
    server = serve(WORKER_CONNECTIONS="50")

    async def scenario() -> tuple[list[Answer], list[bytes]]:
        clients, answers = [], []
        for _ in range(150):  # three times what the worker holds, each kept open
            client = await Client(server).open()
            answers.append(await client.ask(HEALTHZ, timeout=5))
            clients.append(client)
        # The first ones, idle the longest, were closed to make room.
        oldest = [await client.closed(5) for client in clients[:50]]
        for client in clients:
            client.close()
        return answers, oldest

    answers, oldest = run(scenario())

    assert [answer.status for answer in answers] == [200] * 150
    assert oldest == [b""] * 50


def burst(server: Gunicorn, clients: int, requests: int, body: bytes) -> list[Answer]:
    """Send `requests` progress writes on each of `clients` connections at once."""

    async def one(n: int) -> list[Answer]:
        client = await Client(server).open()
        try:
            return [await client.ask(raw_post("progress", body), 30) for _ in range(requests)]
        finally:
            client.close()

    async def every() -> list[Answer]:
        results = await asyncio.gather(*(one(n) for n in range(clients)))
        return [answer for answers in results for answer in answers]

    return run(every())


def connections_since(client: redis.Redis, started: float) -> int:
    """Return how many connections Redis holds that were opened since `started` (a
    time.monotonic()), the client's own aside."""
    seconds = time.monotonic() - started + 1
    mine = client.client_id()
    return sum(1 for c in client.client_list() if int(c["age"]) <= seconds and int(c["id"]) != mine)


def test_hundreds_of_concurrent_writes_at_a_healthy_redis_all_succeed(serve, r, job):
    key = job()
    pool, workers = 5, 2
    started = time.monotonic()
    server = serve(REDIS_MAX_CONNECTIONS=str(pool), WEB_CONCURRENCY="2")
    server.wait_for_workers(workers)
    reads = r.info("stats")["total_reads_processed"]
    answers = burst(server, clients=400, requests=3, body=b"7")
    reads = r.info("stats")["total_reads_processed"] - reads
    service_connections = connections_since(r, started)

    assert sorted({answer.status for answer in answers}) == [200]
    assert len(answers) == 1200
    assert r.hget(key, "progress") == "7"
    assert r.xlen("bull:orders:events") == 1200
    # Under gevent each worker sends its requests' scripts down one connection
    # together: Redis reads many a system call.
    assert service_connections <= workers
    assert reads < len(answers) / 2


def test_a_stalled_redis_answers_503_at_the_timeout_or_200_after_never_at_once(
    serve, redis_url, r, job
):
    key = job()
    timeout, pool = 0.5, 5
    started = time.monotonic()
    server = serve(REDIS_TIMEOUT=str(timeout), REDIS_MAX_CONNECTIONS=str(pool))
    with redis.Redis.from_url(redis_url) as admin:
        admin.client_pause(2000)
        answers = burst(server, clients=200, requests=1, body=b"9")
        connections = connections_since(admin, started)
    after = burst(server, clients=10, requests=1, body=b"10")

    statuses = {answer.status for answer in answers}
    assert statuses <= {200, 503} and 503 in statuses
    assert all(answer.seconds >= timeout * 0.9 for answer in answers if answer.status == 503)
    assert {answer.body for answer in answers if answer.status == 503} == {
        b"Redis is unavailable; retry shortly"
    }
    assert connections <= pool
    assert [answer.status for answer in after] == [200] * 10
    assert r.hget(key, "progress") == "10"
