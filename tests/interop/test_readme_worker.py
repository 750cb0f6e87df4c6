"""The README's "Report from your worker", run as printed: report.sh handed its job by
a BullMQ worker for Node and by one for Python, against the service under gunicorn."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from bullmq import Queue

from harness.servers import Gunicorn, RedisServer, free_port, harness_environ, wait_until
from tests.helpers import API_TOKEN, readme_snippet

HERE = Path(__file__).resolve().parent


async def added(url: str, count: int) -> list[str]:
    """Add jobs to the README's queue with BullMQ's Python library; return their ids."""
    queue = Queue("orders", {"connection": url})
    try:
        return [str((await queue.add("resize", {"n": n})).id) for n in range(count)]
    finally:
        await queue.close()


@pytest.fixture
def stack(tmp_path):
    """A Redis on a TCP port, as the README's workers reach one, and the service."""
    with RedisServer(tmp_path / "redis", port=free_port()) as redis_server:
        (tmp_path / "service").mkdir()
        env = {"REDIS_URL": redis_server.url, "AUTH_TOKENS": API_TOKEN, "WEB_CONCURRENCY": "1"}
        bind = f"127.0.0.1:{free_port()}"
        with Gunicorn(tmp_path / "service", env, bind=bind):
            data = redis.Redis.from_url(redis_server.url, decode_responses=True)
            yield redis_server, f"http://{bind}", data
            data.close()


@pytest.mark.parametrize("language", ["js", "python"])
def test_a_bullmq_worker_hands_its_job_to_the_readmes_reporter(stack, tmp_path, language, request):
    redis_server, service, data = stack
    reporter = tmp_path / "report.sh"
    reporter.write_text(readme_snippet("sh", "# report.sh"))
    reporter.chmod(0o755)
    if language == "js":
        worker = tmp_path / "worker.mjs"
        (tmp_path / "node_modules").symlink_to(HERE / "node_modules")  # BullMQ for Node
        command = [request.getfixturevalue("node"), str(worker)]
    else:
        worker = tmp_path / "worker.py"
        command = [sys.executable, str(worker)]
    worker.write_text(readme_snippet(language, f"# {worker.name}" if language == "python" else
                                     f"// {worker.name}"))  # fmt: skip
    env = {**harness_environ(), "BULLMQ_HTTP": service, "REDIS_HOST": "127.0.0.1",
           "REDIS_PORT": str(redis_server.port), "PATH": os.environ["PATH"]}  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_server.port}"
    jobs = asyncio.run(added(redis_url, 3))
    said = tmp_path / "worker.err"
    with said.open("w") as stderr:
        running = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=stderr)
    try:
        wait_until(
            lambda: running.poll() is not None or data.zcard("bull:orders:completed") == 3,
            30,
            "the worker to complete its jobs",
        )
        assert running.poll() is None, said.read_text()
    finally:
        running.terminate()
        running.wait(10)
    for job_id in jobs:
        job = data.hgetall(f"bull:orders:{job_id}")
        assert (job["returnvalue"], job["progress"]) == ('"resized"', '{"step":3,"of":3}')
        assert data.lrange(f"bull:orders:{job_id}:logs", 0, -1) == ["resizing 3 images", "resized"]
        progress = [
            fields["data"]
            for _, fields in data.xrange("bull:orders:events")
            if fields.get("event") == "progress" and fields["jobId"] == job_id
        ]
        assert progress == [f'{{"step":{n},"of":3}}' for n in (1, 2, 3)]


def test_the_reporter_stops_saying_why_when_the_lock_is_lost(stack, tmp_path):
    """A token that no longer holds the job's lock: report.sh exits 1, naming the route
    and the service's reason, and writes nothing."""
    _, service, data = stack
    reporter = tmp_path / "report.sh"
    reporter.write_text(readme_snippet("sh", "# report.sh"))
    reporter.chmod(0o755)
    jobs = asyncio.run(added(f"unix://{stack[0].socket}", 1))
    env = {**harness_environ(), "BULLMQ_HTTP": service, "QUEUE": "orders", "JOB_ID": jobs[0],
           "JOB_TOKEN": "a-lapsed-lock", "PATH": os.environ["PATH"]}  # fmt: skip
    done = subprocess.run([str(reporter)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "report.sh: logs: " in done.stderr and "lock" in done.stderr
    assert data.lrange(f"bull:orders:{jobs[0]}:logs", 0, -1) == []
