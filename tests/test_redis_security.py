"""The Redis link secured: TLS with a private CA, and the least-privilege ACL user of
deploy/redis-acl.conf, against real servers.

Of the servers the suite runs against, only a distribution's redis-server is built with
TLS, so the TLS tests run that one in every pass; the ACL alone is proven on each
pass's own server too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from bullmq import Queue, Worker
from flask import Flask

from app import create_app
from bullmq_http.settings import ConfigError
from harness.clients import EventStream, add_active_job
from harness.servers import (
    ClusterServers,
    Gunicorn,
    RedisServer,
    Sentinels,
    TlsFiles,
    free_port,
    redis_server_binary,
    wait_until,
)
from tests.helpers import (
    API_TOKEN,
    JOB_TOKEN,
    StreamedBody,
    bearer,
    next_event,
    unavailable,
)

ROOT = Path(__file__).resolve().parent.parent
ACL_FILE = ROOT / "deploy" / "redis-acl.conf"
USER, PASSWORD = "bullmq-http", "service-secret"
BULLMQ_USER, BULLMQ_PASSWORD = "bullmq", "bullmq-secret"
SECRET = "watch-token-secret-of-32-bytes-or-more"


def acl_rules(without: str = "") -> list[str]:
    """Return the rules of deploy/redis-acl.conf's user, its password set, less one
    command if named."""
    keyword, name, *rules = service_user().split()
    assert (keyword, name) == ("user", USER)
    return [rule for rule in rules if rule != f"+{without}"]


def service_user() -> str:
    """Return deploy/redis-acl.conf's line, its password set."""
    line = ACL_FILE.read_text().strip()
    assert line.count(">CHANGE-ME") == 1
    return line.replace(">CHANGE-ME", f">{PASSWORD}")


def granted_commands() -> set[str]:
    """Return the commands deploy/redis-acl.conf grants, as Redis names them."""
    return {rule[1:] for rule in acl_rules() if rule.startswith("+")}


# Granted for redis-py's cluster client alone, which asks a node for the slots' owners
# and for the command table; a single server never sees them.
CLUSTER_ONLY = {"cluster|slots", "command"}


def acl_file_args(directory: Path) -> list[str]:
    """Write an ACL file: deploy/redis-acl.conf's user with its password set, and a
    BullMQ worker's own user, free to run anything on the queues' keys; return the
    server options that load it."""
    path = directory / "users.acl"
    path.write_text(
        f"{service_user()}\nuser {BULLMQ_USER} on >{BULLMQ_PASSWORD} ~bull:* &* +@all\n"
    )
    return ["--aclfile", str(path)]


@dataclass(frozen=True)
class Certificates:
    """A private CA's files, and certificates of servers and clients, some of them
    issued by another CA or for another host."""

    ca: Path
    other_ca: Path
    server: TlsFiles  # for localhost and 127.0.0.1
    client: tuple[Path, Path]  # certificate, key
    server_of_other_ca: TlsFiles
    client_of_other_ca: tuple[Path, Path]
    server_of_other_host: TlsFiles  # for redis.example only


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(directory / "ca.pem")
    other_ca.cert_pem.write_to_path(directory / "other-ca.pem")

    def issue(issuer: trustme.CA, name: str, *hosts: str) -> tuple[Path, Path]:
        issued = issuer.issue_cert(*hosts)
        issued.cert_chain_pems[0].write_to_path(directory / f"{name}.pem")
        issued.private_key_pem.write_to_path(directory / f"{name}.key")
        return directory / f"{name}.pem", directory / f"{name}.key"

    def server(issuer: trustme.CA, name: str, *hosts: str) -> TlsFiles:
        # A server trusts clients of our CA, whoever issued its own certificate.
        return TlsFiles(*issue(issuer, name, *hosts), ca=directory / "ca.pem")

    return Certificates(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        server=server(ca, "server", "localhost", "127.0.0.1"),
        client=issue(ca, "client", "bullmq-http"),
        server_of_other_ca=server(other_ca, "other-ca-server", "localhost", "127.0.0.1"),
        client_of_other_ca=issue(other_ca, "other-ca-client", "bullmq-http"),
        server_of_other_host=server(ca, "other-host-server", "redis.example"),
    )


@pytest.fixture(scope="module")
def tls_binary(certificates: Certificates, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Return a redis-server built with TLS: this pass's own, else the distribution's."""
    candidates = dict.fromkeys(filter(None, (redis_server_binary(), shutil.which("redis-server"))))
    for binary in candidates:
        server = RedisServer(
            tmp_path_factory.mktemp("probe"), free_port(), binary=binary, tls=certificates.server
        )
        try:
            server.start()
        except RuntimeError:
            continue  # it exits at once: no TLS in this build
        server.stop()
        return binary
    unavailable(f"no redis-server built with TLS among {list(candidates)}: install redis-server")


@pytest.fixture(scope="module")
def tls_server(
    tls_binary: str, certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """A TLS-only Redis server whose users are those of acl_file_args."""
    directory = tmp_path_factory.mktemp("tls-redis")
    acl = acl_file_args(directory)
    with RedisServer(
        directory, free_port(), acl, binary=tls_binary, tls=certificates.server
    ) as server:
        yield server


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This pass's own Redis server, plain, whose users are those of acl_file_args."""
    directory = tmp_path_factory.mktemp("acl-redis")
    with RedisServer(directory, args=acl_file_args(directory)) as server:
        yield server


@pytest.fixture
def admin() -> Iterator[Callable[[RedisServer], redis.Redis]]:
    """Yield a function that empties a server, forgets what it logged and counted, and
    gives its default user's client."""
    clients: list[redis.Redis] = []

    def connect(server: RedisServer) -> redis.Redis:
        client = server.admin(decode_responses=True)
        client.flushall()
        client.acl_log_reset()
        client.config_resetstat()
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def tls_url(server: RedisServer, user: str = USER, password: str = PASSWORD) -> str:
    """Return the URL of a TLS server's TCP port, as the service's user."""
    return f"rediss://{user}:{password}@localhost:{server.port}/0"


def unix_url(server: RedisServer) -> str:
    """Return the URL of a server's unix socket, as the service's user."""
    return f"unix://{USER}:{PASSWORD}@{server.socket}"


JOB = "/queues/orders/jobs/1"


def exercise_every_route(app: Flask, data: redis.Redis, queue: str = "orders") -> None:
    """Call every route the way a worker and a dashboard do, each way that reaches
    Redis differently; assert what each answers and what Redis holds after."""
    client = app.test_client()
    job = f"/queues/{queue}/jobs/1"
    key = add_active_job(data, queue, "1", JOB_TOKEN, opts={"kl": 2})  # keepLogs: 2
    worker, dashboard = bearer(JOB_TOKEN), bearer(API_TOKEN)
    assert client.get("/readyz").status_code == 200
    assert client.post(f"{job}/progress", json={"percent": 10}, headers=worker).status_code == 200
    # Redis lost its scripts (a restart, SCRIPT FLUSH): the script itself is sent.
    data.script_flush()
    assert client.post(f"{job}/logs", json="first line", headers=worker).status_code == 200
    assert client.post(f"{job}/progress", json=20, headers=bearer("not:it")).status_code == 401
    logs = client.get(f"{job}/logs?start=0&length=10", headers=dashboard)
    assert (logs.status_code, logs.json) == (200, {"count": 1, "logs": ["first line"]})
    progress = client.get(f"{job}/progress", headers=dashboard)
    assert (progress.status_code, progress.json) == (200, {"percent": 10})
    minted = client.post(f"{job}/events/token", headers=dashboard)
    assert minted.status_code == 200
    watch_token = (minted.json or {})["token"]

    # A stream: its opening state, then the event reader's blocking read and its poll.
    response = client.get(f"{job}/events?tail=1&token={watch_token}", buffered=False)
    assert response.status_code == 200
    response.close()
    watching = client.get(f"{job}/events?tail=1", headers=dashboard, buffered=False)
    assert watching.status_code == 200
    events = iter(EventStream(StreamedBody(watching)))
    opening = [next_event(events), next_event(events)]
    assert [(e.event, e.data) for e in opening] == [
        ("progress", '{"percent":10}'),
        ("log", json.dumps({"index": 0, "line": "first line"}, separators=(",", ":"))),
    ]
    assert client.post(f"{job}/progress", json=30, headers=worker).status_code == 200
    assert client.post(f"{job}/logs", json="second line", headers=worker).status_code == 200
    later = [next_event(events), next_event(events)]
    assert sorted((e.event, e.data) for e in later) == [
        ("log", json.dumps({"index": 1, "line": "second line"}, separators=(",", ":"))),
        ("progress", "30"),
    ]
    # A client that resumes gets what it missed, read from the queue's event stream.
    resumed = client.get(
        f"{job}/events", headers={**dashboard, "Last-Event-ID": opening[0].id}, buffered=False
    )
    assert resumed.status_code == 200
    missed = iter(EventStream(StreamedBody(resumed)))
    assert sorted((e.event, e.data) for e in [next_event(missed) for _ in range(3)]) == [
        ("log", json.dumps({"index": 0, "line": "first line"}, separators=(",", ":"))),
        ("log", json.dumps({"index": 1, "line": "second line"}, separators=(",", ":"))),
        ("progress", "30"),
    ]
    resumed.close()
    watching.close()  # the event reader stops listening for the job's lines

    # A third line: the job keeps its newest two.
    assert client.post(f"{job}/logs", json="third line", headers=worker).status_code == 200
    assert data.hget(key, "progress") == "30"
    assert data.lrange(f"{key}:logs", 0, -1) == ["second line", "third line"]


def assert_nothing_denied(*servers: redis.Redis) -> None:
    """Assert that no server refused the service's user anything."""
    for data in servers:
        assert data.acl_log() == []


def commands_run(*servers: redis.Redis) -> set[str]:
    """Return the commands the servers ran, scripts' own calls among them."""
    stats = set()
    for data in servers:
        stats |= {name.removeprefix("cmdstat_") for name in data.info("commandstats")}
    return stats


@pytest.mark.parametrize("link", ["tls", "plain"])
def test_every_route_works_with_the_least_privilege_user_and_needs_all_it_grants(
    request, link, make_app, admin
):
    server = request.getfixturevalue("tls_server" if link == "tls" else "acl_server")
    if link == "tls":
        certificates = request.getfixturevalue("certificates")
        settings = {"REDIS_URL": tls_url(server), "REDIS_TLS_CA_FILE": str(certificates.ca)}
    else:
        settings = {"REDIS_URL": unix_url(server)}
    data = admin(server)
    exercise_every_route(make_app(WATCH_TOKEN_SECRET=SECRET, **settings), data)
    assert_nothing_denied(data)
    # Nothing more: every command the ACL grants, the routes ran (Redis before 7
    # counts a subcommand as its command), the event reader's unsubscribing from the
    # job's lines among them, which follows the closing of the last stream.
    wait_until(lambda: granted_commands() - CLUSTER_ONLY <= commands_run(data), 10, "every command")


def test_the_manual_quotes_the_acl_file():
    readme = (ROOT / "docs" / "operations.md").read_text()
    assert ACL_FILE.read_text().strip() in readme


@pytest.mark.parametrize(
    ("command", "route", "body"),
    [
        ("rpush", "logs", "a line"),  # inside a script
        ("evalsha", "progress", 50),  # the script's own call
    ],
)
def test_a_command_the_user_may_not_run_is_503_naming_it(
    command, route, body, acl_server, make_app, admin, caplog
):
    data = admin(acl_server)
    data.execute_command("ACL", "SETUSER", USER, "reset", *acl_rules(without=command))
    add_active_job(data, "orders", "1", JOB_TOKEN)
    before = data.hgetall("bull:orders:1")
    client = make_app(REDIS_URL=unix_url(acl_server)).test_client()
    with caplog.at_level(logging.WARNING, logger="app"):
        response = client.post(f"{JOB}/{route}", json=body, headers=bearer(JOB_TOKEN))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.get_data(as_text=True) == "Redis is unavailable; retry shortly"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"'{command}'" in warning
    assert "deploy/redis-acl.conf" in warning
    assert data.hgetall("bull:orders:1") == before
    assert not data.exists("bull:orders:1:logs", "bull:orders:events")
    # Granted again, the same request is served, without a restart.
    data.execute_command("ACL", "SETUSER", USER, *acl_rules())
    response = client.post(f"{JOB}/{route}", json=body, headers=bearer(JOB_TOKEN))
    assert response.status_code == 200


def test_a_wrong_password_is_503_until_redis_accepts_it(
    tls_server, certificates, make_app, admin, caplog
):
    data = admin(tls_server)
    add_active_job(data, "orders", "1", JOB_TOKEN)
    app = make_app(
        REDIS_URL=tls_url(tls_server, password="rotated-secret"),
        REDIS_TLS_CA_FILE=str(certificates.ca),
    )
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="app"):
        response = client.post(f"{JOB}/progress", json=50, headers=bearer(JOB_TOKEN))
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "invalid username-password pair" in warning
    assert "(check the user and password in REDIS_URL)" in warning
    assert data.hget("bull:orders:1", "progress") is None
    # The operator adds the new password to the user: served, without a restart.
    data.execute_command("ACL", "SETUSER", USER, ">rotated-secret")
    try:
        response = client.post(f"{JOB}/progress", json=50, headers=bearer(JOB_TOKEN))
        assert response.status_code == 200
        assert data.hget("bull:orders:1", "progress") == "50"
    finally:
        data.execute_command("ACL", "SETUSER", USER, "<rotated-secret")


def refused_then_served(
    make_app: Callable[..., Flask],
    data: redis.Redis,
    refused: dict[str, Any],
    served: dict[str, Any],
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Assert that a write over a link with the `refused` settings answers 503 and
    logs a warning `reason` (a pattern) finds, storing nothing; and that with the
    `served` ones it is stored."""
    add_active_job(data, "orders", "1", JOB_TOKEN)
    client = make_app(**refused).test_client()
    with caplog.at_level(logging.WARNING, logger="app"):
        response = client.post(f"{JOB}/progress", json=50, headers=bearer(JOB_TOKEN))
    assert response.status_code == 503
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.search(reason, warning), warning
    assert data.hget("bull:orders:1", "progress") is None
    client = make_app(**served).test_client()
    assert client.post(f"{JOB}/progress", json=50, headers=bearer(JOB_TOKEN)).status_code == 200
    assert data.hget("bull:orders:1", "progress") == "50"


@pytest.fixture
def start_tls_server(
    tls_binary: str, tmp_path: Path
) -> Iterator[Callable[[TlsFiles], RedisServer]]:
    """Yield a function that starts a TLS-only server with acl_file_args's users."""
    servers: list[RedisServer] = []

    def start(tls: TlsFiles) -> RedisServer:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        acl = acl_file_args(directory)
        servers.append(RedisServer(directory, free_port(), acl, binary=tls_binary, tls=tls))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop()


def test_a_server_certificate_the_ca_did_not_sign_is_refused(
    start_tls_server, certificates, make_app, admin, caplog
):
    server = start_tls_server(certificates.server_of_other_ca)
    refused_then_served(
        make_app,
        admin(server),
        {"REDIS_URL": tls_url(server), "REDIS_TLS_CA_FILE": str(certificates.ca)},
        # Trusting the CA that signed it:
        {
            "REDIS_URL": tls_url(server),
            "REDIS_TLS_CA_FILE": str(certificates.other_ca),
        },
        "certificate verify failed",
        caplog,
    )


def test_mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed(
    start_tls_server, certificates, make_app, admin, caplog
):
    server = start_tls_server(dataclasses.replace(certificates.server, auth_clients="yes"))
    link = {"REDIS_URL": tls_url(server), "REDIS_TLS_CA_FILE": str(certificates.ca)}
    other_cert, other_key = certificates.client_of_other_ca
    cert, key = certificates.client
    data = admin(server)
    refused_then_served(
        make_app,
        data,
        {**link, "REDIS_TLS_CERT_FILE": str(other_cert), "REDIS_TLS_KEY_FILE": str(other_key)},
        {**link, "REDIS_TLS_CERT_FILE": str(cert), "REDIS_TLS_KEY_FILE": str(key)},
        # TLS 1.3 checks a client's certificate after the client's handshake ends: the
        # server's alert arrives as the client reads, or its close as the client writes.
        "unknown ca|EOF occurred in violation of protocol",
        caplog,
    )
    client = make_app(**link).test_client()
    assert client.post(f"{JOB}/progress", json=60, headers=bearer(JOB_TOKEN)).status_code == 503
    assert data.hget("bull:orders:1", "progress") == "50"


def test_a_password_file_beside_a_url_without_one_is_used_and_named_when_wrong(
    tls_server, certificates, make_app, admin, caplog, tmp_path
):
    """REDIS_URL names the server, REDIS_USERNAME and REDIS_PASSWORD_FILE the user."""
    data = admin(tls_server)
    add_active_job(data, "orders", "1", JOB_TOKEN)
    password = tmp_path / "redis-password"
    link = {
        "REDIS_URL": f"rediss://localhost:{tls_server.port}/0",
        "REDIS_USERNAME": USER,
        "REDIS_PASSWORD_FILE": str(password),
        "REDIS_TLS_CA_FILE": str(certificates.ca),
    }
    password.write_text(PASSWORD + "\n")
    client = make_app(**link).test_client()
    assert client.post(f"{JOB}/progress", json=10, headers=bearer(JOB_TOKEN)).status_code == 200
    assert data.hget("bull:orders:1", "progress") == "10"
    password.write_text("not-the-password\n")
    client = make_app(**link).test_client()
    with caplog.at_level(logging.WARNING, logger="app"):
        response = client.post(f"{JOB}/progress", json=20, headers=bearer(JOB_TOKEN))
    assert response.status_code == 503
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "(check REDIS_USERNAME and REDIS_PASSWORD_FILE)" in warning
    assert data.hget("bull:orders:1", "progress") == "10"


def test_the_host_name_is_checked_unless_turned_off(
    start_tls_server, certificates, make_app, admin, caplog
):
    server = start_tls_server(certificates.server_of_other_host)
    # Host and port, not a URL, as a managed Redis's console gives them.
    link = {
        "REDIS_URL": None,
        "REDIS_HOST": "localhost",
        "REDIS_PORT": server.port,
        "REDIS_USERNAME": USER,
        "REDIS_PASSWORD": PASSWORD,
        "REDIS_TLS": True,
        "REDIS_TLS_CA_FILE": str(certificates.ca),
    }
    refused_then_served(
        make_app,
        admin(server),
        link,
        {**link, "REDIS_TLS_CHECK_HOSTNAME": False},
        "Hostname mismatch",
        caplog,
    )


def test_sentinel_over_tls_with_the_least_privilege_user(
    tls_binary, certificates, tmp_path, make_app
):
    acl = acl_file_args(tmp_path)
    with Sentinels(tmp_path, args=acl, binary=tls_binary, tls=certificates.server) as sentinels:
        addresses = sentinels.addresses("localhost")
        app = make_app(
            REDIS_URL=None,
            WATCH_TOKEN_SECRET=SECRET,
            REDIS_SENTINELS=addresses,
            REDIS_SENTINEL_MASTER=sentinels.name,
            REDIS_USERNAME=USER,
            REDIS_PASSWORD=PASSWORD,
            REDIS_TLS=True,
            REDIS_TLS_CA_FILE=str(certificates.ca),
            REDIS_TIMEOUT=0.5,
        )
        with (
            sentinels.master.admin(decode_responses=True) as master,
            sentinels.replica.admin(decode_responses=True) as replica,
        ):
            exercise_every_route(app, master)
            assert_nothing_denied(master)

            # After a failover the sentinels are asked again, over TLS, for the master.
            sentinels.master.stop()
            client = app.test_client()
            wait_until(
                lambda: (
                    client.post(f"{JOB}/logs", json="after", headers=bearer(JOB_TOKEN)).status_code
                    == 200
                ),
                20,
                "a write to the new master",
            )
            assert replica.lrange("bull:orders:1:logs", -1, -1) == ["after"]
            assert_nothing_denied(replica)


def test_cluster_over_tls_with_the_least_privilege_user(
    tls_binary, certificates, tmp_path, make_app
):
    acl = acl_file_args(tmp_path)
    with ClusterServers(tmp_path, args=acl, binary=tls_binary, tls=certificates.server) as cluster:
        app = make_app(
            REDIS_URL=None,
            WATCH_TOKEN_SECRET=SECRET,
            REDIS_CLUSTER=True,
            REDIS_CLUSTER_NODES=tuple(("localhost", node.port) for node in cluster.masters),
            REDIS_USERNAME=USER,
            REDIS_PASSWORD=PASSWORD,
            REDIS_TLS=True,
            REDIS_TLS_CA_FILE=str(certificates.ca),
        )
        nodes = [node.admin(decode_responses=True) for node in cluster.nodes]
        for node in nodes:
            node.config_resetstat()
        # A queue on each master: every route's keys, and a stream, on all three.
        for queue, master in zip(cluster.queues_per_master(), nodes[:3], strict=True):
            exercise_every_route(app, master, queue)
        assert_nothing_denied(*nodes)
        # Only the service's user asked the nodes for the slots and the command table.
        assert CLUSTER_ONLY <= commands_run(*nodes)
        for node in nodes:
            node.close()


def test_tls_files_that_cannot_work_stop_the_factory(certificates):
    cert, key = certificates.client
    _, other_key = certificates.client_of_other_ca
    tls = {"REDIS_URL": "rediss://localhost:6380"}
    cases = [
        ({**tls, "REDIS_TLS_CA_FILE": str(key)}, f"REDIS_TLS_CA_FILE={key} cannot be used: "),
        (
            {**tls, "REDIS_TLS_CERT_FILE": str(cert), "REDIS_TLS_KEY_FILE": str(other_key)},
            f"REDIS_TLS_CERT_FILE={cert} cannot be used: [X509: KEY_VALUES_MISMATCH]",
        ),
        (
            {**tls, "REDIS_TLS_KEY_FILE": str(key)},
            "REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE, its certificate",
        ),
        (
            {"REDIS_URL": "redis://localhost:6379", "REDIS_TLS_CA_FILE": str(certificates.ca)},
            "REDIS_TLS_CA_FILE is set, but the link to Redis is not TLS: set REDIS_TLS=true, "
            "or use a rediss:// REDIS_URL",
        ),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError) as raised:
            create_app(settings)
        assert str(raised.value).startswith(message)
        assert "\n" not in str(raised.value)


@pytest.mark.server  # starts its own servers
def test_bullmq_and_the_service_share_a_tls_server_each_as_its_own_user(
    tls_server, certificates, admin, tmp_path
):
    """A real BullMQ worker, as its own user, reports through the service under
    gunicorn, as the least-privilege user, on one TLS-only server."""
    data = admin(tls_server)
    env = {
        "REDIS_URL": tls_url(tls_server),
        "REDIS_TLS_CA_FILE": str(certificates.ca),
        "AUTH_TOKENS": API_TOKEN,
        "WEB_CONCURRENCY": "1",
    }
    name = f"reports-{uuid.uuid4().hex[:8]}"

    async def scenario() -> str:
        connection = {
            "connection": {
                "host": "localhost",
                "port": tls_server.port,
                "username": BULLMQ_USER,
                "password": BULLMQ_PASSWORD,
                "ssl": True,
                "ssl_ca_certs": str(certificates.ca),
            }
        }
        queue = Queue(name, connection)

        async def process(job, token):
            path = f"/queues/{name}/jobs/{job.id}"
            for route, body in (("progress", b'{"percent": 50}'), ("logs", b"from the worker")):
                url = f"{path}/{route}"
                status = await asyncio.to_thread(server.send, "POST", url, body, token)
                assert status == 200, route
            return {"pages": 3}

        worker = Worker(name, process, connection)
        try:
            job = await queue.add("report", {"month": 11})
            for _ in range(200):
                if await job.isCompleted():
                    return job.id
                await asyncio.sleep(0.05)
            raise AssertionError("the job did not complete within 10 seconds")
        finally:
            await worker.close(force=True)  # the job is done: nothing left to finish
            await queue.close()

    with Gunicorn(tmp_path, env) as server:
        job_id = asyncio.run(scenario())
        conn = server.connect()
        conn.request("GET", f"/queues/{name}/jobs/{job_id}/logs", headers=bearer(API_TOKEN))
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (
            200,
            {"count": 1, "logs": ["from the worker"]},
        )
        conn.close()

        # A dashboard watches another job: the event reader's blocking read, under gevent.
        add_active_job(data, name, "live", JOB_TOKEN)
        assert server.send("POST", f"/queues/{name}/jobs/live/progress", b"10", JOB_TOKEN) == 200
        conn = server.connect()
        conn.request("GET", f"/queues/{name}/jobs/live/events?tail=0", headers=bearer(API_TOKEN))
        events = iter(EventStream(conn.getresponse()))
        opening = next_event(events)
        assert (opening.event, opening.data) == ("progress", "10")
        assert server.send("POST", f"/queues/{name}/jobs/live/progress", b"75", JOB_TOKEN) == 200
        written = next_event(events)
        assert (written.event, written.data) == ("progress", "75")
        conn.close()
    key = f"bull:{name}:{job_id}"
    assert json.loads(data.hget(key, "progress")) == {"percent": 50}
    assert json.loads(data.hget(key, "returnvalue")) == {"pages": 3}
    assert data.lrange(f"{key}:logs", 0, -1) == ["from the worker"]
    assert_nothing_denied(data)


def test_the_tls_link_recovers_by_itself_when_redis_restarts(
    start_tls_server, certificates, make_app, admin
):
    server = start_tls_server(certificates.server)
    add_active_job(admin(server), "orders", "1", JOB_TOKEN)
    app = make_app(REDIS_URL=tls_url(server), REDIS_TLS_CA_FILE=str(certificates.ca))
    client = app.test_client()
    assert client.post(f"{JOB}/progress", json=10, headers=bearer(JOB_TOKEN)).status_code == 200
    server.stop()
    response = client.post(f"{JOB}/progress", json=20, headers=bearer(JOB_TOKEN))
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    server.start()  # empty: it saved nothing
    data = admin(server)
    add_active_job(data, "orders", "1", JOB_TOKEN)
    # The idle connection broke with the old server; the request is sent on a new one.
    assert client.post(f"{JOB}/progress", json=30, headers=bearer(JOB_TOKEN)).status_code == 200
    assert data.hget("bull:orders:1", "progress") == "30"
