"""Working jobs over HTTP: claim the next job as a BullMQ worker does, keep its lock,
complete or fail it, and the stalled check that takes back a job whose worker vanished;
the jobs are added by BullMQ's own Python library, and what Redis holds is checked
after each move."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import pytest
from bullmq import FlowProducer, Queue

from harness.clients import http_call, raw_request
from harness.servers import wait_until
from tests.helpers import (
    API_TOKEN,
    NOT_AN_API_TOKEN,
    bearer,
    kinds,
    one_crowded_worker,
    readme_snippet,
    snapshot,
    take,
    unavailable,
)

WORKER = "worker-token"


def add(redis_url: str, queue: str, name: str = "job", data: Any = None, **opts: Any) -> str:
    """Add a job with BullMQ's Python library; return its id."""

    async def adding() -> str:
        bull = Queue(queue, {"connection": redis_url})
        try:
            job = await bull.add(name, data if data is not None else {"n": 1}, opts)
            return str(job.id)
        finally:
            await bull.close()

    return asyncio.run(adding())


async def add_many(redis_url: str, queue: str, count: int) -> list[str]:
    """Add `count` jobs at once with BullMQ's Python library; return their ids."""
    bull = Queue(queue, {"connection": redis_url})
    try:
        jobs = await bull.addBulk([{"name": "job", "data": {"n": n}} for n in range(count)])
        return [str(job.id) for job in jobs]
    finally:
        await bull.close()


@pytest.fixture
def worker(make_app, tmp_path):
    """Return a test client of an app whose API tokens are: API_TOKEN, every right on
    every queue (AUTH_TOKENS); WORKER, working jobs of orders only; and reader, which
    only reads."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"worker {WORKER} orders work\nreader reader-token * read\n")
    app = make_app(AUTH_TOKENS_FILE=str(tokens), STALLED_INTERVAL_MS=200)
    return app.test_client()


def claim(client, queue: str = "orders", body: Any = None, token: str = WORKER):
    """Claim the next job of a queue through a test client."""
    data = b"" if body is None else json.dumps(body).encode()
    return client.post(f"/queues/{queue}/claim", data=data, headers=bearer(token))


def as_holder(client, job_id: str, route: str, token: str, body: bytes | str = b"", **kw: Any):
    """POST to a route of job `job_id` of orders, as the holder of `token`."""
    return client.post(
        f"/queues/orders/jobs/{job_id}/{route}", data=body, headers=bearer(token), **kw
    )


def test_a_claim_takes_the_next_job_by_priority_and_locks_it(worker, r, redis_url):
    low = add(redis_url, "orders", "low", {"n": 1}, priority=5)
    high = add(redis_url, "orders", "high", {"n": 2}, priority=1)
    first = claim(worker, body={"lockDuration": 5000})
    assert first.status_code == 200
    got = first.json
    assert (got["id"], got["name"], got["data"], got["lockDuration"]) == (
        high,
        "high",
        {"n": 2},
        5000,
    )
    assert got["attemptsMade"] == 0 and got["opts"]["priority"] == 1
    assert len(got["token"]) == 32  # 128 random bits, as hex
    # BullMQ's own layout: active, locked with the token for as long as asked.
    assert r.lrange("bull:orders:active", 0, -1) == [high]
    assert r.get(f"bull:orders:{high}:lock") == got["token"]
    assert 4000 < r.pttl(f"bull:orders:{high}:lock") <= 5000
    second = claim(worker).json
    assert second["id"] == low and second["token"] != got["token"]
    assert second["lockDuration"] == 30_000  # LOCK_DURATION_MS
    assert claim(worker).status_code == 204
    assert claim(worker).data == b""


def test_delayed_and_paused_jobs_are_not_claimed(worker, r, redis_url):
    add(redis_url, "orders", delay=60_000)
    assert claim(worker).status_code == 204
    assert r.zcard("bull:orders:delayed") == 1 and r.llen("bull:orders:active") == 0
    r.hset("bull:orders:meta", "paused", 1)
    add(redis_url, "orders")
    assert claim(worker).status_code == 204
    assert r.llen("bull:orders:active") == 0


def test_a_completion_in_a_claim_on_a_paused_queue_claims_nothing(worker, r, redis_url):
    held_id, waiting = add(redis_url, "orders"), add(redis_url, "orders")
    held = claim(worker).json
    r.hset("bull:orders:meta", "paused", 1)
    answer = claim(worker, body={"complete": {"id": held_id, "token": held["token"]}})
    assert answer.status_code == 204
    assert r.zrange("bull:orders:completed", 0, -1) == [held_id]
    assert r.lrange("bull:orders:wait", 0, -1) == [waiting]
    assert r.llen("bull:orders:active") == 0 and not r.exists(f"bull:orders:{waiting}:lock")


@pytest.mark.parametrize(
    ("queue", "token", "status", "message"),
    [
        ("orders", "reader-token", 403, "this token may not work jobs of queue 'orders'"),
        ("billing", WORKER, 403, "this token may not work jobs of queue 'billing'"),
        ("orders", "nobody", 401, NOT_AN_API_TOKEN),
    ],
)
def test_a_claim_without_the_right_to_work_claims_nothing(
    worker, r, redis_url, queue, token, status, message
):
    add(redis_url, queue)
    before = snapshot(r)
    refused = claim(worker, queue, token=token)
    assert (refused.status_code, refused.text) == (status, message)
    assert snapshot(r) == before


def test_lines_written_before_rights_existed_still_read_and_do_not_work(
    make_app, tmp_path, job, redis_url
):
    tokens = tmp_path / "tokens"
    tokens.write_text("dashboard dash-token *\nbare-token\n")
    client = make_app(AUTH_TOKENS_FILE=str(tokens)).test_client()
    job()
    for token in ("dash-token", "bare-token"):
        assert client.get("/queues/orders/jobs/1/logs", headers=bearer(token)).status_code == 200
        assert claim(client, token=token).status_code == 403
    add(redis_url, "orders")
    assert claim(client, token=API_TOKEN).status_code == 200  # AUTH_TOKENS: every right


COMPLETE_SHAPE = 'complete must be {"id": "...", "token": "...", "returnvalue": ...}'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"lockDuration": 0}, "lockDuration must be a whole number from 1 to 86400000"),
        ({"lockDuration": "10"}, "lockDuration must be a whole number from 1 to 86400000"),
        ({"lock": 10}, 'the body must be a JSON object with at most "lockDuration" and "complete"'),
        ([1], 'the body must be a JSON object with at most "lockDuration" and "complete"'),
        ({"complete": {"id": "1"}}, COMPLETE_SHAPE),
        ({"complete": {"id": 1, "token": "t"}}, COMPLETE_SHAPE),
        ({"complete": {"id": "1", "token": "t", "value": 1}}, COMPLETE_SHAPE),
        ({"complete": "1"}, COMPLETE_SHAPE),
    ],
)
def test_a_bad_claim_body_is_a_400_and_claims_nothing(worker, r, redis_url, body, message):
    add(redis_url, "orders")
    before = snapshot(r)
    refused = claim(worker, body=body)
    assert (refused.status_code, refused.text) == (400, message)
    assert snapshot(r) == before


def test_the_lock_is_extended_only_by_its_holder(worker, r, redis_url):
    add(redis_url, "orders")
    got = claim(worker, body={"lockDuration": 1000}).json
    lock = f"bull:orders:{got['id']}:lock"
    r.sadd("bull:orders:stalled", got["id"])
    longer = json.dumps({"duration": 60_000})
    assert as_holder(worker, got["id"], "lock", got["token"], longer).status_code == 200
    assert 59_000 < r.pttl(lock) <= 60_000
    assert not r.sismember("bull:orders:stalled", got["id"])  # as BullMQ's extendLock
    refused = as_holder(worker, got["id"], "lock", "not-the-token")
    assert refused.status_code == 401
    assert r.get(lock) == got["token"]
    gone = as_holder(worker, "nope", "lock", got["token"])
    assert (gone.status_code, gone.text) == (404, "job 'nope' not found in queue 'orders'")


def test_complete_stores_the_return_value_as_bullmq_does_once(worker, r, redis_url):
    job_id = add(redis_url, "orders")
    got = claim(worker).json
    done = as_holder(worker, job_id, "complete", got["token"], b'{"sum": 3, "at": 1.50}')
    assert done.status_code == 200
    job = r.hgetall(f"bull:orders:{job_id}")
    assert job["returnvalue"] == '{"sum":3,"at":1.5}'  # as JSON.stringify writes it
    assert int(job["finishedOn"]) >= int(job["processedOn"])
    assert r.zscore("bull:orders:completed", job_id) is not None
    assert r.llen("bull:orders:active") == 0 and not r.exists(f"bull:orders:{job_id}:lock")
    completed = [f for _, f in r.xrange("bull:orders:events") if f.get("event") == "completed"]
    assert completed == [
        {
            "event": "completed",
            "jobId": job_id,
            "returnvalue": '{"sum":3,"at":1.5}',
            "prev": "active",
        }
    ]
    again = as_holder(worker, job_id, "complete", got["token"], b"1")
    assert again.status_code == 401
    assert r.hget(f"bull:orders:{job_id}", "returnvalue") == '{"sum":3,"at":1.5}'


def test_the_token_bullmq_takes_for_no_lock_moves_nothing(worker, r, redis_url):
    """BullMQ's move scripts skip the lock check for the token "0"; over HTTP it is
    a token like any other wrong one."""
    job_id = add(redis_url, "orders")
    held = claim(worker).json
    before = snapshot(r)
    for route, body in (("complete", b'"done"'), ("fail", b"boom")):
        refused = as_holder(worker, job_id, route, "0", body)
        assert refused.status_code == 401, route
        assert "not this job's lock token" in refused.text
    refused = claim(worker, body={"complete": {"id": job_id, "token": "0"}})
    assert refused.status_code == 401
    assert snapshot(r) == before
    assert r.get(f"bull:orders:{job_id}:lock") == held["token"]


def test_complete_with_no_body_is_null_and_remove_on_complete_is_honoured(worker, r, redis_url):
    job_id = add(redis_url, "orders", removeOnComplete=True)
    got = claim(worker).json
    assert as_holder(worker, job_id, "complete", got["token"]).status_code == 200
    assert not r.exists(f"bull:orders:{job_id}")
    assert r.zscore("bull:orders:completed", job_id) is None
    kept = add(redis_url, "orders")
    token = claim(worker).json["token"]
    assert as_holder(worker, kept, "complete", token).status_code == 200
    assert r.hget(f"bull:orders:{kept}", "returnvalue") == "null"
    # A number keeps that many of the newest completed jobs, as BullMQ's worker does.
    newest = [add(redis_url, "orders", removeOnComplete=1) for _ in range(2)]
    for job_id in newest:
        token = claim(worker).json["token"]
        assert as_holder(worker, job_id, "complete", token).status_code == 200
    assert r.zrange("bull:orders:completed", 0, -1) == [newest[-1]]
    assert not r.exists(f"bull:orders:{kept}") and not r.exists(f"bull:orders:{newest[0]}")


def test_remove_on_complete_is_read_however_its_json_spells_it(worker, r, redis_url):
    """The key spelled with a JSON escape is the same key to BullMQ's JSON.parse."""
    escaped, other = add(redis_url, "orders"), add(redis_url, "orders")
    r.hset(f"bull:orders:{escaped}", "opts", '{"removeOn\\u0043omplete":true}')
    r.hset(f"bull:orders:{other}", "opts", '{"attempts":1,"removeOnFail":true}')
    held = claim(worker).json
    body = {"complete": {"id": escaped, "token": held["token"]}}
    assert claim(worker, body=body).json["id"] == other
    assert not r.exists(f"bull:orders:{escaped}")
    assert r.zrange("bull:orders:completed", 0, -1) == []


def test_a_claim_completes_the_job_before_it_in_the_same_round_trip(worker, r, redis_url):
    """`complete` in a claim's body: the finished job is completed as the complete route
    completes it, and the next is claimed with a lock of its own."""
    first, second = add(redis_url, "orders"), add(redis_url, "orders")
    held = claim(worker).json
    body = {
        "complete": {"id": first, "token": held["token"], "returnvalue": {"n": 1}},
        "lockDuration": 5000,
    }
    next_job = claim(worker, body=body)
    assert next_job.status_code == 200
    assert next_job.json["id"] == second and next_job.json["token"] != held["token"]
    assert next_job.json["lockDuration"] == 5000
    assert 4000 < r.pttl(f"bull:orders:{second}:lock") <= 5000
    job = r.hgetall(f"bull:orders:{first}")
    assert job["returnvalue"] == '{"n":1}' and "finishedOn" in job
    assert r.zrange("bull:orders:completed", 0, -1) == [first]
    assert not r.exists(f"bull:orders:{first}:lock")
    assert r.get(f"bull:orders:{second}:lock") == next_job.json["token"]
    # The last one: completed, and nothing left to claim.
    body = {"complete": {"id": second, "token": next_job.json["token"]}}
    assert claim(worker, body=body).status_code == 204
    assert r.hget(f"bull:orders:{second}", "returnvalue") == "null"
    completed = [f for _, f in r.xrange("bull:orders:events") if f.get("event") == "completed"]
    assert [f["jobId"] for f in completed] == [first, second]


def test_a_claim_whose_completion_is_refused_claims_nothing(worker, r, redis_url):
    first, waiting = add(redis_url, "orders"), add(redis_url, "orders")
    claim(worker)
    before = snapshot(r)
    body = {"complete": {"id": first, "token": "not-the-lock"}}
    refused = claim(worker, body=body)
    assert refused.status_code == 401
    assert snapshot(r) == before
    assert r.lrange("bull:orders:wait", 0, -1) == [waiting]
    gone = claim(worker, body={"complete": {"id": "nope", "token": "t"}})
    assert (gone.status_code, gone.text) == (404, "job 'nope' not found in queue 'orders'")
    assert snapshot(r) == before


def test_a_waiting_claim_completes_at_once_then_waits(worker, r, redis_url):
    first = add(redis_url, "orders")
    held = claim(worker).json
    body = json.dumps({"complete": {"id": first, "token": held["token"]}}).encode()
    answer = worker.post("/queues/orders/claim?wait=1", data=body, headers=bearer(WORKER))
    assert answer.status_code == 204
    assert r.zrange("bull:orders:completed", 0, -1) == [first]


def test_fail_retries_after_the_backoff_then_fails_for_good(worker, r, redis_url):
    job_id = add(redis_url, "orders", attempts=3, backoff={"type": "exponential", "delay": 1000})
    token = claim(worker).json["token"]
    before = int(time.time() * 1000)
    first = as_holder(worker, job_id, "fail", token, json.dumps({"reason": "the disk is full"}),
                 content_type="application/json")  # fmt: skip
    assert (first.status_code, first.json) == (200, {"state": "delayed", "delay": 1000})
    due = r.zscore("bull:orders:delayed", job_id)
    assert due is not None and before + 1000 <= int(due) // 4096 <= before + 3000
    job = r.hgetall(f"bull:orders:{job_id}")
    assert (job["atm"], job["failedReason"]) == ("1", "the disk is full")
    # Promoted by hand, as the delay passing would: the next attempt backs off 2 s.
    r.zrem("bull:orders:delayed", job_id)
    r.lpush("bull:orders:wait", job_id)
    token = claim(worker).json["token"]
    second = as_holder(worker, job_id, "fail", token, "again, in plain text")
    assert second.json == {"state": "delayed", "delay": 2000}
    r.zrem("bull:orders:delayed", job_id)
    r.lpush("bull:orders:wait", job_id)
    token = claim(worker).json["token"]
    last = as_holder(worker, job_id, "fail", token, "for good")
    assert last.json == {"state": "failed", "delay": 0}
    job = r.hgetall(f"bull:orders:{job_id}")
    assert (job["atm"], job["failedReason"]) == ("3", "for good")
    assert r.zscore("bull:orders:failed", job_id) is not None
    failed = [f for _, f in r.xrange("bull:orders:events") if f.get("event") == "failed"]
    assert [f["failedReason"] for f in failed] == ["for good"]


def test_fail_without_backoff_waits_and_unrecoverable_fails_at_once(worker, r, redis_url):
    job_id = add(redis_url, "orders", attempts=5)
    token = claim(worker).json["token"]
    again = as_holder(worker, job_id, "fail", token, "try again")
    assert again.json == {"state": "waiting", "delay": 0}
    assert r.lrange("bull:orders:wait", 0, -1) == [job_id]
    token = claim(worker).json["token"]
    body = json.dumps({"reason": "bad input", "retry": False, "stack": "at line 3"})
    final = as_holder(worker, job_id, "fail", token, body, content_type="application/json")
    assert final.json == {"state": "failed", "delay": 0}
    job = r.hgetall(f"bull:orders:{job_id}")
    assert job["failedReason"] == "bad input" and json.loads(job["stacktrace"]) == ["at line 3"]


def test_a_custom_backoff_takes_the_workers_delay(worker, r, redis_url):
    job_id = add(redis_url, "orders", attempts=2, backoff={"type": "mine"})
    token = claim(worker).json["token"]
    body = json.dumps({"reason": "later", "delay": 5000})
    answer = as_holder(worker, job_id, "fail", token, body, content_type="application/json")
    assert answer.json == {"state": "delayed", "delay": 5000}


def test_a_backoffs_jitter_is_drawn_afresh_for_each_failure(worker, r, redis_url):
    backoff = {"type": "fixed", "delay": 1000, "jitter": 0.5}
    delays = []
    for _ in range(12):
        job_id = add(redis_url, "orders", attempts=2, backoff=backoff)
        token = claim(worker).json["token"]
        answer = as_holder(worker, job_id, "fail", token, "flaky")
        assert answer.json["state"] == "delayed"
        delays.append(answer.json["delay"])
        assert r.hget(f"bull:orders:{job_id}", "delay") == str(delays[-1])
    # Between (1 - jitter) and all of the delay, as BullMQ's Node worker draws it.
    assert all(500 <= delay <= 1000 for delay in delays) and len(set(delays)) > 1


def test_the_stack_trace_is_kept_as_bullmqs_worker_keeps_it(worker, r, redis_url):
    """The stack joins the job's trace as JSON.stringify writes it, and the job's own
    stackTraceLimit keeps the newest; a failure without a stack keeps the trace."""
    job_id = add(redis_url, "orders", attempts=4, stackTraceLimit=2)
    stacks = ['at "a" (/srv/a.js:1)', "at b\u001b[31m\ttab\\", "at Größe 東京 ✓\u2028"]
    for stack in [*stacks, None]:
        token = claim(worker).json["token"]
        report = {"reason": "broken", **({"stack": stack} if stack else {})}
        body = json.dumps(report)
        as_holder(worker, job_id, "fail", token, body, content_type="application/json")
        r.lrem("bull:orders:wait", 0, job_id)  # retried: back in line for the next claim
        r.lpush("bull:orders:wait", job_id)
    trace = r.hget(f"bull:orders:{job_id}", "stacktrace")
    assert trace == json.dumps(stacks[-2:], separators=(",", ":"), ensure_ascii=False)
    assert r.hget(f"bull:orders:{job_id}", "atm") == "4"
    assert r.zscore("bull:orders:failed", job_id) is not None


def test_a_flow_child_failed_for_good_fails_its_parent_as_it_asks(worker, r, redis_url):
    async def adding() -> str:
        flows = FlowProducer({"connection": redis_url})
        try:
            child = {"name": "child", "queueName": "orders", "data": {},
                     "opts": {"failParentOnFailure": True}}  # fmt: skip
            tree = await flows.add({"name": "parent", "queueName": "parents", "children": [child]})
            return str(tree["job"].id)
        finally:
            await flows.close()

    parent = asyncio.run(adding())
    job = claim(worker).json
    assert as_holder(worker, job["id"], "fail", job["token"], "broken").json["state"] == "failed"
    # BullMQ moves the parent on, to fail when a worker takes it (its deferred failure).
    child = f"bull:orders:{job['id']}"
    assert r.lrange("bull:parents:wait", 0, -1) == [parent]
    assert r.hget(f"bull:parents:{parent}", "defa") == f"child {child} failed"
    assert r.zrange(f"bull:parents:{parent}:unsuccessful", 0, -1) == [child]


def test_a_retried_lifo_job_is_next_and_remove_on_fail_is_honoured(worker, r, redis_url):
    lifo = add(redis_url, "orders", attempts=2, lifo=True, removeOnFail=True)
    token = claim(worker).json["token"]
    other = add(redis_url, "orders")
    assert as_holder(worker, lifo, "fail", token, "again").json == {"state": "waiting", "delay": 0}
    # Pushed to the front of the line, as BullMQ's retryJob pushes a lifo job.
    again = claim(worker).json
    assert again["id"] == lifo and again["attemptsMade"] == 1
    assert as_holder(worker, lifo, "fail", again["token"], "gone").json["state"] == "failed"
    # removeOnFail: the job is gone, and not in the failed set.
    assert not r.exists(f"bull:orders:{lifo}")
    assert r.zrange("bull:orders:failed", 0, -1) == []
    assert r.lrange("bull:orders:wait", 0, -1) == [other]


@pytest.mark.parametrize(
    ("body", "json_body", "message"),
    [
        (b"", False, "the reason is empty"),
        (b"\xff", False, "the reason is not valid UTF-8"),
        (
            b'{"retry": false}',
            True,
            'the body must be {"reason": "...", "retry": true|false, "delay": ms}',
        ),
        (b'{"reason": ""}', True, "the reason must be a JSON string, not empty"),
        (b'{"reason": "x", "retry": 1}', True, "retry must be true or false"),
        (
            b'{"reason": "x", "delay": -1}',
            True,
            "delay must be a whole number from 0 to 9007199254740991",
        ),
    ],
)
def test_a_bad_fail_body_is_a_400_and_writes_nothing(
    worker, r, redis_url, body, json_body, message
):
    job_id = add(redis_url, "orders", attempts=2)
    token = claim(worker).json["token"]
    before = snapshot(r)
    kind = {"content_type": "application/json"} if json_body else {}
    refused = as_holder(worker, job_id, "fail", token, body, **kind)
    assert (refused.status_code, refused.text) == (400, message)
    assert snapshot(r) == before


def test_finishing_a_job_that_waits_for_its_children_is_a_409(worker, r, redis_url):
    job_id = add(redis_url, "orders")
    token = claim(worker).json["token"]
    r.sadd(f"bull:orders:{job_id}:dependencies", "bull:other:child")
    before = snapshot(r)
    refused = as_holder(worker, job_id, "complete", token, b"1")
    assert (refused.status_code, refused.text) == (
        409, "the job is waiting for its children: it finishes when they have"
    )  # fmt: skip
    assert snapshot(r) == before


def test_a_job_whose_worker_vanished_is_taken_back_and_claimed_anew(worker, r, redis_url):
    """STALLED_INTERVAL_MS=200 here: the stalled check runs five times a second."""
    job_id = add(redis_url, "orders")
    first = claim(worker, body={"lockDuration": 100}).json
    wait_until(lambda: r.lrange("bull:orders:wait", 0, -1) == [job_id], 10, "the job taken back")
    stalled = [f for _, f in r.xrange("bull:orders:events") if f.get("event") == "stalled"]
    assert stalled == [{"event": "stalled", "jobId": job_id}]
    second = claim(worker).json
    assert second["id"] == job_id and second["token"] != first["token"]
    assert as_holder(worker, job_id, "complete", first["token"], b"1").status_code == 401
    assert as_holder(worker, job_id, "complete", second["token"], b"2").status_code == 200
    assert r.hget(f"bull:orders:{job_id}", "returnvalue") == "2"


def test_after_a_restart_a_vanished_workers_job_is_taken_back_unasked(serve, r, redis_url):
    """The service restarts while a job's HTTP worker has vanished, and no worker asks
    for a job of that queue again, only of another: the new process finds the queues
    with active jobs itself and runs the stalled check for them (STALLED_INTERVAL_MS=200
    after the restart)."""
    job_id = add(redis_url, "orders")
    before = serve(STALLED_INTERVAL_MS="60000")
    claimed = http_call(before.connect(), "POST", "/queues/orders/claim",
                        b'{"lockDuration": 100}', token=API_TOKEN)  # fmt: skip
    assert json.loads(claimed.body)["id"] == job_id
    before.stop()  # and the worker that claimed it is gone too
    assert r.lrange("bull:orders:active", 0, -1) == [job_id]
    after = serve(STALLED_INTERVAL_MS="200")
    other = http_call(after.connect(), "POST", "/queues/emails/claim", token=API_TOKEN)
    assert other.status == 204
    wait_until(lambda: r.lrange("bull:orders:wait", 0, -1) == [job_id], 10, "the job back")
    stalled = [f for _, f in r.xrange("bull:orders:events") if f.get("event") == "stalled"]
    assert stalled == [{"event": "stalled", "jobId": job_id}]


def test_heartbeats_keep_a_short_lock_through_many_stalled_checks(worker, r, redis_url):
    job_id = add(redis_url, "orders")
    got = claim(worker, body={"lockDuration": 300}).json
    deadline = time.monotonic() + 2.0  # ten stalled checks
    while time.monotonic() < deadline:
        beat = as_holder(worker, job_id, "lock", got["token"], b'{"duration": 300}')
        assert beat.status_code == 200
        time.sleep(0.1)
    assert r.lrange("bull:orders:active", 0, -1) == [job_id]
    assert as_holder(worker, job_id, "complete", got["token"], b"true").status_code == 200


def test_the_readmes_shell_worker_works_jobs_as_printed(serve, r, redis_url):
    """The README's worker in plain shell, run as printed with bash, curl and jq,
    against the service under gunicorn: it completes a job, and fails one whose data
    it cannot read."""
    if not shutil.which("jq"):
        unavailable("jq is not installed (make test installs it where apt-get can)")
    server = serve()
    worker = readme_snippet("sh", "/claim")
    env = {"PATH": os.environ["PATH"], "API_TOKEN": API_TOKEN, "BASE": f"http://{server.bind}"}
    env["WAIT"] = "1"  # the claim's ?wait=, made short for the idle run
    good = add(redis_url, "orders", "count", {"items": [1, 2, 3]})
    bad = add(redis_url, "orders", "count", {"items": True})
    for _ in range(2):
        done = subprocess.run(
            ["bash", "-c", worker], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
    job = r.hgetall(f"bull:orders:{good}")
    assert (job["returnvalue"], job["progress"]) == ('{"total":3}', "50")
    assert r.lrange(f"bull:orders:{good}:logs", 0, -1) == [f"started on {socket.gethostname()}"]
    failed = r.hgetall(f"bull:orders:{bad}")
    assert "has no length" in failed["failedReason"]
    assert r.zscore("bull:orders:failed", bad) is not None
    # Nothing left to claim: the worker does nothing, and says nothing.
    idle = subprocess.run(
        ["bash", "-c", worker], env=env, capture_output=True, text=True, timeout=30
    )
    assert (idle.returncode, idle.stdout, idle.stderr) == (0, "", "")


# ----------------------------------------------------------------- waiting claims


def claim_later(app, path: str, headers: dict[str, str]) -> tuple[list[Any], threading.Thread]:
    """Claim in a thread of its own; return where its answer lands, and the thread."""
    answers: list[Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(app.test_client().post(path, headers=headers))
    )
    thread.start()
    return answers, thread


def test_a_waiting_claim_wakes_when_a_job_arrives(make_app, r, redis_url):
    app = make_app()
    answers, thread = claim_later(app, "/queues/orders/claim?wait=20", bearer(API_TOKEN))
    time.sleep(0.3)  # the claim is waiting by now, or takes the job at once: both fine
    job_id = add(redis_url, "orders", "late")
    thread.join(10)
    assert not thread.is_alive()
    (answer,) = answers
    assert (answer.status_code, answer.json["id"], answer.json["name"]) == (200, job_id, "late")
    assert r.get(f"bull:orders:{job_id}:lock") == answer.json["token"]


def test_a_waiting_claim_ends_with_204_when_no_job_comes(make_app, r):
    client = make_app().test_client()
    started = time.monotonic()
    answer = client.post("/queues/orders/claim?wait=1", headers=bearer(API_TOKEN))
    assert (answer.status_code, answer.data) == (204, b"")
    assert time.monotonic() - started >= 1
    too_long = client.post("/queues/orders/claim?wait=61", headers=bearer(API_TOKEN))
    assert (too_long.status_code, too_long.text) == (
        400,
        "wait must be a whole number from 0 to 60",
    )


def test_waiting_claims_are_capped_per_token_and_counted_with_streams(make_app, redis_url):
    app = make_app(MAX_WAITING_CLAIMS_PER_TOKEN=2, MAX_STREAMS=3)
    waiting = [
        claim_later(app, "/queues/orders/claim?wait=20", bearer(API_TOKEN)) for _ in range(2)
    ]
    limits = app.extensions["bullmq_http"].stream_limits
    wait_until(lambda: limits.open == 2, 10, "two claims waiting")
    refused = app.test_client().post("/queues/orders/claim?wait=5", headers=bearer(API_TOKEN))
    assert (refused.status_code, refused.headers["Retry-After"], refused.text) == (
        429,
        "10",
        "this API token holds its most claims waiting for a job here "
        "(MAX_WAITING_CLAIMS_PER_TOKEN=2): close one, then retry",
    )
    # Without ?wait=, a claim holds nothing and is not counted.
    assert (
        app.test_client().post("/queues/orders/claim", headers=bearer(API_TOKEN)).status_code == 204
    )
    ids = {add(redis_url, "orders"), add(redis_url, "orders")}
    for _, thread in waiting:
        thread.join(10)
    assert {answers[0].json["id"] for answers, _ in waiting} == ids
    assert limits.open == 0


@pytest.mark.server  # starts its own servers
def test_a_thousand_waiting_claims_share_a_bounded_number_of_connections(tmp_path):
    claims = 1000
    with one_crowded_worker(tmp_path, MAX_WAITING_CLAIMS_PER_TOKEN="1000") as (server, data):

        async def claimer(sent: asyncio.Event) -> bytes:
            path = server.bind.removeprefix("unix:")
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(raw_request("POST", "/queues/orders/claim?wait=30", API_TOKEN, b""))
            await writer.drain()
            sent.set()
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            return head.split(b"\r\n", 1)[0]

        async def crowd() -> tuple[list[bytes], int]:
            sent = [asyncio.Event() for _ in range(claims)]
            tasks = [asyncio.create_task(claimer(event)) for event in sent]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in sent)), 60)
            await asyncio.sleep(2)  # each is waiting by now
            clients = len(data.client_list()) - 1  # all but this test's own
            await add_many(server.env["REDIS_URL"], "orders", claims)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120), clients

        answers, clients = asyncio.run(crowd())
    assert answers == [b"HTTP/1.1 200 OK"] * claims
    # The pool (at most REDIS_MAX_CONNECTIONS), the stalled check's turns on it, no more.
    assert clients <= 10


def test_sigterm_ends_waiting_claims_with_204(serve):
    server = serve()
    conn = server.connect()
    answers: list[Any] = []

    def waiting() -> None:
        answers.append(http_call(conn, "POST", "/queues/orders/claim?wait=60", token=API_TOKEN))

    thread = threading.Thread(target=waiting)
    thread.start()
    time.sleep(0.5)  # waiting by now
    server.process.send_signal(signal.SIGTERM)
    thread.join(30)  # well before its minute of waiting is up
    assert not thread.is_alive()
    (answer,) = answers
    assert (answer.status, answer.body) == (204, b"")


def test_the_event_stream_shows_a_job_worked_over_http_from_claim_to_completion(service):
    queue = f"worked-{time.monotonic_ns()}"
    job_id = add(service.redis_server.url, queue, "resize")
    claimed = http_call(service.server.connect(), "POST", f"/queues/{queue}/claim", token=API_TOKEN)
    got = json.loads(claimed.body)
    path = f"/queues/{queue}/jobs/{job_id}"
    with service.events(f"{path}/events") as stream:
        for route, body in (
            ("logs", b"resizing"),
            ("progress", b"50"),
            ("complete", b'{"ok":true}'),
        ):
            assert service.server.send("POST", f"{path}/{route}", body, got["token"]) == 200
        events = kinds(take(stream, 3))
    # Lines and progress each in their order; the end after both.
    assert sorted(events[:2]) == [("log", '{"index":0,"line":"resizing"}'), ("progress", "50")]
    assert events[2] == ("completed", '{"returnvalue":{"ok":true}}')


def test_after_a_restart_the_stalled_check_resumes_when_a_worker_asks_again(make_app, r, redis_url):
    """A job whose worker vanished across a restart of the service: the new process
    knows nothing of its queue until an HTTP worker asks it for a job, and finds the
    queue empty; from then on the stalled check takes the job back."""
    job_id = add(redis_url, "orders")
    before = make_app(STALLED_INTERVAL_MS=60_000)
    lost = claim(before.test_client(), token=API_TOKEN, body={"lockDuration": 100}).json
    before.extensions["bullmq_http"].close()  # the restart
    after = make_app(STALLED_INTERVAL_MS=200).test_client()
    assert claim(after, token=API_TOKEN).status_code == 204  # the job is still active
    wait_until(lambda: r.lrange("bull:orders:wait", 0, -1) == [job_id], 10, "the job back")
    again = claim(after, token=API_TOKEN).json
    assert again["id"] == job_id and again["token"] != lost["token"]
