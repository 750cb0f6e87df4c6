"""`make run`: the local stack serves, and the curl lines it prints work as printed."""

import os
import shlex
import signal
import subprocess
import sys

from dev import free_port, harness_environ, wait_until
from tests.conftest import ROOT


def test_printed_curl_lines_work(tmp_path):
    env = {**harness_environ(), "PORT": str(free_port())}
    log = tmp_path / "out"
    with log.open("w") as output:
        stack = subprocess.Popen(
            [sys.executable, "dev.py"],
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
    finally:
        os.killpg(stack.pid, signal.SIGINT)  # Ctrl-C
        code = stack.wait(timeout=30)
    assert code == 0
    redis_url = next(line for line in printed.splitlines() if "Throwaway Redis at" in line)
    socket_path = redis_url.split("unix://")[1].split(",")[0]
    assert not os.path.exists(socket_path)  # Redis stopped and its directory is gone
