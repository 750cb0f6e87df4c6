"""`make bench`: the service under wrk, beside the ceilings of the stack it runs on.

Starts a Redis server and the service under gunicorn with its production config, lays
out real active jobs, and drives each route with wrk over keep-alive connections.
Alternating with it, the same wrk runs against gunicorn serving a bare WSGI callable
(bench/bare.py) under several worker classes, and a Flask route that does no more
(bench/flask_bare.py) under the project's, and redis-benchmark runs the service's own
Lua scripts: what the service could reach if it cost nothing. Then the two yardsticks
beside each route, in alternating runs, best of two: that Flask route (the floor of
any Flask service), and the obvious hand-written version of the route
(bench/obvious.py), both under the project's gunicorn.conf.py. Then the progress
route again, in turns with a copy of the service run with METRICS=0, for what counting
each request costs; 1,000 streams of events on one worker, and as many as it holds by
default, for their memory and the delay from a write to its event; POST progress
while a flood of stream clients knocks; and jobs through claim -> complete by HTTP
workers, beside a native BullMQ worker for Node on the same Redis, with Redis's CPU per
job for each. Prints one table and writes it to bench/results.md.

BENCH_SECONDS (default 8) sets how long each wrk run lasts.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime
import itertools
import json
import os
import platform
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import redis

from bullmq_http import upstream
from bullmq_http.lifecycle import JobLife
from bullmq_http.store import ADD_LOG, SET_PROGRESS, JobStore
from harness.clients import add_active_job, open_raw_stream, raw_request
from harness.servers import ROOT, ClusterServers, Gunicorn, RedisServer, free_port

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
WORKERS = int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
CONNECTIONS = (1, 32)
API_TOKEN = "bench-api-token"  # noqa: S105
JOB_TOKEN = "0b5d8a34-6c2e-4c44-9a4e-3f0f1f6b1e2a:1"  # noqa: S105


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    body: str | None = None
    token: str = JOB_TOKEN
    content_type: str | None = None
    spread: tuple[str, ...] = ()  # queue names to spread the load over, in turn


JOB = "/queues/bench/jobs"
ROUTES = [
    Route("POST progress", "POST", f"{JOB}/progress/progress", '{"percent":42}'),
    Route("POST logs", "POST", f"{JOB}/logs/logs", "step 3 done", content_type="text/plain"),
    Route("GET logs", "GET", f"{JOB}/read/logs?start=0&length=10", token=API_TOKEN),
]
METRICS_PAIRS = 3  # runs with and without metrics, alternating, for their medians
BARE_REQUEST = Route("bare POST", "POST", "/", '{"percent":42}')
# The project's own worker class, and the others gunicorn offers here.
BARE_WORKERS = {
    "gevent (project config)": {},
    "gthread, 8 threads": {"WORKER_CLASS": "gthread"},
    "sync": {"WORKER_CLASS": "sync"},
}
# The same work through Flask: the ceiling of any Flask service on this stack.
FLASK_BARE = "bare: Flask route, gevent (project config)"
YARDSTICK_RUNS = 2  # alternating runs of each route and its yardsticks; the best counts


@dataclass(frozen=True)
class Yardsticks:
    route: str
    service: Run
    floor: Run  # the Flask route that does nothing, with the route's method and body
    obvious: Run  # bench/obvious.py's version of the route
    service_redis_us: float  # Redis's own CPU per request, the mean over the runs
    obvious_redis_us: float


@dataclass(frozen=True)
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass
class Row:
    name: str
    connections: int
    run: Run
    cpu_per_request: float
    round_trips: float | None = None
    script_calls: float | None = None
    ceiling_share: float | None = None
    redis_us: float | None = None  # Redis's own CPU per request, every master's together


def wrk(bind: str, route: Route, connections: int) -> Run:
    """Drive one route for SECONDS over keep-alive connections; return the summary."""
    env = {**os.environ, "METHOD": route.method, "BODY": route.body or ""}
    env["TOKEN"] = route.token
    if route.content_type:
        env["CONTENT_TYPE"] = route.content_type
    if not route.body:
        del env["BODY"]
    if route.spread:
        env["PATHS"] = ",".join(route.path.replace("/bench/", f"/{q}/") for q in route.spread)
    result = subprocess.run(
        [
            "wrk", "--threads", "1", "--connections", str(connections),
            "--duration", f"{SECONDS}s", "--timeout", "5s",
            "--script", str(ROOT / "bench" / "wrk.lua"), f"http://{bind}{route.path}",
        ],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return Run(
        requests=summary["requests"],
        seconds=summary["seconds"],
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        non2xx=summary["non2xx"],
        socket_errors=summary["socket_errors"],
    )


def seed(client: redis.Redis | redis.RedisCluster, queue: str = "bench") -> None:
    """Lay out the active jobs the routes use, as a BullMQ worker holds them."""
    for job_id in ("progress", "logs", "read"):
        add_active_job(client, queue, job_id, JOB_TOKEN, name="bench", lock_ms=None)
    client.rpush(f"bull:{queue}:read:logs", *[f"line {n}" for n in range(100)])


def token_file(directory: Path) -> str:
    """Write a file of 500 scoped API tokens, the benchmark's among them; return its path."""
    path = directory / "tokens"
    teams = "".join(f"team-{n} token-{n} team-{n}-*\n" for n in range(499))
    path.write_text(f"{teams}bench {API_TOKEN} bench\n")
    return str(path)


def redis_stats(client: redis.Redis) -> tuple[int, int]:
    """Return (socket reads processed, script and transaction calls) so far."""
    reads = client.info("stats")["total_reads_processed"]
    commands = client.info("commandstats")
    calls = sum(commands.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "exec"))
    return reads, calls


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """Return the CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_mb(pids: list[int]) -> list[float]:
    """Return the resident memory of each process, in MB."""
    sizes = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes.append(int(line.split()[1]) / 1024)
    return sizes


def redis_ceiling(server: RedisServer, client: redis.Redis) -> dict[str, tuple[float, float]]:
    """Run the service's Lua scripts with redis-benchmark at 32 clients: (rps, p99 ms)."""
    progress = client.script_load(SET_PROGRESS)
    log = client.script_load(ADD_LOG)
    commands = {
        "progress script": [
            "evalsha", progress, "4", "bull:bench:progress", "bull:bench:progress:lock",
            "bull:bench:events", "bull:bench:meta", JOB_TOKEN, "progress", '{"percent":42}',
        ],
        "log script": [
            "evalsha", log, "3", "bull:bench:logs", "bull:bench:logs:lock",
            "bull:bench:logs:logs", JOB_TOKEN, "step 3 done",
        ],
    }  # fmt: skip
    ceilings = {}
    for name, command in commands.items():
        result = subprocess.run(
            ["redis-benchmark", "-s", str(server.socket), "-c", "32", "-n", "200000", "--csv",
             *command],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = result.stdout.strip().splitlines()[-1].replace('"', "").split(",")
        ceilings[name] = (float(row[1]), float(row[6]))  # rps, p99 ms
    return ceilings


def machine() -> str:
    """Describe the machine: cores and processor model."""
    model = "unknown processor"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {model}"


def measure(
    server: Gunicorn,
    route: Route,
    connections: int,
    client: redis.Redis | None,
    masters: list[redis.Redis] | None = None,
) -> Row:
    """Run wrk against a server; add what its workers (and one Redis, or the masters of
    a cluster) did per request."""
    workers = server.worker_pids()
    reads, calls = redis_stats(client) if client else (0, 0)
    masters = masters or ([client] if client else [])
    redis_seconds = sum(map(redis_cpu, masters))
    cpu = cpu_seconds(workers)
    run = wrk(server.bind, route, connections)
    cpu = cpu_seconds(workers) - cpu
    row = Row(route.name, connections, run, cpu / run.requests)
    if masters:
        row.redis_us = (sum(map(redis_cpu, masters)) - redis_seconds) * 1e6 / run.requests
    if client:
        reads_after, calls_after = redis_stats(client)
        # The stats calls are one socket read each, and neither script nor transaction.
        row.round_trips = (reads_after - reads - 1) / run.requests
        row.script_calls = (calls_after - calls) / run.requests
    return row


def start(server: Gunicorn) -> Gunicorn:
    """Start a server and wait for all its workers: the first answers before the others
    boot, and would take every keep-alive connection wrk opens."""
    server.env = {**server.env, "WEB_CONCURRENCY": str(WORKERS)}  # the harness passes none on
    server.start()
    server.wait_for_workers(WORKERS)
    return server


def floor_request(route: Route) -> Route:
    """Return the Flask floor's request for a route: its method, body and token."""
    path = "/" if route.method == "POST" else "/healthz"
    return replace(route, name=FLASK_BARE, path=path)


def yardsticks(
    service: Gunicorn, floor: Gunicorn, obvious: Gunicorn, client: redis.Redis
) -> list[Yardsticks]:
    """Drive each route, the floor and the obvious version in turn, YARDSTICK_RUNS
    times at 32 connections; keep each one's best run, and the Redis CPU per request of
    the service and the obvious version over all their runs."""
    found = []
    for route in ROUTES:
        best: dict[str, Run] = {}
        redis_seconds: dict[str, float] = {"service": 0.0, "obvious": 0.0}
        served: dict[str, int] = {"service": 0, "obvious": 0}
        for _ in range(YARDSTICK_RUNS):
            for name, server, request in (
                ("service", service, route),
                ("floor", floor, floor_request(route)),
                ("obvious", obvious, route),
            ):
                before = redis_cpu(client)
                run = wrk(server.bind, request, CONNECTIONS[-1])
                if name in redis_seconds:
                    redis_seconds[name] += redis_cpu(client) - before
                    served[name] += run.requests
                if name not in best or run.rate > best[name].rate:
                    best[name] = run
        service_us, obvious_us = (redis_seconds[name] * 1e6 / served[name] for name in served)
        found.append(Yardsticks(
            route.name, best["service"], best["floor"], best["obvious"], service_us, obvious_us
        ))  # fmt: skip
    return found


def cluster_rows(workdir: Path, best: float) -> list[Row]:
    """Run the routes on a 3-master Redis Cluster, the load spread over all masters."""
    rows = []
    with ClusterServers(workdir / "cluster") as cluster:
        queues = tuple(cluster.queues_per_master())
        data = redis.RedisCluster(host="127.0.0.1", port=cluster.masters[0].port)
        for queue in queues:
            seed(data, queue)
        data.close()
        env = {
            "REDIS_CLUSTER": "1",
            "REDIS_CLUSTER_NODES": ",".join(cluster.seeds),
            "AUTH_TOKENS": API_TOKEN,
        }
        directory = workdir / "cluster-service"
        directory.mkdir()
        service = start(Gunicorn(directory, env, bind=f"127.0.0.1:{free_port()}"))
        masters = [redis.Redis(host="127.0.0.1", port=node.port) for node in cluster.masters]
        try:
            for route in ROUTES:
                spread = replace(route, name=f"cluster: {route.name}", spread=queues)
                row = measure(service, spread, CONNECTIONS[-1], None, masters)
                row.ceiling_share = row.run.rate / best
                rows.append(row)
        finally:
            service.stop()
            for master in masters:
                master.close()
    return rows


# Streams of events one worker holds in the benchmark, and the connections it has: 1,000
# streams, and its most under the default WORKER_CONNECTIONS (four fifths of 1,000).
STREAM_LOADS = ((1000, 1250), (800, 1000))
STREAM_WRITES = 40  # progress writes and log lines each of them receives
FLOOD = 2100  # stream clients at once against the default configuration
FLOOD_RETRY_SECONDS = 0.5  # how soon a refused flood client asks again


@dataclass(frozen=True)
class StreamReport:
    streams: int
    worker_connections: int
    clients: int  # Redis connections of the worker while they were open
    memory_per_stream_kb: float
    delays_ms: dict[str, tuple[float, float]]  # kind of event -> (p50, p99)
    ended_after_sigterm_s: float  # from SIGTERM until the last stream had ended


@dataclass(frozen=True)
class FloodReport:
    quiet: Run  # POST progress with no stream open
    flooded: Run  # the same, while the flood knocks
    held: int  # streams open while it ran
    refusals: dict[int, int]  # status -> how many times the flood was refused


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def metrics_cost(
    service: Gunicorn, no_metrics: Gunicorn, client: redis.Redis
) -> tuple[float, float]:
    """Return the median worker CPU per POST progress with metrics and without, from
    alternating runs: one pair of runs differs by more than the metrics cost here."""
    with_metrics, without = [], []
    for _ in range(METRICS_PAIRS):
        with_metrics.append(measure(service, ROUTES[0], CONNECTIONS[-1], client).cpu_per_request)
        without.append(measure(no_metrics, ROUTES[0], CONNECTIONS[-1], client).cpu_per_request)
    return statistics.median(with_metrics), statistics.median(without)


def stream_report(workdir: Path, streams: int, worker_connections: int) -> StreamReport:
    """Hold `streams` streams of one job's events on one worker; write progress and log
    lines stamped with the time; measure what arrives when, and what the worker holds."""
    name = f"streams-{streams}"
    with RedisServer(workdir / f"{name}-redis") as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        add_active_job(client, "bench", "watched", JOB_TOKEN, name="bench", lock_ms=None)
        # One API token opens them all: its own limit is lifted, the worker's is not.
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN,
               "WEB_CONCURRENCY": "1", "WORKER_CONNECTIONS": str(worker_connections),
               "MAX_STREAMS_PER_TOKEN": str(streams)}  # fmt: skip
        (workdir / name).mkdir()
        service = Gunicorn(workdir / name, env, bind=f"127.0.0.1:{free_port()}").start()
        try:
            report = hold_streams(service, client, streams, worker_connections)
        finally:
            service.stop()
            client.close()
    return report


def hold_streams(
    service: Gunicorn, client: redis.Redis, streams: int, worker_connections: int
) -> StreamReport:
    """Open the streams, write, and read every event on every stream."""
    worker = service.worker_pids()
    before = rss_mb(worker)[0]
    socks = [open_stream_socket(service) for _ in range(streams)]
    clients = len(client.client_list()) - 1  # all but this client
    holding = rss_mb(worker)[0]
    writer = threading.Thread(target=write_stamped, args=(service,))
    writer.start()
    try:
        delays = receive_stamped(socks, 2 * STREAM_WRITES)
    finally:
        writer.join()
        for sock in socks:
            sock.close()
    return StreamReport(
        streams,
        worker_connections,
        clients,
        (holding - before) * 1024 / streams,
        {kind: (percentile(ms, 0.5), percentile(ms, 0.99)) for kind, ms in delays.items()},
        asyncio.run(ended_after_sigterm(service, streams)),
    )


def open_stream_socket(service: Gunicorn) -> socket.socket:
    """Open a stream of the watched job's events; return its socket, past the head."""
    host, port = service.bind.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(raw_request("GET", "/queues/bench/jobs/watched/events?tail=0", API_TOKEN))
    received = b""
    while b"retry: 2000\n\n" not in received:  # no event comes before the first write
        more = sock.recv(4096)
        if not more:
            raise RuntimeError(f"the stream did not open: {received[:200]!r}")
        received += more
    return sock


def receive_stamped(socks: list[socket.socket], events: int) -> dict[str, list[float]]:
    """Read `events` events from every stream; return the delays, in milliseconds, from
    the time each event holds to the time its last bytes were read. Each read is stamped
    as it returns, and parsed after: the delay is the service's, not this reader's own
    parsing of 1,000 streams on the cores they share."""
    mark = b"\nevent: "
    reads: dict[int, list[tuple[float, bytes]]] = {sock.fileno(): [] for sock in socks}
    counted = dict.fromkeys(reads, 0)
    tails = dict.fromkeys(reads, b"")  # a read's last bytes, for a mark split between two
    by_fd = {sock.fileno(): sock for sock in socks}
    poller = select.epoll()
    for fd in reads:
        poller.register(fd, select.EPOLLIN)
    left = len(socks)
    deadline = time.monotonic() + 120
    while left and time.monotonic() < deadline:
        for fd, _ in poller.poll(1.0):
            data = by_fd[fd].recv(65536)
            reads[fd].append((time.time(), data))
            seen = tails[fd] + data
            counted[fd] += seen.count(mark)
            tails[fd] = seen[-(len(mark) - 1) :]
            if counted[fd] >= events or not data:
                poller.unregister(fd)
                left -= 1
    poller.close()
    if left:
        raise RuntimeError(f"{left} streams did not get their {events} events")
    delays: dict[str, list[float]] = {"progress": [], "log": []}
    for stamped in reads.values():
        ends = list(itertools.accumulate(len(data) for _, data in stamped))
        body = b"".join(data for _, data in stamped)
        for found in re.finditer(rb"\nevent: (\w+)\n[^\n]*?sent\D*([\d.]+)[^\n]*\n\n", body):
            arrived = stamped[bisect.bisect_left(ends, found.end())][0]
            kind = "progress" if found[1] == b"progress" else "log"
            delays[kind].append((arrived - float(found[2])) * 1000)
    return delays


async def ended_after_sigterm(service: Gunicorn, streams: int) -> float:
    """Open the streams again, stop the service gracefully (SIGTERM), and return the
    seconds until every one of them had ended."""
    path = "/queues/bench/jobs/watched/events?tail=0"

    async def reopen() -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in range(100):  # refused while the worker has not yet let the last ones go
            try:
                return await open_raw_stream(service, path, API_TOKEN)
            except asyncio.IncompleteReadError:
                await asyncio.sleep(0.1)
        raise RuntimeError("the streams could not be opened again")

    opened = await asyncio.gather(*(reopen() for _ in range(streams)))
    started = time.monotonic()
    stopping = asyncio.create_task(asyncio.to_thread(service.stop))  # SIGTERM, then waits

    # Each ends with the chunked body's last chunk (the connection may stay open).
    async def body_ended(reader: asyncio.StreamReader) -> bytes:
        try:
            return await reader.readuntil(b"\r\n0\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            return error.partial  # or the connection closed

    ending = (body_ended(reader) for _, reader, _ in opened)
    await asyncio.wait_for(asyncio.gather(*ending), 60)
    ended = time.monotonic() - started
    await stopping
    for _, _, writer in opened:
        writer.close()
    return ended


def flood_report(workdir: Path) -> FloodReport:
    """Drive POST progress with wrk, first alone, then while FLOOD clients open streams
    of another job's events on the default configuration, each refused one asking again
    soon; one API token, its own limit lifted, so that the workers' limit is what holds."""
    with RedisServer(workdir / "flood-redis") as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        seed(client)
        add_active_job(client, "bench", "watched", JOB_TOKEN, name="bench", lock_ms=None)
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN,
               "MAX_STREAMS_PER_TOKEN": str(FLOOD)}  # fmt: skip
        (workdir / "flood").mkdir()
        service = start(Gunicorn(workdir / "flood", env, bind=f"127.0.0.1:{free_port()}"))
        try:
            quiet = measure(service, ROUTES[0], CONNECTIONS[-1], None).run
            flooded, held, refusals = asyncio.run(flood(service))
        finally:
            service.stop()
            client.close()
    return FloodReport(quiet, flooded, held, refusals)


async def flood(service: Gunicorn) -> tuple[Run, int, dict[int, int]]:
    """Open FLOOD streams at once, holding those let in, asking again for the others;
    run wrk meanwhile; return its run, the streams held, and the refusals by status."""
    host, port = service.bind.rsplit(":", 1)
    stop = asyncio.Event()
    held = 0
    refusals: dict[int, int] = {}
    request = (
        "GET /queues/bench/jobs/watched/events?tail=0 HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {API_TOKEN}\r\n\r\n"
    ).encode()

    async def client() -> None:
        nonlocal held
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            status = int((await reader.readuntil(b"\r\n")).split()[1])
            if status == 200:
                held += 1
                await stop.wait()
                writer.close()
                return
            refusals[status] = refusals.get(status, 0) + 1
            writer.close()
            await asyncio.sleep(FLOOD_RETRY_SECONDS)

    clients = [asyncio.create_task(client()) for _ in range(FLOOD)]
    await asyncio.sleep(5)  # the flood at the limit, the rest asking again and again
    holding = held
    flooded = await asyncio.to_thread(wrk, service.bind, ROUTES[0], CONNECTIONS[-1])
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 60)
    return flooded, holding, refusals


def write_stamped(service: Gunicorn) -> None:
    """Write progress and log lines to the watched job, each holding when it was sent."""
    conn = service.connect()
    path = "/queues/bench/jobs/watched"
    for _ in range(STREAM_WRITES):
        for route, body in (("progress", '{{"sent":{}}}'), ("logs", "sent {}")):
            conn.request("POST", f"{path}/{route}", body.format(time.time()), {
                "Authorization": f"Bearer {JOB_TOKEN}"})  # fmt: skip
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            time.sleep(0.05)
    conn.close()


# Jobs through claim -> complete: how many, and how many at once.
JOBS = int(os.environ.get("BENCH_JOBS", "4000"))
JOB_WORKERS = 32
JOB_ROUNDS = 3  # each way of working the jobs, in turns; the medians count
OVER_NATIVE = 1.2  # the target: Redis CPU per job over HTTP against the native worker's


@dataclass(frozen=True)
class JobsReport:
    """Jobs per second through a whole job's life, and Redis's CPU per job, for the
    service's HTTP workers and for a native BullMQ worker on the same Redis."""

    http_rate: float  # claim, then complete: two requests a job
    http_redis_us: float
    together_rate: float  # each completion in the next claim: one request a job
    together_redis_us: float
    # The scripts alone, driven alike: one job after another from one client.
    alike_redis_us: float  # the service's complete-then-claim
    alike_native_us: float  # BullMQ's moveToFinished fetching the next, as its worker
    native_rate: float | None  # None where node and its BullMQ are not installed
    native_redis_us: float | None


def redis_cpu(client: redis.Redis) -> float:
    """Return the CPU seconds Redis has used so far."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def add_jobs(url: str, queue: str, count: int) -> None:
    """Add `count` jobs with BullMQ's Python library, in batches."""
    from bullmq import Queue

    bull = Queue(queue, {"connection": url})
    try:
        for start in range(0, count, 500):
            batch = range(start, min(count, start + 500))
            await bull.addBulk([{"name": "job", "data": {"n": n}} for n in batch])
    finally:
        await bull.close()


async def http_worker(bind: str, queue: str, together: bool = False) -> int:
    """Claim and complete jobs over one keep-alive connection until none is ready;
    return how many it completed. `together`: each completion goes in the next claim
    (one request a job), not in a request of its own."""
    host, port = bind.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))

    async def ask(request: bytes) -> tuple[bytes, bytes]:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head)
        body = await reader.readexactly(int(length[1])) if length else b""
        return head.split(b" ", 2)[1], body

    done, finished = 0, b""
    try:
        while True:
            claim = raw_request("POST", f"/queues/{queue}/claim", API_TOKEN, finished)
            status, body = await ask(claim)
            done += bool(finished)
            if status != b"200":
                return done
            job = json.loads(body)
            if together:
                finished = json.dumps(
                    {"complete": {"id": job["id"], "token": job["token"], "returnvalue": "done"}}
                ).encode()
                continue
            path = f"/queues/{queue}/jobs/{job['id']}/complete"
            status, _ = await ask(raw_request("POST", path, job["token"], b'"done"'))
            assert status == b"200", status
            done += 1
    finally:
        writer.close()


def scripts_alike(url: str, queue: str, native: bool) -> float:
    """Complete JOBS jobs one after another, each completion claiming the next, from
    one client, by the service's script or (`native`) by BullMQ's moveToFinished with
    its arguments packed as its worker packs them; return Redis's CPU per job in µs.
    No HTTP and no other load: what the two scripts cost Redis, side by side."""
    asyncio.run(add_jobs(url, queue, JOBS))
    client = redis.Redis.from_url(url)
    life = JobLife(JobStore(lambda: client, "bull"), 30_000, 30_000, 1)
    moved = life.claim(queue)
    assert moved is not None
    job_id, token = moved.job_id, moved.token
    finish = client.script_load(upstream.bullmq_script("moveToFinished-14"))
    cpu = redis_cpu(client)
    for _ in range(JOBS):
        if native:
            keys, args = life.completion(queue, job_id, token, '"done"', life.lock_ms)
            reply = client.evalsha(finish, len(keys), *keys, *args)
            job_id = reply[1].decode() if isinstance(reply, list) and reply[0] else ""
        elif (moved := life.complete_and_claim(queue, job_id, token, '"done"')) is not None:
            job_id, token = moved.job_id, moved.token
    used = (redis_cpu(client) - cpu) / JOBS * 1e6
    assert client.zcard(f"bull:{queue}:completed") == JOBS
    client.close()
    return used


def jobs_report(workdir: Path) -> JobsReport:
    """Work JOBS jobs through claim -> complete with JOB_WORKERS HTTP workers on the
    service, each way, then as many through a native BullMQ worker for Node at that
    concurrency; JOB_ROUNDS times in turns, each on a fresh queue: the medians."""
    node = shutil.which("node")
    native = node and (ROOT / "tests" / "interop" / "node_modules" / "bullmq").is_dir()
    with RedisServer(workdir / "jobs-redis") as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN}
        (workdir / "jobs").mkdir()
        runs: dict[str, list[tuple[float, float]]] = {"http": [], "together": [], "native": []}
        alike: dict[bool, list[float]] = {False: [], True: []}
        with Gunicorn(workdir / "jobs", env, bind=f"127.0.0.1:{free_port()}") as service:

            def work(queue: str, together: bool) -> tuple[float, float]:
                """Jobs per second, and Redis's CPU per job in µs, over JOBS jobs."""
                asyncio.run(add_jobs(redis_server.url, queue, JOBS))
                cpu, started = redis_cpu(client), time.monotonic()

                async def workers() -> list[int]:
                    return await asyncio.gather(
                        *(http_worker(service.bind, queue, together) for _ in range(JOB_WORKERS))
                    )

                worked = sum(asyncio.run(workers()))
                seconds = time.monotonic() - started
                return worked / seconds, (redis_cpu(client) - cpu) / worked * 1e6

            def work_natively(queue: str) -> tuple[float, float]:
                """The same through BullMQ's own worker for Node."""
                asyncio.run(add_jobs(redis_server.url, queue, JOBS))
                cpu = redis_cpu(client)
                socket = redis_server.url.removeprefix("unix://")
                script = str(ROOT / "bench" / "native_worker.mjs")
                command = [str(node), script, socket, queue, str(JOBS), str(JOB_WORKERS)]
                ran = subprocess.run(command, capture_output=True, text=True, check=True)
                return JOBS / float(ran.stdout.split()[-1]), (redis_cpu(client) - cpu) / JOBS * 1e6

            for round_ in range(JOB_ROUNDS):
                runs["http"].append(work(f"bench-http-{round_}", together=False))
                runs["together"].append(work(f"bench-together-{round_}", together=True))
                if native:
                    runs["native"].append(work_natively(f"bench-native-{round_}"))
        for round_ in range(JOB_ROUNDS):
            for natively in (False, True):
                queue = f"bench-alike-{'native' if natively else 'service'}-{round_}"
                alike[natively].append(scripts_alike(redis_server.url, queue, natively))
        client.close()

    def medians(kind: str) -> tuple[float, float]:
        rates, redis_us = zip(*runs[kind], strict=True)
        return statistics.median(rates), statistics.median(redis_us)

    alike_us = (statistics.median(alike[False]), statistics.median(alike[True]))
    native_figures = medians("native") if runs["native"] else (None, None)
    return JobsReport(*medians("http"), *medians("together"), *alike_us, *native_figures)


def main() -> int:
    for tool in ("wrk", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: `make bench` installs it where apt-get can")
    workdir = Path(tempfile.mkdtemp(prefix="bullmq-http-bench-"))
    rows: list[Row] = []
    with RedisServer(workdir / "redis") as redis_server:
        client = redis.Redis.from_url(redis_server.url)
        seed(client)
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS_FILE": token_file(workdir)}
        service = Gunicorn(workdir, env, bind=f"127.0.0.1:{free_port()}")
        # The same service without metrics: what counting each request costs.
        (workdir / "no-metrics").mkdir()
        no_metrics = Gunicorn(
            workdir / "no-metrics", {**env, "METRICS": "0"}, bind=f"127.0.0.1:{free_port()}"
        )
        bare = {}
        for name, worker_env in BARE_WORKERS.items():
            directory = workdir / name.split()[0].strip(",")
            directory.mkdir()
            bind = f"127.0.0.1:{free_port()}"
            bare[name] = Gunicorn(directory, worker_env, bind=bind, args=("bench.bare:app",))
        (workdir / "flask").mkdir()
        flask_bare = Gunicorn(
            workdir / "flask", {}, bind=f"127.0.0.1:{free_port()}", args=("bench.flask_bare:app",)
        )
        (workdir / "obvious").mkdir()
        obvious = Gunicorn(
            workdir / "obvious",
            {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN},
            bind=f"127.0.0.1:{free_port()}",
            args=("bench.obvious:app",),
        )
        servers = [service, no_metrics, *bare.values(), flask_bare, obvious]
        try:
            for server in servers:
                start(server)
            for connections in CONNECTIONS:
                # Ceilings, then the routes: alternating, so drift shows on both sides.
                best = 0.0
                for name, server in bare.items():
                    row = measure(
                        server, replace(BARE_REQUEST, name=f"bare: {name}"), connections, client
                    )
                    best = max(best, row.run.rate)
                    rows.append(row)
                row = measure(flask_bare, replace(BARE_REQUEST, name=FLASK_BARE), connections, None)
                row.ceiling_share = row.run.rate / best
                rows.append(row)
                for route in ROUTES:
                    row = measure(service, route, connections, client)
                    row.ceiling_share = row.run.rate / best
                    rows.append(row)
            against = yardsticks(service, flask_bare, obvious, client)
            metrics = metrics_cost(service, no_metrics, client)
            memory = rss_mb(service.worker_pids())
        finally:
            for server in servers:
                server.stop()
        scripts = redis_ceiling(redis_server, client)
        client.close()
    rows += cluster_rows(workdir, best)
    streams = [stream_report(workdir, *load) for load in STREAM_LOADS]
    flooded = flood_report(workdir)
    jobs = jobs_report(workdir)
    shutil.rmtree(workdir, ignore_errors=True)

    report = render(rows, against, memory, scripts, streams, flooded, metrics, jobs)
    print(report)
    results = ROOT / "bench" / "results.md"
    # The record of levers, written by hand below the figures, stays from run to run.
    kept = results.read_text() if results.exists() else ""
    levers = kept[kept.index(LEVERS) :] if LEVERS in kept else ""
    results.write_text(f"{report}\n{levers}" if levers else report)
    return 0


LEVERS = "## Levers"


def render(
    rows: list[Row],
    against: list[Yardsticks],
    memory: list[float],
    scripts: dict[str, tuple[float, float]],
    streams: list[StreamReport],
    flooded: FloodReport,
    metrics: tuple[float, float],
    jobs: JobsReport,
) -> str:
    """Render the results as Markdown."""
    names = ("flask", "werkzeug", "gunicorn", "gevent", "redis", "hiredis")
    versions = ", ".join(f"{name} {version(name)}" for name in names)
    lines = [
        "# Benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} by `make bench` on {machine()}; "
        f"Python {platform.python_version()}, {versions}. wrk with one thread, {SECONDS} s "
        "a run over keep-alive connections; Redis on a unix socket; wrk, gunicorn and "
        "Redis share the cores; the service's API tokens come from a file of 500 scoped "
        "tokens. *÷ best bare*: the route's requests/s over the best bare "
        "gunicorn's at the same connection count. *CPU/req*: CPU time of gunicorn's "
        "workers per request. *Redis/req*: socket reads Redis served (round trips: fewer "
        "than one where requests' commands share a read), and EVALSHA or EXEC calls, per "
        "request. *Redis CPU/req*: Redis's own CPU time (`INFO cpu`) per request, every "
        "master's together on a cluster. *cluster*: the same routes at 32 connections "
        "on a 3-master Redis Cluster (a replica each, all on the same cores), the load "
        "spread over one queue on each master.",
        "",
        "| route | conns | req/s | p50 ms | p99 ms | non-2xx | ÷ best bare | CPU/req "
        "| Redis/req | Redis CPU/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        run = row.run
        share = f"{row.ceiling_share:.2f}" if row.ceiling_share is not None else ""
        redis_note = (
            f"{row.round_trips:.2f} trips, {row.script_calls:.2f} calls"
            if row.round_trips is not None and row.ceiling_share is not None
            else ""
        )
        lines.append(
            f"| {row.name} | {row.connections} | {run.rate:,.0f} | {run.p50_ms:.2f} "
            f"| {run.p99_ms:.2f} | {run.non2xx + run.socket_errors} | {share} "
            f"| {row.cpu_per_request * 1e6:,.0f} µs | {redis_note} "
            f"| {f'{row.redis_us:.1f} µs' if row.redis_us is not None and share else ''} |"
        )
    lines += ["", "Targets, each route at 32 connections:", ""]
    lines += ["| route | ≥ 0.5 of best bare | ≤ 250 µs CPU/req | p99 ≤ 10 ms | one round trip |"]
    lines += ["|---|---|---|---|---|"]
    targeted = []  # the rows of the table of targets
    for row in rows:
        ratio, trips, calls = row.ceiling_share, row.round_trips, row.script_calls
        if row.connections != CONNECTIONS[-1] or ratio is None or trips is None or calls is None:
            continue  # a ceiling, a single connection, or a cluster row
        targeted.append(row)
        checks = (
            (ratio >= 0.5, f"{ratio:.2f}"),
            (row.cpu_per_request <= 250e-6, f"{row.cpu_per_request * 1e6:,.0f} µs"),
            (row.run.p99_ms <= 10, f"{row.run.p99_ms:.1f} ms"),
            (trips < 1.05 and abs(calls - 1) < 0.01, f"{trips:.2f} trips, {calls:.2f} calls"),
        )
        cells = " | ".join(f"{'met' if ok else 'missed'} ({value})" for ok, value in checks)
        lines.append(f"| {row.name} | {cells} |")
    flask = next(r for r in rows if r.name == FLASK_BARE and r.connections == CONNECTIONS[-1])
    flask_rate = flask.run.rate
    shares = [row.run.rate / flask_rate for row in targeted]
    lines += [
        "",
        f"The Flask route that only reads the body and answers OK, at {CONNECTIONS[-1]} "
        f"connections: {flask_rate:,.0f} requests/s ({flask.ceiling_share:.2f} of the best "
        f"bare), {flask.cpu_per_request * 1e6:,.0f} µs of worker CPU per request, p99 "
        f"{flask.run.p99_ms:.1f} ms: what any Flask service costs here before its own work. "
        f"The routes reach {min(shares):.2f} to {max(shares):.2f} of it.",
    ]
    lines += [
        "",
        f"Beside the yardsticks, at {CONNECTIONS[-1]} connections, runs alternating, the best "
        f"of {YARDSTICK_RUNS}: the Flask floor (the Flask route above, asked with the route's "
        "method and body) and the obvious version (bench/obvious.py: plain Flask views "
        "calling redis-py, as a user would write them by hand), all under the project's "
        "gunicorn.conf.py. Requests/s, p99 in brackets; *Redis CPU/req*: Redis's own CPU "
        "time (`INFO cpu`) over all the runs of the service and of the obvious version, per "
        "request served. The targets: Redis CPU per request and requests/s no worse than "
        "the obvious version's.",
        "",
        "| route | service | Flask floor | obvious | ÷ floor | ÷ obvious "
        "| Redis CPU/req | obvious's | Redis ≤ obvious | req/s ≥ obvious |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for mark in against:
        service, floor, obvious = mark.service, mark.floor, mark.obvious
        redis_ok = mark.service_redis_us <= mark.obvious_redis_us
        rate_ok = service.rate >= obvious.rate
        lines.append(
            f"| {mark.route} | {service.rate:,.0f} ({service.p99_ms:.1f} ms) "
            f"| {floor.rate:,.0f} ({floor.p99_ms:.1f} ms) "
            f"| {obvious.rate:,.0f} ({obvious.p99_ms:.1f} ms) "
            f"| {service.rate / floor.rate:.2f} | {service.rate / obvious.rate:.2f} "
            f"| {mark.service_redis_us:.1f} µs | {mark.obvious_redis_us:.1f} µs "
            f"| {'met' if redis_ok else 'missed'} | {'met' if rate_ok else 'missed'} |"
        )
    with_metrics, without = metrics
    extra = with_metrics - without
    lines += [
        "",
        f"Counting each request in the metrics: {extra * 1e6:+,.0f} µs of worker CPU per "
        f"POST progress at 32 connections ({extra / without:+.1%}), the medians of "
        f"{METRICS_PAIRS} runs with and {METRICS_PAIRS} without, alternating.",
    ]
    lines += [
        "",
        "Resident memory of each service worker after the runs: "
        + ", ".join(f"{size:.1f} MB" for size in memory)
        + ".",
        "",
        "Redis alone, running the service's scripts (redis-benchmark, 32 clients, EVALSHA):",
        "",
        "| script | calls/s | p99 ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {rps:,.0f} | {p99:.2f} |" for name, (rps, p99) in scripts.items()]
    lines += [
        "",
        "Streams of events on one worker, each a client of one job's events: Redis "
        "connections of the worker while they were open, its resident memory per stream, "
        f"and the delay from a write to its event at every stream ({STREAM_WRITES} writes "
        "of each kind, 50 ms apart); then, opened again, how long after SIGTERM the last "
        "of them had ended:",
        "",
        "| streams | WORKER_CONNECTIONS | Redis connections | memory/stream | progress p50 "
        "| progress p99 | line p50 | line p99 | ended after SIGTERM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for report in streams:
        (progress50, progress99), (log50, log99) = (
            report.delays_ms["progress"],
            report.delays_ms["log"],
        )
        lines.append(
            f"| {report.streams:,} | {report.worker_connections:,} | {report.clients} "
            f"| {report.memory_per_stream_kb:.0f} KB | {progress50:.0f} ms | {progress99:.0f} ms "
            f"| {log50:.0f} ms | {log99:.0f} ms | {report.ended_after_sigterm_s:.2f} s |"
        )
    quiet, loud = flooded.quiet, flooded.flooded
    refusals = sorted(flooded.refusals.items())
    refused = ", ".join(f"{count:,} answered {status}" for status, count in refusals)
    lines += [
        "",
        f"A stream flood: {FLOOD:,} clients at once open streams of one job's events on the "
        f"default configuration ({WORKERS} workers of 1,000 connections), each refused one "
        f"asking again after {FLOOD_RETRY_SECONDS:g} s. The workers held {flooded.held:,} and "
        f"refused the rest ({refused or 'none'}). POST progress at {CONNECTIONS[-1]} "
        f"connections meanwhile: {loud.rate:,.0f} requests/s, p99 {loud.p99_ms:.1f} ms, "
        f"{loud.non2xx + loud.socket_errors} errors; with no stream open: {quiet.rate:,.0f} "
        f"requests/s, p99 {quiet.p99_ms:.1f} ms.",
        "",
        f"Jobs through their whole life, the medians of {JOB_ROUNDS} rounds taken in turns: "
        f"{JOBS:,} jobs, each claimed and completed, by "
        f"{JOB_WORKERS} HTTP workers at once over keep-alive connections against the "
        "service on its default configuration, either with POST .../claim then "
        ".../complete, or with each completion in the next claim's body (one request a "
        f"job); and by a native BullMQ worker for Node at concurrency {JOB_WORKERS} on the "
        "same Redis (bench/native_worker.mjs). *Redis CPU/job*: Redis's own CPU time over "
        "the jobs.",
        "",
        "| worker | jobs/s | Redis CPU/job |",
        "|---|---:|---:|",
        f"| HTTP: claim, then complete | {jobs.http_rate:,.0f} | {jobs.http_redis_us:.0f} µs |",
        f"| HTTP: complete in the next claim | {jobs.together_rate:,.0f} "
        f"| {jobs.together_redis_us:.0f} µs |",
    ]
    if jobs.native_rate is not None and jobs.native_redis_us is not None:
        lines.append(
            f"| native BullMQ for Node | {jobs.native_rate:,.0f} | {jobs.native_redis_us:.0f} µs |"
        )
        ratio = jobs.together_redis_us / jobs.native_redis_us
        lines += [
            "",
            f"The target, Redis CPU per job over HTTP (one request a job) within "
            f"{OVER_NATIVE} times the native worker's: "
            f"{'met' if ratio <= OVER_NATIVE else 'missed'} ({ratio:.2f}).",
        ]
    else:
        lines.append("| native BullMQ for Node | not run: node or its BullMQ is missing | |")
    lines += [
        "",
        f"The scripts alone, driven alike, the medians of {JOB_ROUNDS} rounds in turns: "
        f"{JOBS:,} jobs one after another from one client, each completion claiming the "
        f"next, cost Redis {jobs.alike_redis_us:.0f} µs of CPU a job by the service's "
        f"script and {jobs.alike_native_us:.0f} µs by BullMQ's own moveToFinished "
        f"fetching the next job as its worker does "
        f"({jobs.alike_redis_us / jobs.alike_native_us:.2f} times). Over HTTP, "
        "Redis gets fewer calls at a time than from the native worker: see "
        '"Where jobs stand" below.',
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
