"""bullmq-http against the real BullMQ library for Python, once per queue prefix.

Workers here are real bullmq Workers: the processor gets (job, token) and calls the
service with that token from inside, the way an HTTP worker would.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlsplit

from bullmq import Job, Queue, QueueEvents, Worker

from harness.clients import http_call
from tests.helpers import API_TOKEN


def request(service, method: str, path: str, token: str, body=None, content_type=None):
    """Call the service; return (status, body text)."""
    address = urlsplit(service.url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    headers = {"Content-Type": content_type} if content_type else {}
    answer = http_call(conn, method, path, body, headers, token)
    return answer.status, answer.text


async def call(service, method, path, token, body=None, content_type=None):
    """Call the service from async code, off the event loop."""
    return await asyncio.to_thread(request, service, method, path, token, body, content_type)


def job_path(queue: str, job_id: str) -> str:
    return f"/queues/{queue}/jobs/{quote(job_id, safe='')}"


async def post_progress(service, queue, job_id, token, value):
    body = json.dumps(value, ensure_ascii=False).encode()
    return await call(service, "POST", f"{job_path(queue, job_id)}/progress", token, body)


async def post_log(service, queue, job_id, token, body, content_type=None):
    path = f"{job_path(queue, job_id)}/logs"
    return await call(service, "POST", path, token, body.encode(), content_type)


async def get_logs(service, queue, job_id, query):
    path = f"{job_path(queue, job_id)}/logs?{query}"
    status, text = await call(service, "GET", path, API_TOKEN)
    assert status == 200, text
    return json.loads(text)


@asynccontextmanager
async def open_queue(service):
    """Open a queue of the test's own, and close it after."""
    name = f"interop-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, options(service))
    try:
        yield name, queue, service
    finally:
        await queue.close()


def options(service, **more: Any) -> dict[str, Any]:
    """Return bullmq options for one Queue, Worker or QueueEvents of the service's Redis."""
    return {"connection": service.bullmq_connection(), "prefix": service.prefix, **more}


async def until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def process_one(queue, service, processor, job_opts=None, **worker_options):
    """Add a job and let a real Worker run processor(job, token) on it; return its id."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def run(job: Job, token: str) -> str:
        try:
            result = await processor(job, token)
        except BaseException as error:
            done.set_exception(error)
            raise
        done.set_result(result)
        return "done"

    job = await queue.add("report", {"n": 1}, job_opts or {})
    worker = Worker(queue.name, run, options(service, **worker_options))
    try:
        await asyncio.wait_for(done, 30)
    finally:
        await worker.close()
    return job.id


def test_progress_from_a_processor_is_read_by_job_from_id_and_heard(service, data):
    values = [42, {"step": 3, "of": 10}, "halfway", {"msg": "Größe 東京 ✓", "ratio": 0.5}]

    async def scenario():
        async with open_queue(service) as (name, queue, _):
            heard: list[tuple[str, Any]] = []
            events = QueueEvents(name, options(service, blockingTimeout=100))
            events.on("progress", lambda event, *_: heard.append((event["jobId"], event["data"])))
            seen: list[Any] = []

            async def processor(job: Job, token: str) -> None:
                for value in values:
                    assert await post_progress(service, name, job.id, token, value) == (200, "OK")
                    seen.append((await Job.fromId(queue, job.id)).progress)

            try:
                await asyncio.sleep(0.2)  # the listener reads new events only
                job_id = await process_one(queue, service, processor)
                assert seen == values
                await until(lambda: len(heard) == len(values), "progress events")
                assert heard == [(job_id, value) for value in values]
            finally:
                await events.close()

    asyncio.run(scenario())


def test_log_lines_over_http_come_back_from_get_job_logs(service, data):
    sent = [
        (json.dumps("a JSON line"), "application/json"),
        ("a plain line", "text/plain"),
        ("Größe 東京 ✓", "text/plain; charset=utf-8"),
        ("no content type at all", None),
    ]

    async def scenario():
        async with open_queue(service) as (name, queue, _):

            async def processor(job: Job, token: str) -> None:
                for body, content_type in sent:
                    answer = await post_log(service, name, job.id, token, body, content_type)
                    assert answer == (200, "OK")

            job_id = await process_one(queue, service, processor)
            assert await queue.getJobLogs(job_id) == {
                "logs": ["a JSON line", "a plain line", "Größe 東京 ✓", "no content type at all"],
                "count": 4,
            }

    asyncio.run(scenario())


def test_job_log_lines_come_back_from_get_logs_paged_in_both_orders(service, data):
    async def scenario():
        async with open_queue(service) as (name, queue, _):

            async def processor(job: Job, token: str) -> None:
                for n in range(25):
                    await job.log(f"line {n}")

            job_id = await process_one(queue, service, processor)
            for start, length in [(0, 10), (10, 10), (20, 10), (24, 1), (30, 5)]:
                end = start + length - 1
                for asc in (True, False):
                    query = f"start={start}&length={length}&order={'asc' if asc else 'desc'}"
                    page = await get_logs(service, name, job_id, query)
                    assert page == await queue.getJobLogs(job_id, start, end, asc)
                    assert page["count"] == 25
            page = await get_logs(service, name, job_id, "order=desc&length=2")
            assert page["logs"] == ["line 24", "line 23"]

    asyncio.run(scenario())


def test_keep_logs_keeps_the_same_lines_over_http_as_with_job_log(service, data):
    async def scenario():
        async with open_queue(service) as (name, queue, _):

            async def over_http(job: Job, token: str) -> None:
                for n in range(5):
                    assert (await post_log(service, name, job.id, token, f"line {n}"))[0] == 200

            async def direct(job: Job, token: str) -> None:
                for n in range(5):
                    await job.log(f"line {n}")

            first = await process_one(queue, service, over_http, {"keepLogs": 3})
            second = await process_one(queue, service, direct, {"keepLogs": 3})
            kept = {"logs": ["line 2", "line 3", "line 4"], "count": 3}
            assert await queue.getJobLogs(first) == kept
            assert await queue.getJobLogs(second) == kept

    asyncio.run(scenario())


def test_finished_jobs_and_other_jobs_refuse_the_token(service, data):
    async def scenario():
        async with open_queue(service) as (name, queue, _):
            tokens: dict[str, str] = {}

            async def completes(job: Job, token: str) -> None:
                tokens[job.id] = token
                assert (await post_progress(service, name, job.id, token, 50))[0] == 200
                assert (await post_log(service, name, job.id, token, "before"))[0] == 200

            async def fails(job: Job, token: str) -> None:
                tokens[job.id] = token
                raise RuntimeError("broken")

            completed = await process_one(queue, service, completes)
            try:
                await process_one(queue, service, fails)
            except RuntimeError:
                pass
            failed = next(job_id for job_id in tokens if job_id != completed)
            await until(
                lambda: data.exists(f"{service.prefix}:{name}:{failed}:lock") == 0, "unlock"
            )
            assert await Job.fromId(queue, failed) and await queue.getJobState(failed) == "failed"
            assert await queue.getJobState(completed) == "completed"

            for job_id in (completed, failed):
                status, text = await post_progress(service, name, job_id, tokens[job_id], 99)
                assert status == 401 and "lock" in text
                status, _ = await post_log(service, name, job_id, tokens[job_id], "after")
                assert status == 401
            assert (await Job.fromId(queue, completed)).progress == 50
            assert await queue.getJobLogs(completed) == {"logs": ["before"], "count": 1}

            # A worker's token for one active job opens no other job.
            manual = Worker(name, None, options(service))
            try:
                active_job = await queue.add("report", {"n": 2})
                active_token = str(uuid.uuid4())
                assert (await manual.getNextJob(active_token)).id == active_job.id
                assert (await post_progress(service, name, completed, active_token, 1))[0] == 401
                assert (await post_log(service, name, failed, active_token, "x"))[0] == 401
                assert await queue.getJobLogs(failed) == {"logs": [], "count": 0}
                answer = await post_progress(service, name, active_job.id, active_token, 1)
                assert answer == (200, "OK")
            finally:
                await manual.close()

    asyncio.run(scenario())


def test_the_workers_lock_renewal_keeps_the_token_valid(service, data):
    lock_ms = 600

    async def scenario():
        async with open_queue(service) as (name, queue, _):

            async def processor(job: Job, token: str) -> None:
                await asyncio.sleep(lock_ms * 2 / 1000)  # past the first lock's end
                assert await post_progress(service, name, job.id, token, 75) == (200, "OK")

            job_id = await process_one(
                queue, service, processor, lockDuration=lock_ms, lockRenewTime=lock_ms // 3
            )
            assert (await Job.fromId(queue, job_id)).progress == 75

    asyncio.run(scenario())
