"""The process's link to Redis: one server, a Sentinel master, or a cluster; over TLS
where the settings say so.

redis_client makes the connections every request shares (a bounded pool, waiting for a
free connection up to REDIS_TIMEOUT); event_reader_client the event reader's own one.
UNAVAILABLE says which of redis-py's errors mean Redis cannot serve now (a request
answers 503 and may be retried), and error_hint what to fix where that is a setting.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.lock
import redis
from gevent import monkey
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import ConnectionInterface
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .settings import redis_tls, url_credentials
from .upstream import connection_socket

# Redis trouble: the caller may retry, and the connections recover by themselves.
UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    # The Redis user may not run a command, or touch a key: its ACL is short of what
    # the service needs (deploy/redis-acl.conf).
    redis.exceptions.NoPermissionError,
    # A cluster that is failing over, resharding, or missing a slot's master.
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterException,
)


def error_hint(error: redis.exceptions.RedisError, config: Mapping[str, Any]) -> str:
    """Return what to fix for a Redis error the settings cause, naming the settings in
    use; or ""."""
    if isinstance(error, redis.exceptions.AuthenticationError):
        return f" (check {credentials_source(config)})"
    if isinstance(error, redis.exceptions.NoPermissionError):
        return " (grant the Redis user what deploy/redis-acl.conf grants)"
    return ""


def credentials_source(config: Mapping[str, Any]) -> str:
    """Return the settings the Redis user and password come from, as the user set them."""
    if url_credentials(config):
        return "the user and password in REDIS_URL"
    password = "REDIS_PASSWORD_FILE" if config["REDIS_PASSWORD_FILE"] else "REDIS_PASSWORD"
    if not config["REDIS_PASSWORD"]:
        return f"{password}: none is set"
    return f"REDIS_USERNAME and {password}" if config["REDIS_USERNAME"] else password


class RedisCommands(Protocol):
    """What the job store needs of Redis: one server's connections, or a cluster's."""

    def execute_command(self, *args: Any) -> Any: ...

    def close(self) -> None: ...


class OneServer:
    """The process's link to one Redis server (or Sentinel's master), whose pool makes
    the connections: address, credentials, TLS, the sentinels' word.

    A command is sent once. Before it is sent, a connection Redis closed while it was
    idle (a restart, a failover that demoted its server, a client kill) is found and
    made again, and a command that could not be sent whole is sent once more on a new
    connection: Redis cannot have run either. Once sent, a command whose reply does not
    come (a timeout, a connection cut mid-reply) is never sent again, as Redis may have
    run it: the caller answers 503, and the outcome is unknown.
    """

    def __init__(self, pool: redis.ConnectionPool, timeout: float) -> None:
        self.connection_pool = pool
        self.timeout = timeout

    @staticmethod
    def send(connection: ConnectionInterface, args: tuple[Any, ...]) -> None:
        """Send a command whole on a connection, connecting first if need be (a
        connection of Sentinel's asks the sentinels where the master is); once more on a
        new connection where Redis closed this one, or it broke before the command went
        out whole."""
        try:
            connect(connection)
            connection.send_command(*args)
        except redis.exceptions.ConnectionError:
            connection.disconnect()
            connection.connect()
            connection.send_command(*args)

    def close(self) -> None:
        """Close the connections the pool holds itself (a Sentinel pool's, to the
        sentinels); a closed one connects again when next used."""
        self.connection_pool.disconnect()


class Connections(OneServer):
    """The process's connections to one Redis server, each lent to one command at a time.

    At most `size` are open; a command beyond them waits up to `timeout` for one to come
    free, then fails (503). This is redis-py's BlockingConnectionPool and client call
    less what costs more than the round trip itself (bench/results.md): a poll of each
    connection through gevent's hub as it is lent, and telemetry.
    """

    def __init__(self, pool: redis.ConnectionPool, size: int, timeout: float) -> None:
        super().__init__(pool, timeout)
        self.idle: list[ConnectionInterface] = []  # the most recently used last
        self.free = bounded_semaphore(size)

    def execute_command(self, *args: Any) -> Any:
        """Send one command and return Redis's reply."""
        if not self.free.acquire(timeout=self.timeout):
            raise redis.exceptions.ConnectionError(
                f"no Redis connection came free within {self.timeout:g} s (REDIS_MAX_CONNECTIONS)"
            )
        connection = self.idle.pop() if self.idle else self.connection_pool.make_connection()
        try:
            self.send(connection, args)
            try:
                return connection.read_response()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                connection.disconnect()  # it may have run: never sent again
                raise
        finally:
            self.idle.append(connection)
            self.free.release()

    def close(self) -> None:
        """Close the idle connections, and any the pool holds itself."""
        for connection in self.idle:
            connection.disconnect()
        super().close()


class PipelinedConnections(OneServer):
    """The process's link to one Redis server under gevent: one connection, down which
    the commands of every greenlet go together.

    A command is queued; the commands queued while the greenlets that run now run (the
    next turn of gevent's hub) are written at once, then their replies read in order,
    while the next commands queue. Redis reads many commands a system call instead of
    one: what a request costs Redis (bench/results.md).

    A command is sent once, as OneServer sends it. A batch that could not be sent
    whole fails whole, unless it is one command, sent once more on a new connection: of
    several, Redis may have run the first. A timeout or a connection cut mid-reply fails
    the calls of that batch alone (503), and the next batch connects anew. A caller that
    waits past its bound withdraws its command, if it was not sent yet.
    """

    def __init__(self, pool: redis.ConnectionPool, timeout: float) -> None:
        super().__init__(pool, timeout)
        self.queued: list[Call] = []
        self.flushing = False
        self.connection: ConnectionInterface | None = None

    def execute_command(self, *args: Any) -> Any:
        """Queue one command; return Redis's reply once it comes."""
        call = Call(args)
        self.queued.append(call)
        if not self.flushing:
            self.flushing = True
            gevent.spawn(self.flush)
        # A batch ahead of it may take a timeout, and its own a connect and a timeout.
        if not call.done.wait(3 * self.timeout):
            call.withdrawn = True
            raise redis.exceptions.TimeoutError(
                f"Redis did not answer within {3 * self.timeout:g} s (REDIS_TIMEOUT)"
            )
        if call.error is not None:
            raise call.error
        return call.reply

    def flush(self) -> None:
        """Send what is queued and read the replies, a batch at a time, until nothing is
        queued."""
        try:
            while batch := [call for call in self.queued if not call.withdrawn]:
                self.queued = []
                self.run(batch)
        finally:
            self.flushing = False  # what is left queued, the next call's flush sends

    def run(self, batch: list[Call]) -> None:
        """Send one batch of commands and hand each caller its reply or error."""
        if self.connection is None:
            self.connection = self.connection_pool.make_connection()
        connection = self.connection
        try:
            if len(batch) == 1:
                self.send(connection, batch[0].args)
            else:
                batch = self.send_together(connection, batch)
        except redis.exceptions.RedisError as error:
            connection.disconnect()
            for call in batch:
                call.fail(error)
            return
        for at, call in enumerate(batch):
            try:
                call.answer(connection.read_response())
            except redis.exceptions.ResponseError as error:
                call.fail(error)  # the command's own error: the replies stay in step
            except Exception as error:
                # Cut, timed out or garbled: what was sent may have run, and is never
                # sent again.
                connection.disconnect()
                lost = error if isinstance(error, redis.exceptions.RedisError) else (
                    redis.exceptions.ConnectionError(f"Redis's reply could not be read: {error}")
                )  # fmt: skip
                for unanswered in batch[at:]:
                    unanswered.fail(lost)
                return

    @staticmethod
    def send_together(connection: ConnectionInterface, batch: list[Call]) -> list[Call]:
        """Send a batch's commands in one write, connecting first if need be; return the
        calls sent. Each is packed on its own: arguments Redis cannot take fail their
        call alone."""
        packed: list[bytes | memoryview] = []
        sent = []
        for call in batch:
            try:
                packed += connection.pack_command(*call.args)
                sent.append(call)
            except redis.exceptions.DataError as error:
                call.fail(error)
        connect(connection)
        connection.send_packed_command([b"".join(packed)])
        return sent

    def close(self) -> None:
        if self.connection is not None:
            self.connection.disconnect()
        super().close()


class Call:
    """One command queued on PipelinedConnections, and what came of it."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.done = gevent.event.Event()
        self.reply: Any = None
        self.error: redis.exceptions.RedisError | None = None
        self.withdrawn = False  # its caller stopped waiting before it was sent

    def answer(self, reply: Any) -> None:
        self.reply = reply
        self.done.set()

    def fail(self, error: redis.exceptions.RedisError) -> None:
        self.error = error
        self.done.set()


# The standard library's poll, not gevent's: a look at one socket that never waits needs
# no trip through the hub.
POLL = monkey.get_original("select", "poll")


def connect(connection: ConnectionInterface) -> None:
    """Connect a connection if it is not, and anew where Redis closed it while it was
    idle (a restart, a failover that demoted its server, a client kill)."""
    if closed_while_idle(connection):
        connection.disconnect()
    connection.connect()


def closed_while_idle(connection: ConnectionInterface) -> bool:
    """Return whether an idle connection has something to read: Redis closed it (a
    reply nobody asked for is as bad)."""
    sock = connection_socket(connection)
    if sock is None:
        return False
    poll = POLL()
    poll.register(sock.fileno(), select.POLLIN)
    return bool(poll.poll(0))


def bounded_semaphore(size: int) -> threading.BoundedSemaphore:
    """Return a semaphore for `size` holders, of gevent's kind where gevent has patched
    threading: threading's own, rebuilt on patched locks, costs more than a Redis call."""
    if monkey.is_module_patched("threading"):
        return gevent.lock.BoundedSemaphore(size)
    return threading.BoundedSemaphore(size)


def redis_client(config: Mapping[str, Any]) -> RedisCommands:
    """Make the process's Redis connections from the settings."""
    options: dict[str, Any] = {
        "socket_timeout": config["REDIS_TIMEOUT"],
        "socket_connect_timeout": config["REDIS_TIMEOUT"],
        # A failed connect is tried once more at once; a timeout never is.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        # No CLIENT SETINFO on connecting: a round trip, and a command the service's
        # least-privilege Redis user is not granted (deploy/redis-acl.conf).
        "driver_info": None,
        **tls_options(config),
    }
    if config["REDIS_CLUSTER"]:
        return cluster_client(config, options)
    if config["REDIS_SENTINELS"]:
        sentinels = Sentinel(
            config["REDIS_SENTINELS"],
            # The sentinels are reached as the servers are: over TLS where they are.
            sentinel_kwargs={
                "password": config["REDIS_SENTINEL_PASSWORD"],
                "socket_timeout": config["REDIS_TIMEOUT"],
                "driver_info": None,
                **({"ssl": True, **tls_options(config)} if redis_tls(config) else {}),
            },
        )
        # The pool asks the sentinels for the master whenever it connects, so after a
        # failover the next connection goes to the new master.
        pool: redis.ConnectionPool = SentinelPool(
            config["REDIS_SENTINEL_MASTER"],
            sentinels,
            username=config["REDIS_USERNAME"],
            password=config["REDIS_PASSWORD"],
            ssl=redis_tls(config),
            **options,
        )
    elif config["REDIS_URL"]:
        # The URL's own user and password, or else the settings' (never both: see
        # settings.check_settings).
        credentials = {"username": config["REDIS_USERNAME"], "password": config["REDIS_PASSWORD"]}
        pool = redis.ConnectionPool.from_url(config["REDIS_URL"], **credentials, **options)
    else:
        pool = redis.ConnectionPool(
            host=config["REDIS_HOST"],
            port=config["REDIS_PORT"],
            username=config["REDIS_USERNAME"],
            password=config["REDIS_PASSWORD"],
            connection_class=redis.SSLConnection if redis_tls(config) else redis.Connection,
            **options,
        )
    if monkey.is_module_patched("socket"):
        return PipelinedConnections(pool, config["REDIS_TIMEOUT"])
    return Connections(pool, config["REDIS_MAX_CONNECTIONS"], config["REDIS_TIMEOUT"])


def event_reader_client(config: Mapping[str, Any]) -> redis.Redis | RedisCluster:
    """Make the event reader's own client: one connection (one per node of a cluster)."""
    client = redis_client({**config, "REDIS_MAX_CONNECTIONS": 1})
    if isinstance(client, OneServer):
        return redis.Redis.from_pool(client.connection_pool)  # closed with the client
    assert isinstance(client, RedisCluster)
    return client


class SentinelPool(SentinelConnectionPool):
    """redis-py's pool of a Sentinel master's connections, which, disconnected whole (as
    closing a client of it does), closes its connections to the sentinels too.

    It asks the sentinels where the master is through a client of each, whose
    connections redis-py leaves open until the garbage collector finds them. When the
    master moves, redis-py disconnects the pool's idle connections only, and the
    sentinels' stay open for the next question.
    """

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                sentinel.connection_pool.disconnect()


class Cluster(RedisCluster):
    """redis-py's Redis Cluster client, which never sends a command again once it may
    have run, and whose close() closes every node's connections.

    redis-py sends a command again after a connection error or a timeout, when Redis may
    have run it already; this one answers those at once (503), having read the cluster's
    layout again, and retries only what the cluster refused without running it. MOVED,
    ASK and TRYAGAIN it follows as redis-py does.

    Made from a URL, as cluster_client makes it, each node's client is handed a pool it
    does not own, and RedisCluster.close() leaves that pool's connections open until the
    garbage collector finds them.
    """

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]  # fewer than redis-py's
        redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
    )

    def close(self) -> None:
        nodes = self.get_nodes()
        super().close()
        for node in nodes:
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


def cluster_client(config: Mapping[str, Any], options: dict[str, Any]) -> RedisCluster:
    """Make a Redis Cluster client from its seed nodes."""
    seeds = [ClusterNode(host, port) for host, port in config["REDIS_CLUSTER_NODES"]]
    credentials = {"username": config["REDIS_USERNAME"], "password": config["REDIS_PASSWORD"]}
    for url in (config["REDIS_URL"] or "").split(","):
        if url.strip():
            parts = urlsplit(url.strip())
            seeds.append(ClusterNode(parts.hostname or "localhost", parts.port or 6379))
            if parts.username or parts.password:
                credentials = {"username": parts.username, "password": parts.password}
    if not seeds:
        seeds = [ClusterNode(config["REDIS_HOST"], config["REDIS_PORT"])]
    first, *others = seeds
    # Each node's connections take the options of one server's (timeouts, TLS); the
    # cluster retries its own way, below.
    node_options = {name: value for name, value in options.items() if name != "retry"}
    return Cluster(
        # Given a URL, the client makes each node's pool of connection_pool_class; given
        # none, it makes pools that refuse a caller past their size instead of waiting.
        url=f"{'rediss' if redis_tls(config) else 'redis'}://{first.host}:{first.port}",
        startup_nodes=others,
        **node_options,
        # At most this many connections per node; a request beyond them waits for one to
        # come free, up to REDIS_TIMEOUT, then answers 503.
        connection_pool_class=redis.BlockingConnectionPool,
        max_connections=config["REDIS_MAX_CONNECTIONS"],
        timeout=config["REDIS_TIMEOUT"],
        # MOVED and ASK are followed at once; a cluster that is down, or a slot with no
        # master, is retried a few times, within about a second, before the request
        # answers 503 (a connection error or a timeout is not: see Cluster).
        retry=Retry(ExponentialBackoff(cap=0.4, base=0.05), 4),
        **credentials,
    )


def tls_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return redis-py's TLS options from the settings; none for a plain link.

    Without REDIS_TLS_CA_FILE the system's trusted CAs verify the server, as a managed
    Redis with a public certificate needs.
    """
    if not redis_tls(config):
        return {}
    return {
        "ssl_ca_certs": config["REDIS_TLS_CA_FILE"],
        "ssl_certfile": config["REDIS_TLS_CERT_FILE"],
        "ssl_keyfile": config["REDIS_TLS_KEY_FILE"],
        "ssl_check_hostname": config["REDIS_TLS_CHECK_HOSTNAME"],
    }
