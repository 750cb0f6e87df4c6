"""The container image, built from the Dockerfile by `make image` with Podman and run.

Public image registries are out of reach here, so the build's base is made locally
from Debian's packages (debootstrap, with the mirror this machine's apt uses, then
`podman import`) and passed as PYTHON_IMAGE; the Dockerfile is the one users build.
Podman's settings for a machine like this one are in a containers.conf of the tests'
own (CONTAINERS_CONF). Nothing here depends on the Redis server: `make test` runs it
in its first pass only (the `once` mark).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.clients import EventStream, add_active_job, http_call
from harness.servers import RedisServer, answers, free_port, wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, ROOT, unavailable

pytestmark = pytest.mark.once

IMAGE = "localhost/bullmq-http:test"
UID = "10001"
SECRET = "the image tests' watch secret, 32 bytes"


class Podman:
    """The podman command, with the tests' own containers.conf."""

    def __init__(self, binary: str, conf: Path) -> None:
        self.binary = binary
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        done = subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def inspect(self, what: str) -> dict[str, Any]:
        return json.loads(self("inspect", what))[0]


def containers_conf(path: Path) -> Path:
    """Write the settings podman needs here: runc, cgroupfs, events to a file, and
    resource limits no higher than this process has (raising one is not permitted
    without CAP_SYS_RESOURCE, which a sandboxed root may lack)."""
    _, files = resource.getrlimit(resource.RLIMIT_NOFILE)
    processes, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    processes = 4096 if processes == resource.RLIM_INFINITY else min(processes, 4096)
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={files}:{files}", "nproc={processes}:{processes}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    return path


def codename() -> str:
    """Return this Debian's release name, from /etc/os-release."""
    release = Path("/etc/os-release")
    found = (
        re.search(r"^VERSION_CODENAME=(\w+)$", release.read_text(), re.M)
        if release.exists()
        else None
    )
    if not found:
        unavailable("this is not Debian: the test's base image is made with debootstrap")
    return found[1]


def apt_mirror(suite: str) -> str:
    """Return the Debian mirror this machine's apt takes `suite` from."""
    sources = Path("/etc/apt")
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if (
                "deb" in fields.get("Types", "").split()
                and suite in fields.get("Suites", "").split()
            ):
                return fields["URIs"].split()[0]
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]:
        for line in path.read_text().splitlines() if path.exists() else []:
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    unavailable(f"no apt source for {suite} on this machine")


def base_image(podman: Podman, directory: Path) -> str:
    """Return a base image holding Debian's Python 3 and venv, made once per machine."""
    suite = codename()
    tag = f"localhost/bullmq-http-test-base:{suite}"
    if not podman("image", "ls", "--quiet", tag):
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not os.access(debootstrap, os.X_OK):
            unavailable("debootstrap is not installed (make test installs it where apt-get can)")
        root = directory / "root"
        subprocess.run(
            [debootstrap, "--variant=minbase", "--include=python3,python3-venv", suite, str(root),
             apt_mirror(suite)],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        archive = directory / "root.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        podman("import", str(archive), tag, timeout=600)
        shutil.rmtree(root)
        archive.unlink()
    return tag


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    binary = shutil.which("podman")
    if not binary:
        unavailable("podman is not installed (make test installs it where apt-get can)")
    tool = Podman(binary, containers_conf(tmp_path_factory.mktemp("podman") / "containers.conf"))
    try:
        tool("info", timeout=60)
    except AssertionError as error:
        unavailable(f"podman cannot run containers here: {error}")
    return tool


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the image with `make image`, on the local base."""
    base = base_image(podman, tmp_path_factory.mktemp("base"))
    # As docs/operations.md builds behind a proxy: the base made locally, and the build's pip
    # reaching PyPI as this machine's pip does, with its config and CA bundle as build
    # secrets, on the host's network.
    secrets = [
        f"{name}={path}"
        for name, path in (("PIP_CONF", "/etc/pip.conf"),
                           ("CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
        if Path(path).exists()
    ]  # fmt: skip

    def make_image(*extra: str) -> str:
        done = subprocess.run(
            ["make", "-s", "image", f"IMAGE={IMAGE}", f"PYTHON_IMAGE={base}", *secrets,
             f"BUILD_ARGS=--network host {' '.join(extra)}"],
            cwd=ROOT, env=podman.env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    dangling = podman("image", "ls", "--quiet", "--filter", "dangling=true").split()
    make_image("--build-arg VERSION=an-older-one")
    built = make_image()
    # It says what it built, how large, and how long it took; and the image the tag named
    # before is gone, not left dangling.
    assert re.search(rf"^{re.escape(IMAGE)}: \d+ MB, built in \d+ s$", built, re.M), built
    assert podman("image", "ls", "--quiet", "--filter", "dangling=true").split() == dangling
    return IMAGE


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, redis.Redis]]:
    """A Redis server whose socket the container's user reaches through a mount."""
    directory = tmp_path_factory.mktemp("redis")
    directory.chmod(0o755)
    with RedisServer(directory) as server:
        server.socket.chmod(0o777)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        yield directory, client
        client.close()


class Container:
    """One container of the image, serving on a port of loopback."""

    def __init__(
        self, podman: Podman, image: str, redis_dir: Path, secrets: Path, bind: str | None
    ) -> None:
        """`bind`: BIND, with a TCP port 9000 to reach it by; None, the image's own."""
        self.podman = podman
        self.port = free_port()
        self.started = time.monotonic()
        where = ["--env", f"BIND={bind}"] if bind else []
        self.id = podman(
            "run", "--detach", "--read-only", "--publish",
            f"127.0.0.1:{self.port}:{9000 if bind else 8080}", *where,
            "--volume", f"{redis_dir}:/redis", "--volume", f"{secrets}:/run/secrets:ro",
            "--env", "REDIS_URL=unix:///redis/redis.sock",
            "--env", "AUTH_TOKENS_FILE=/run/secrets/api-tokens",
            "--env", "WATCH_TOKEN_SECRET_FILE=/run/secrets/watch-secret",
            "--env", "WEB_CONCURRENCY=1",
            image,
        )  # fmt: skip
        wait_until(
            lambda: (
                self.exited() or answers(lambda: self.request("GET", "/healthz")[0] == 200, OSError)
            ),
            30,
            "the container to serve",
        )
        assert not self.exited(), self.podman("logs", self.id, check=False)

    def exited(self) -> bool:
        return self.podman.inspect(self.id)["State"]["Status"] == "exited"

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None):
        answer = http_call(self.connect(), method, path, body, token=token)
        return answer.status, answer.body

    def processes(self) -> list[int]:
        """Return the host's ids of the container's gunicorn master and workers."""
        master = self.podman.inspect(self.id)["State"]["Pid"]
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return [master, *map(int, children)]

    def remove(self) -> None:
        self.podman("rm", "--force", "--time", "0", self.id, check=False)


@pytest.fixture
def run(podman, image, data, tmp_path) -> Iterator[Any]:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "api-tokens").write_text(f"dashboard {API_TOKEN} *\n")
    (secrets / "watch-secret").write_text(f"{SECRET}\n")
    for path in (secrets, *secrets.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    containers: list[Container] = []

    def start(bind: str | None = None) -> Container:
        containers.append(Container(podman, image, data[0], secrets, bind))
        return containers[-1]

    data[1].flushdb()
    yield start
    for container in containers:
        container.remove()


def test_the_image_holds_the_service_and_nothing_else(podman, image):
    details = podman.inspect(image)
    config = details["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert "BIND=0.0.0.0:8080" in config["Env"] and "8080/tcp" in config["ExposedPorts"]
    assert config["StopSignal"] == "SIGTERM"
    assert details["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "bullmq_http.healthcheck"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.version"] not in ("", "dev")
    assert "org.opencontainers.image.source" in labels
    listing, tools = json.loads(
        podman(
            "run", "--rm", "--entrypoint", "python3", image, "-c",
            "import json, os, shutil; print(json.dumps([sorted(os.listdir('.')),"
            " [shutil.which(c) for c in ('gcc', 'cc', 'git', 'pip')]]))",
        ).splitlines()[-1]
    )  # fmt: skip
    service = {p.name for p in ROOT.glob("*.py")}
    expected = {
        *service,
        "bullmq_http",
        "LICENSE",
        "openapi.yaml",
        "requirements.txt",
        "static",
        "templates",
        "venv",
    }
    assert set(listing) - {"__pycache__"} == expected
    assert tools == [None, None, None, None]  # no compiler, git, or pip


def test_it_serves_every_job_route_read_only_as_its_own_user(run, data):
    container = run()
    r = data[1]
    add_active_job(r, "orders", "42", JOB_TOKEN, name="charge")
    job = "/queues/orders/jobs/42"
    assert container.request("POST", f"{job}/progress", b'{"step":2}', JOB_TOKEN) == (200, b"OK")
    assert container.request("POST", f"{job}/logs", b"charged", JOB_TOKEN) == (200, b"OK")
    assert container.request("POST", f"{job}/logs", b"x", "wrong")[0] == 401
    assert container.request("GET", f"{job}/logs", token=API_TOKEN) == (
        200, b'{"count":1,"logs":["charged"]}'
    )  # fmt: skip
    assert container.request("GET", f"{job}/progress", token=API_TOKEN) == (200, b'{"step":2}')
    assert r.hget("bull:orders:42", "progress") == '{"step":2}'
    assert r.lrange("bull:orders:42:logs", 0, -1) == ["charged"]
    assert [fields["event"] for _, fields in r.xrange("bull:orders:events")] == ["progress"]
    # A watch token, from the secret's mounted file, opens the stream and the page.
    status, body = container.request("POST", f"{job}/events/token", token=API_TOKEN)
    assert status == 200
    token = json.loads(body)["token"]
    conn = container.connect()
    conn.request("GET", f"{job}/events?token={token}")
    response = conn.getresponse()
    assert response.status == 200
    event = next(iter(EventStream(response)))
    assert (event.event, event.data) == ("progress", '{"step":2}')
    conn.close()
    assert container.request("GET", f"{job}/watch")[0] == 200
    # Its own user, and a root filesystem nobody writes to.
    assert (
        container.podman("exec", container.id, "python3", "-c", "import os; print(os.getuid())")
        == UID
    )
    wrote = subprocess.run(
        [container.podman.binary, "exec", container.id, "python3", "-c", "open('/opt/x', 'w')"],
        env=container.podman.env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert wrote.returncode == 1 and "Read-only file system" in wrote.stderr


def test_the_health_check_sees_a_stopped_process(run, podman):
    container = run()
    podman("healthcheck", "run", container.id)  # fails unless healthy
    assert podman.inspect(container.id)["State"]["Health"]["Status"] == "healthy"
    # Failures in the start period (the Dockerfile's 10 s) do not count.
    time.sleep(max(0.0, container.started + 10.5 - time.monotonic()))
    stopped = container.processes()
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(3):  # the Dockerfile's --retries
            podman("healthcheck", "run", container.id, check=False, timeout=30)
        assert podman.inspect(container.id)["State"]["Health"]["Status"] == "unhealthy"
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("bind", ["0.0.0.0:9000", "unix:/tmp/bullmq-http.sock,0.0.0.0:9000"])
def test_the_health_check_asks_where_bind_says(run, podman, bind):
    container = run(bind)
    podman("healthcheck", "run", container.id)  # fails unless healthy
    assert podman.inspect(container.id)["State"]["Health"]["Status"] == "healthy"


def test_build_secrets_stay_out_of_the_image(podman, image):
    """pip's config and the CA, given to `make image` as build secrets, are nowhere in
    the image: not in a layer, not in its history."""
    left = podman(
        "run", "--rm", "--entrypoint", "python3", image, "-c",
        "import os; print([p for p in ('/run/secrets/pip.conf', '/run/secrets/ca.pem',"
        " '/etc/pip.conf') if os.path.exists(p)])",
    )  # fmt: skip
    assert left.splitlines()[-1] == "[]"
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    assert "BEGIN CERTIFICATE" not in history and "ca.pem" not in history


def test_a_stop_finishes_an_upload_and_the_stream_resumes_on_another_container(run, data, podman):
    first, second = run(), run()
    r = data[1]
    add_active_job(r, "orders", "7", JOB_TOKEN, lock_ms=None)
    r.rpush("bull:orders:7:logs", "line 0", "line 1")
    # A stream on the first container, read up to its newest line.
    stream = first.connect()
    stream.request(
        "GET", "/queues/orders/jobs/7/events", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    response = stream.getresponse()
    assert response.status == 200
    reader = EventStream(response)
    events = iter(reader)
    seen = [json.loads(next(events).data)["line"] for _ in range(2)]
    # An upload half sent when the stop comes.
    body = b"uploaded while stopping"
    stopping = threading.Thread(target=podman, args=("stop", "--time", "20", first.id))
    with socket.create_connection(("127.0.0.1", first.port), timeout=20) as upload:
        upload.sendall(
            b"POST /queues/orders/jobs/7/logs HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {JOB_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:8]
        )
        time.sleep(0.3)
        stopping.start()
        time.sleep(1.0)
        upload.sendall(body[8:])
        answer = upload.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    # The stream ends; its client resumes on the second container from its last id.
    seen += [json.loads(event.data)["line"] for event in events]
    stream.close()
    stopping.join(30)
    assert podman.inspect(first.id)["State"]["Status"] == "exited"
    r.rpush("bull:orders:7:logs", "line after the stop")
    resumed = second.connect()
    resumed.request(
        "GET", "/queues/orders/jobs/7/events",
        headers={"Authorization": f"Bearer {API_TOKEN}", "Last-Event-ID": reader.last_event_id},
    )  # fmt: skip
    response = resumed.getresponse()
    assert response.status == 200
    events = iter(EventStream(response))
    stored = r.lrange("bull:orders:7:logs", 0, -1)
    while len(seen) < len(stored):
        seen.append(json.loads(next(events).data)["line"])
    resumed.close()
    assert seen == stored == ["line 0", "line 1", "uploaded while stopping", "line after the stop"]
