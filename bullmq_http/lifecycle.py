"""A job's life over HTTP, by BullMQ's own scripts: claim the next job as a BullMQ worker
does, keep its lock, complete or fail it, and take back the jobs whose worker vanished
(the stalled check). README: "Working jobs over HTTP".

The scripts are BullMQ's, as its Python package ships them, run unchanged; their keys
and arguments are packed by that package's own code where it runs without a client of
its own (upstream.py), so that a job ends exactly as BullMQ's worker would end it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import secrets
import socket
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis

from . import upstream
from .event_stream import hung_up
from .js_json import compact
from .layout import text
from .metrics import JOB_OUTCOMES
from .store import JobStore, NoSuchJob, NotLockHolder, Script

log = logging.getLogger(__name__)

MOVE_TO_ACTIVE = Script("moveToActive", upstream.bullmq_script("moveToActive-11"), "read")
EXTEND_LOCK = Script("extendLock", upstream.bullmq_script("extendLock-2"), "written")
MOVE_TO_FINISHED = Script("moveToFinished", upstream.bullmq_script("moveToFinished-14"), "written")

# Before BullMQ's moveToFinished, unchanged, in the same script: the keepJobs of its
# packed options (ARGV[8]) from the job's own removeOnComplete, read here, as bullmq's
# Scripts.moveToFinishedArgs computes it from a job its worker holds (getKeepJobs: a
# number keeps that many, an object says how, true none, false or unset all). So a
# completion is one round trip with no read of the job before it.
KEEP_JOBS_FROM_THE_JOB = """
do
  local packed = cmsgpack.unpack(ARGV[8])
  local stored = redis.call("HGET", KEYS[12], "opts")
  local read, jobOpts = pcall(cjson.decode, stored or "{}")
  local remove = read and type(jobOpts) == "table" and jobOpts["removeOnComplete"]
  if type(remove) == "number" then
    packed["keepJobs"] = {count = remove}
  elseif type(remove) == "table" then
    packed["keepJobs"] = remove
  elseif remove == true then
    packed["keepJobs"] = {count = 0}
  else
    packed["keepJobs"] = {count = -1}
  end
  ARGV[8] = cmsgpack.pack(packed)
end
"""
MOVE_TO_COMPLETED = Script(
    "moveToCompleted",
    KEEP_JOBS_FROM_THE_JOB + upstream.bullmq_script("moveToFinished-14"),
    "written",
)
MOVE_TO_DELAYED = Script("moveToDelayed", upstream.bullmq_script("moveToDelayed-11"), "written")
RETRY_JOB = Script("retryJob", upstream.bullmq_script("retryJob-11"), "written")
MOVE_STALLED = Script(
    "moveStalledJobsToWait", upstream.bullmq_script("moveStalledJobsToWait-9"), "written"
)

# What BullMQ's scripts answer when a job cannot move (its ErrorCode), as the service
# says it: a job that is gone is NoSuchJob, a lock not the caller's NotLockHolder.
NOT_IN_STATE = {
    -3: "the job is not active: it was finished, or taken back after its lock lapsed",
    -4: "the job is waiting for its children: it finishes when they have",
    -5: "the job's parent is gone",
    -7: "the job's parent cannot be replaced",
    -9: "the job has a failed child, so it cannot complete",
}


class NotActive(Exception):
    """A job that is not in the state the move needs; the message says which."""


@dataclass(frozen=True)
class Claim:
    """A job moved to active for the caller: its hash as BullMQ's moveToActive read it,
    and the lock the caller now holds."""

    job_id: str
    fields: dict[str, str]
    token: str
    lock_ms: int

    def answer(self) -> dict[str, Any]:
        """Return what the claim answers: the job as a worker gets it, and its lock."""
        fields = self.fields
        return {
            "id": self.job_id,
            "name": fields.get("name", ""),
            "data": json.loads(fields.get("data") or "{}"),
            "opts": json.loads(fields.get("opts") or "{}"),
            "attemptsMade": int(fields.get("atm") or 0),
            "attemptsStarted": int(fields.get("ats") or 0),
            "timestamp": int(fields.get("timestamp") or 0),
            "processedOn": int(fields.get("processedOn") or 0),
            "token": self.token,
            "lockDuration": self.lock_ms,
        }


@dataclass(frozen=True)
class Failure:
    """What failing a job did: it "failed" for good, or is "delayed" or "waiting" for
    another attempt, `delay` ms from now."""

    state: str
    delay: int


@dataclass(eq=False)
class WaitingClaim:
    """A claim waiting for a job of its queue: the claimer takes it from the queue's
    line ("taken") while it asks Redis for a job, and hands over what it got."""

    queue: str
    lock_ms: int | None
    state: str = "waiting"  # "taken" by the claimer, or "gone" (gave up)
    claim: Claim | None = None
    handed: threading.Event = field(default_factory=threading.Event)


# How often the claimer asks for a job for the claims that wait, each queue's in turn.
CLAIM_POLL_SECONDS = 0.1
# The most queues a process runs the stalled check for: the most recently claimed from
# or locked in. Claims on made-up queue names cannot grow the list, or the checks,
# past it.
WORKED_QUEUES = 1000


class JobLife:
    """Claim, keep, complete and fail jobs of any queue with BullMQ's scripts, and run
    BullMQ's stalled check for every queue this process has handed a job from.

    Claims that wait for a job (`?wait=`) wait in line per queue; one claimer thread per
    process asks for a job for the first in each line every CLAIM_POLL_SECONDS, so a
    thousand waiting claims cost the process's pool one connection at a time, not one
    each.
    """

    def __init__(
        self,
        store: JobStore,
        lock_ms: int,
        stalled_interval_ms: int,
        max_stalled_count: int,
    ) -> None:
        self.store = store
        self.lock_ms = lock_ms
        self.stalled_interval_ms = stalled_interval_ms
        self.max_stalled_count = max_stalled_count
        # The queues worked here, for the stalled check: the most recent WORKED_QUEUES.
        self.worked: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.checker: threading.Thread | None = None
        self.lines: dict[str, list[WaitingClaim]] = {}  # claims waiting, per queue
        self.claimer: threading.Thread | None = None
        LIVES.add(self)

    def claim(self, queue: str, lock_ms: int | None = None) -> Claim | None:
        """Move the queue's next job to active, locked for the caller, exactly as a
        BullMQ worker's getNextJob does; return it, or None when no job is ready."""
        lock_ms = lock_ms or self.lock_ms
        token = secrets.token_hex(16)
        scripts = queue_scripts(self.store.prefix, queue)
        keys = scripts.getKeys(
            ["wait", "active", "prioritized", "events", "stalled", "limiter", "delayed",
             "paused", "meta", "pc", "marker"]
        )  # fmt: skip
        # As bullmq's Scripts.moveToActive packs them (a worker with no limiter of its
        # own: the queue's global rate limit and concurrency are in its meta).
        opts = msgpack.packb(
            {"token": token, "lockDuration": lock_ms, "limiter": None}, use_bin_type=True
        )
        reply = self.store.run_script(MOVE_TO_ACTIVE, keys, (scripts.keys[""], now_ms(), opts))
        self.watch(queue)
        fields, job_id, _, _ = upstream.bullmq_next_job(reply)
        if not fields:
            return None
        JOB_OUTCOMES.labels("claimed").inc()
        return Claim(
            as_text(job_id), {as_text(k): as_text(v) for k, v in fields.items()}, token, lock_ms
        )

    def claim_waiting(
        self,
        queue: str,
        lock_ms: int | None,
        seconds: float,
        client: socket.socket | None = None,
    ) -> Claim | None:
        """Claim the queue's next job, waiting up to `seconds` for one to be ready;
        None when none came, the process is stopping, or the client hung up."""
        claimed = self.claim(queue, lock_ms)
        if claimed is not None or seconds <= 0:
            return claimed
        waiting = WaitingClaim(queue, lock_ms)
        with self.lock:
            self.lines.setdefault(queue, []).append(waiting)
            if self.claimer is None or not self.claimer.is_alive():
                self.claimer = threading.Thread(target=self.hand_out, name="claimer", daemon=True)
                self.claimer.start()
        deadline = time.monotonic() + seconds
        while not waiting.handed.wait(min(1.0, max(0.05, deadline - time.monotonic()))):
            over = time.monotonic() >= deadline or self.stopping.is_set()
            if over or (client is not None and hung_up(client)):
                with self.lock:
                    if waiting.state == "waiting":  # not being claimed for: give up
                        waiting.state = "gone"
                        self.lines[queue].remove(waiting)
                        return None
                # Being claimed for this moment: what comes is handed over at once.
        return waiting.claim

    def hand_out(self) -> None:
        """Ask for a job for the first claim waiting on each queue, and hand each over,
        until the process stops; every CLAIM_POLL_SECONDS while claims wait."""
        while not self.stopping.wait(CLAIM_POLL_SECONDS):
            with self.lock:
                queues = [queue for queue, line in self.lines.items() if line]
            for queue in queues:
                while (waiting := self.first_waiting(queue)) is not None:
                    try:
                        claimed = self.claim(queue, waiting.lock_ms)
                    except redis.exceptions.RedisError as error:
                        log.warning("a waiting claim on queue %r failed: %s", queue, error)
                        claimed = None
                    with self.lock:
                        if claimed is None:
                            waiting.state = "waiting"  # first in line again, next time
                            break
                        self.lines[queue].remove(waiting)
                        waiting.claim = claimed
                    waiting.handed.set()

    def first_waiting(self, queue: str) -> WaitingClaim | None:
        """Take the first claim waiting on a queue, to ask for a job for it."""
        with self.lock:
            line = self.lines.get(queue) or []
            if not line:
                self.lines.pop(queue, None)
                return None
            line[0].state = "taken"
            return line[0]

    def extend_lock(self, queue: str, job_id: str, token: str, duration_ms: int | None) -> None:
        """Extend the caller's lock of a job as BullMQ's extendLock does (taking it out
        of the stalled set); raise NotLockHolder if the caller does not hold it, and
        NoSuchJob for a job that is gone."""
        scripts = queue_scripts(self.store.prefix, queue)
        job_key = scripts.toKey(job_id)
        keys = (f"{job_key}:lock", scripts.keys["stalled"])
        args = (token, duration_ms or self.lock_ms, job_id)
        if self.store.run_script(EXTEND_LOCK, keys, args) != 1:
            # Refused: a second round trip says whether the job is gone or the lock
            # another's (or lapsed).
            if not self.store.redis.execute_command("EXISTS", job_key):
                raise NoSuchJob(queue, job_id)
            raise NotLockHolder
        self.watch(queue)

    def complete(self, queue: str, job_id: str, token: str, returnvalue: str) -> None:
        """Move a job the caller holds to completed as BullMQ's worker does, with its
        return value (JSON as JSON.stringify writes it, as BullMQ's Node worker stores
        it); the job's own removeOnComplete applies, and a flow parent learns of it."""
        scripts = queue_scripts(self.store.prefix, queue)
        # Packed by bullmq's own code for a job of no options of its own; the script
        # sets keepJobs from the job's (KEEP_JOBS_FROM_THE_JOB).
        job = upstream.bullmq_job(self.store.prefix, queue, job_id, {}, self.worker_opts())
        keys, args = scripts.moveToCompletedArgs(job, None, False, token, fetchNext=False)
        args[3] = returnvalue
        self.finish(MOVE_TO_COMPLETED, queue, job_id, keys, args)
        JOB_OUTCOMES.labels("completed").inc()

    def fail(
        self,
        queue: str,
        job_id: str,
        token: str,
        reason: str,
        retry: bool = True,
        delay_ms: int | None = None,
        stack: str | None = None,
    ) -> Failure:
        """Fail a job the caller holds as BullMQ's worker does: with attempts left, and
        unless `retry` is False (BullMQ's UnrecoverableError), the job is retried after
        its backoff (or `delay_ms`, where its backoff is one of the user's own), else it
        fails for good. Return what happened."""
        job, scripts = self.job(queue, job_id)
        stacktrace = list(job.stacktrace or [])
        if stack:
            stacktrace.append(stack)
        limit = job.opts.get("stackTraceLimit")
        if limit is not None:
            stacktrace = stacktrace[-limit:] if limit else []
        fields = {"failedReason": reason, "stacktrace": compact(stacktrace)}
        attempts_left = job.attemptsMade + 1 < (job.opts.get("attempts") or 1)
        delay = -1  # no retry
        if retry and attempts_left:
            delay = backoff_delay(job.opts.get("backoff"), job.attemptsMade + 1, delay_ms)
        if delay >= 0:
            if delay:
                keys, args = scripts.moveToDelayedArgs(
                    job_id, now_ms(), token, delay, {"fieldsToUpdate": fields}
                )
                self.finish(MOVE_TO_DELAYED, queue, job_id, keys, args)
                JOB_OUTCOMES.labels("delayed").inc()
                return Failure("delayed", delay)
            lifo = job.opts.get("lifo", False)
            keys, args = scripts.retryJobArgs(job_id, lifo, token, {"fieldsToUpdate": fields})
            self.finish(RETRY_JOB, queue, job_id, keys, args)
            JOB_OUTCOMES.labels("retried").inc()
            return Failure("waiting", 0)
        keys, args = scripts.moveToFailedArgs(
            job, reason, job.opts.get("removeOnFail", False), token, False, fields
        )
        self.finish(MOVE_TO_FINISHED, queue, job_id, keys, args)
        JOB_OUTCOMES.labels("failed").inc()
        return Failure("failed", 0)

    def job(self, queue: str, job_id: str) -> tuple[Any, Any]:
        """Return bullmq's Job of a job as its hash holds it now, and its queue's
        Scripts; raise NoSuchJob for a job that is gone."""
        scripts = queue_scripts(self.store.prefix, queue)
        flat = self.store.redis.execute_command("HGETALL", scripts.toKey(job_id))
        raw = dict(zip(flat[::2], flat[1::2], strict=True)) if isinstance(flat, list) else flat
        if not raw:
            raise NoSuchJob(queue, job_id)
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        job = upstream.bullmq_job(self.store.prefix, queue, job_id, fields, self.worker_opts())
        return job, scripts

    def worker_opts(self) -> dict[str, Any]:
        """Return the options of the BullMQ worker the service is to BullMQ's code."""
        return {"lockDuration": self.lock_ms, "limiter": None}

    def finish(
        self, script: Script, queue: str, job_id: str, keys: list[str], args: list[Any]
    ) -> None:
        """Run one of BullMQ's moves of an active job; raise what its code says."""
        result = self.store.run_script(script, tuple(keys), tuple(args))
        if isinstance(result, int) and result < 0:
            if result == -1:
                raise NoSuchJob(queue, job_id)
            if result in (-2, -6):
                raise NotLockHolder
            raise NotActive(NOT_IN_STATE.get(result, f"BullMQ refused the move ({result})"))

    # ------------------------------------------------------------- stalled check

    def watch(self, queue: str) -> None:
        """Run the stalled check for a queue from now on (the first claim starts it): a
        queue HTTP workers claim from, or keep a job of, even one they find empty, so
        that after a restart the check resumes as soon as a worker asks again."""
        with self.lock:
            self.worked[queue] = None
            self.worked.move_to_end(queue)
            if len(self.worked) > WORKED_QUEUES:
                self.worked.popitem(last=False)  # the longest unasked
            if self.checker is None or not self.checker.is_alive():
                self.checker = threading.Thread(
                    target=self.check_stalled, name="stalled-check", daemon=True
                )
                self.checker.start()

    def check_stalled(self) -> None:
        """Every stalled interval, run BullMQ's stalled check for each queue worked
        here: a job whose lock lapsed goes back to wait (or fails, past
        MAX_STALLED_COUNT). BullMQ's script runs it once an interval per queue, however
        many processes and instances ask."""
        while not self.stopping.wait(self.stalled_interval_ms / 1000):
            with self.lock:
                queues = list(self.worked)
            for queue in queues:
                try:
                    self.run_stalled_check(queue)
                except redis.exceptions.RedisError as error:
                    log.warning("the stalled check of queue %r failed: %s", queue, error)

    def run_stalled_check(self, queue: str) -> None:
        """Run BullMQ's moveStalledJobsToWait on a queue, as its worker does."""
        scripts = queue_scripts(self.store.prefix, queue)
        keys = scripts.getKeys(
            ["stalled", "wait", "active", "stalled-check", "meta", "paused", "marker",
             "events", "repeat"]
        )  # fmt: skip
        args = (self.max_stalled_count, scripts.keys[""], now_ms(), self.stalled_interval_ms)
        self.store.run_script(MOVE_STALLED, tuple(keys), args)

    def stop(self) -> None:
        """Stop the stalled check, and end the claims that wait within a second."""
        self.stopping.set()


# Every JobLife of the process, for stop_all.
LIVES: weakref.WeakSet[JobLife] = weakref.WeakSet()


def stop_all() -> None:
    """End every claim waiting in this process within a second (it is stopping)."""
    for life in list(LIVES):
        life.stop()


@functools.lru_cache(maxsize=1024)
def queue_scripts(prefix: str, queue: str) -> Any:
    """Return bullmq's Scripts of a queue, made once per queue rather than per request:
    its keys are the queue's, and the methods used here only read them."""
    return upstream.bullmq_scripts(prefix, queue)


def backoff_delay(backoff: Any, attempts_made: int, given_ms: int | None) -> int:
    """Return the delay before the next attempt: BullMQ's built-in backoff, with its
    jitter as BullMQ's Node worker draws it; or, for a backoff of the user's own,
    `given_ms` (0 without); -1 means no retry (a custom backoff's way to say so)."""
    delay = upstream.bullmq_backoff(backoff, attempts_made)
    if delay is None:
        return given_ms or 0
    jitter = (backoff or {}).get("jitter", 0) if isinstance(backoff, dict) else 0
    if jitter and jitter > 0:
        # bullmq's Python package leaves jitter out; its Node worker draws the delay
        # between (1 - jitter) and 1 of the full one.
        return math.floor(random.random() * delay * jitter + delay * (1 - jitter))  # noqa: S311
    return delay


def as_text(value: bytes | str) -> str:
    """Return a reply's bytes as text (a cluster client's may be text already)."""
    return value if isinstance(value, str) else text(value)


def now_ms() -> int:
    """Return the time as BullMQ's scripts take it: milliseconds since the epoch."""
    return round(time.time() * 1000)
