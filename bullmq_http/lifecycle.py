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
# BullMQ's extendLock, unchanged; when it refuses, whether the job (KEYS[3]) is gone,
# so that a refusal says 404 or 401 in the same round trip: 1 extended, 0 not the
# caller's lock, -1 no such job.
EXTEND_LOCK = Script(
    "extendLock",
    f"""local function extendLock()
{upstream.bullmq_script("extendLock-2")}
end
local extended = extendLock()
if extended ~= 1 and redis.call("EXISTS", KEYS[3]) == 0 then
  return -1
end
return extended
""",
    "written",
)

# What the scripts below share: arrange (the KEYS and ARGV of the BullMQ script they
# run next), and what they read of a job's own options, as bullmq's Job reads them:
# jobOptions(the job's stored `opts`) is a table, empty when it is not JSON, and
# keepJobs(removeOnComplete or removeOnFail) is Scripts.moveToFinishedArgs's getKeepJobs
# (a number keeps that many, an object says how, true none, false or unset all).
JOB_OPTIONS = """
-- Give the one of BullMQ's scripts about to run its own KEYS and ARGV: KEYS[i] becomes
-- the given KEYS[order[i]], and ARGV becomes args.
local function arrange(order, args)
  local given = {unpack(KEYS)}
  for i = 1, #given do
    KEYS[i] = given[order[i]]
  end
  for i = 1, math.max(#ARGV, #args) do
    ARGV[i] = args[i]
  end
end
local function jobOptions(stored)
  local read, opts = pcall(cjson.decode, stored or "{}")
  return read and type(opts) == "table" and opts or {}
end
local function keepJobs(remove)
  if type(remove) == "number" then
    return {count = remove}
  elseif type(remove) == "table" then
    return remove
  elseif remove == true then
    return {count = 0}
  end
  return {count = -1}
end
"""

# BullMQ's moveToFinished, unchanged, after setting the keepJobs of its packed options
# (ARGV[8]) from the job's own removeOnComplete, read here, as bullmq's worker computes
# it from the job it holds. So a completion is one round trip with no read before it.
# ARGV[8] comes packed with keepJobs {count = -1}, what a job without removeOnComplete
# gets; so where the stored options cannot hold the key (it is not there as written,
# and no \u escape could spell it), they are neither decoded nor packed again.
KEEP_JOBS_OF_THE_JOB = """
do
  local stored = redis.call("HGET", KEYS[12], "opts")
  if stored and (string.find(stored, '"removeOnComplete"', 1, true)
                 or string.find(stored, "\\\\u", 1, true)) then
    local packed = cmsgpack.unpack(ARGV[8])
    packed["keepJobs"] = keepJobs(jobOptions(stored)["removeOnComplete"])
    ARGV[8] = cmsgpack.pack(packed)
  end
end
"""
MOVE_TO_COMPLETED = Script(
    "moveToCompleted",
    JOB_OPTIONS + KEEP_JOBS_OF_THE_JOB + upstream.bullmq_script("moveToFinished-14"),
    "written",
)

# Complete a job and claim the next in one round trip, as BullMQ's worker does it: its
# moveToFinished with fetchNext, unchanged, which locks the next job with the finished
# job's token. A claim's token is new, so the next job's lock is then handed to it, in
# the same script: no one ever sees the next job locked with the finished one's token.
# KEYS and ARGV[1..9] as for moveToCompleted with fetchNext, the packed options holding
# the caller's token and the claim's lock duration; ARGV[10] the claim's token. It
# answers what moveToFinished answered.
COMPLETE_THEN_CLAIM = Script(
    "completeThenClaim",
    JOB_OPTIONS
    + "local function moveToCompleted()\n"
    + KEEP_JOBS_OF_THE_JOB
    + upstream.bullmq_script("moveToFinished-14")
    + """
end
local finished = moveToCompleted()
if type(finished) == "table" and finished[1] ~= 0 then
  redis.call("SET", ARGV[7] .. finished[2] .. ":lock", ARGV[10], "KEEPTTL")
end
return finished
""",
    "written",
)

# Failing a job in one round trip: BullMQ's worker picks one of three of its scripts
# from the job it holds (Job.moveToFailed: attempts left, the delay its backoff
# computes, the stack trace it keeps). A job worked over HTTP is read here, in the
# script, and the one of the three picked runs unchanged. KEYS and ARGV[1..8] are as
# bullmq's Scripts.moveToFailedArgs packs them (the job's own options are read here),
# then:
#   ARGV[9]   "1" when the caller lets the job be retried, "0" when it fails for good
#   ARGV[10]  the delay (ms) the caller gives, used where the job's backoff is none of
#             BullMQ's built-in ones; "" for none
#   ARGV[11]  a uniform random draw in [0, 1), for the backoff's jitter
#   ARGV[12]  the failure's stack, as JSON; "" for none
# It answers {what the move answered, "delayed" | "waiting" | "failed", the delay}.
FAIL_AS_THE_WORKER_DECIDES = r"""
local retry, givenDelay, draw, stack = ARGV[9], ARGV[10], tonumber(ARGV[11]), ARGV[12]
local stored = redis.call("HMGET", KEYS[12], "opts", "atm", "stacktrace")
local jobOpts = jobOptions(stored[1])
local attemptsMade = tonumber(stored[2]) or 0

-- Backoffs.calculate, for the attempt about to be made; a backoff of the user's own
-- (or none) takes the caller's delay.
local function backoffDelay()
  local backoff = jobOpts["backoff"]
  if type(backoff) == "number" then
    backoff = {type = "fixed", delay = backoff}
  end
  local kind = type(backoff) == "table" and backoff["type"]
  if kind ~= "fixed" and kind ~= "exponential" then
    return tonumber(givenDelay) or 0
  end
  local delay = tonumber(backoff["delay"]) or 0
  if kind == "exponential" then
    delay = math.floor(2 ^ attemptsMade * delay + 0.5)  -- Math.round(2^(n-1) * delay)
  end
  local jitter = tonumber(backoff["jitter"]) or 0
  if jitter > 0 then
    return math.floor(draw * delay * jitter + delay * (1 - jitter))
  end
  return delay
end

-- A string as JSON.stringify writes it.
local escapes = {['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t", ["\127"] = "\127"}
local function jsonString(line)
  return '"' .. line:gsub('[%c"\\]', function(char)
    return escapes[char] or string.format("\\u%04x", char:byte())
  end) .. '"'
end

-- Job.updateStacktrace: the stack joins the job's trace, of which stackTraceLimit
-- keeps the newest; without a stack the trace is kept as it is.
local trace = stored[3] or "[]"
if stack ~= "" then
  local decoded, lines = pcall(cjson.decode, trace)
  local parts = {}
  for _, line in ipairs(decoded and type(lines) == "table" and lines or {}) do
    parts[#parts + 1] = type(line) == "string" and jsonString(line) or cjson.encode(line)
  end
  parts[#parts + 1] = stack
  local limit, first = jobOpts["stackTraceLimit"], 1
  if limit == 0 then
    first = #parts + 1
  elseif type(limit) == "number" and limit > 0 then
    first = math.max(1, #parts - limit + 1)
  end
  trace = "[" .. table.concat(parts, ",", first) .. "]"
end
local fields = cmsgpack.pack({"failedReason", ARGV[4], "stacktrace", trace})

local attempts = tonumber(jobOpts["attempts"]) or 1
local delay = -1  -- no retry
if retry == "1" and attemptsMade + 1 < attempts then
  delay = backoffDelay()
end
local packed = cmsgpack.unpack(ARGV[8])
local token, jobId, timestamp, prefix = packed["token"], ARGV[1], ARGV[2], ARGV[7]

-- The script picked gets its own KEYS and ARGV, taken from moveToFinished's.
if delay > 0 then
  arrange({14, 2, 3, 7, 12, 4, 9, 5, 1, 6, 10},
    {prefix, timestamp, jobId, token, string.format("%d", delay), "0", fields, "0"})
  return {moveToDelayed(), "delayed", delay}
elseif delay == 0 then
  local push = jobOpts["lifo"] == true and "RPUSH" or "LPUSH"
  arrange({2, 1, 8, 12, 9, 4, 7, 3, 10, 14, 5}, {prefix, timestamp, push, jobId, token, fields})
  return {retryJob(), "waiting", 0}
end
-- Fails for good: packed as Scripts.moveToFinishedArgs packs it for this job.
packed["keepJobs"] = keepJobs(jobOpts["removeOnFail"])
packed["attempts"] = attempts
packed["attemptsMade"] = attemptsMade
for _, option in ipairs({"fpof", "cpof", "idof", "rdof"}) do  -- stored by these names
  packed[option] = jobOpts[option] == true
end
arrange({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14},
  {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], cmsgpack.pack(packed), fields})
return {moveToFinished(), "failed", 0}
"""
MOVE_TO_FAILED = Script(
    "moveToFailed",
    JOB_OPTIONS
    + "".join(
        f"local function {name}()\n{upstream.bullmq_script(name + keys)}\nend\n"
        for name, keys in (("moveToDelayed", "-11"), ("retryJob", "-11"), ("moveToFinished", "-14"))
    )
    + FAIL_AS_THE_WORKER_DECIDES,
    "written",
)
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


# The /metrics outcome of each way a failure ends.
OUTCOME_OF_FAILURE = {"delayed": "delayed", "waiting": "retried", "failed": "failed"}


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
        options = claim_options(token, lock_ms)
        reply = self.store.run_script(MOVE_TO_ACTIVE, keys, (scripts.keys[""], now_ms(), options))
        self.watch(queue)
        return claimed(reply, token, lock_ms)

    def complete_and_claim(
        self, queue: str, job_id: str, token: str, returnvalue: str, lock_ms: int | None = None
    ) -> Claim | None:
        """Complete a job the caller holds, as complete() does, then claim the queue's
        next job for it, as claim() does, in one round trip; nothing is claimed when
        the completion is refused (it raises as complete() does)."""
        lock_ms = lock_ms or self.lock_ms
        new_token = secrets.token_hex(16)
        keys, args = self.completion(queue, job_id, token, returnvalue, lock_ms)
        reply = self.store.run_script(COMPLETE_THEN_CLAIM, keys, [*args, "", new_token])
        check_moved(reply, queue, job_id)
        JOB_OUTCOMES.labels("completed").inc()
        self.watch(queue)
        return claimed(reply, new_token, lock_ms)

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
        keys = (f"{job_key}:lock", scripts.keys["stalled"], job_key)
        args = (token, duration_ms or self.lock_ms, job_id)
        extended = self.store.run_script(EXTEND_LOCK, keys, args)
        if extended == -1:
            raise NoSuchJob(queue, job_id)
        if extended != 1:
            raise NotLockHolder
        self.watch(queue)

    def complete(self, queue: str, job_id: str, token: str, returnvalue: str) -> None:
        """Move a job the caller holds to completed as BullMQ's worker does, with its
        return value (JSON as JSON.stringify writes it, as BullMQ's Node worker stores
        it); the job's own removeOnComplete applies, and a flow parent learns of it."""
        keys, args = self.completion(queue, job_id, token, returnvalue)
        check_moved(self.store.run_script(MOVE_TO_COMPLETED, keys, args), queue, job_id)
        JOB_OUTCOMES.labels("completed").inc()

    def completion(
        self,
        queue: str,
        job_id: str,
        token: str,
        returnvalue: str,
        next_lock_ms: int | None = None,
    ) -> tuple[list[str], list[Any]]:
        """Return the KEYS and ARGV of moveToFinished completing a job: packed by
        bullmq's own code for a job of no options of its own (the script sets keepJobs
        from the job's), with the return value as the caller gave it. With
        `next_lock_ms`, the next job is fetched too, locked for that long, as BullMQ's
        worker fetches its next. Raises NotLockHolder for BullMQ's no-lock token."""
        refuse_no_lock(token)
        scripts = queue_scripts(self.store.prefix, queue)
        job = upstream.bullmq_job(
            self.store.prefix, queue, job_id, {}, self.worker_opts(next_lock_ms)
        )
        fetch_next = next_lock_ms is not None
        keys, args = scripts.moveToCompletedArgs(job, None, False, token, fetchNext=fetch_next)
        args[3] = returnvalue
        return keys, args

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
        fails for good. Return what happened. One round trip: the script reads the
        job's attempts, backoff and stack trace (FAIL_AS_THE_WORKER_DECIDES)."""
        refuse_no_lock(token)
        scripts = queue_scripts(self.store.prefix, queue)
        job = upstream.bullmq_job(self.store.prefix, queue, job_id, {}, self.worker_opts())
        keys, args = scripts.moveToFailedArgs(job, reason, False, token, False)
        args += [
            "1" if retry else "0",
            "" if delay_ms is None else delay_ms,
            repr(random.random()),  # noqa: S311 - a backoff's jitter, as Math.random
            "" if stack is None else compact(stack),
        ]
        result, state, delay = self.store.run_script(MOVE_TO_FAILED, tuple(keys), tuple(args))
        check_moved(result, queue, job_id)
        failure = Failure(as_text(state), int(delay))
        JOB_OUTCOMES.labels(OUTCOME_OF_FAILURE[failure.state]).inc()
        return failure

    def worker_opts(self, lock_ms: int | None = None) -> dict[str, Any]:
        """Return the options of the BullMQ worker the service is to BullMQ's code."""
        return {"lockDuration": lock_ms or self.lock_ms, "limiter": None}

    # ------------------------------------------------------------- stalled check

    def watch(self, queue: str) -> None:
        """Run the stalled check for a queue from now on: a queue HTTP workers claim
        from, or keep a job of, even one they find empty. The first in a process also
        starts the check for every queue with jobs active (resume), so that after a
        restart any HTTP worker's request takes back the jobs of one that vanished."""
        with self.lock:
            self.worked[queue] = None
            self.worked.move_to_end(queue)
            if len(self.worked) > WORKED_QUEUES:
                self.worked.popitem(last=False)  # the longest unasked
            if self.checker is None or not self.checker.is_alive():
                first = self.checker is None
                self.checker = threading.Thread(
                    target=self.check_stalled, args=(first,), name="stalled-check", daemon=True
                )
                self.checker.start()

    def resume(self) -> None:
        """Run the stalled check for every queue with jobs active, found in Redis (SCAN)
        once a process: the queues HTTP workers used before it started among them."""
        try:
            found = list(self.store.queues_with_active_jobs())
        except redis.exceptions.RedisError as error:
            log.warning("the queues with active jobs could not be listed: %s", error)
            return
        with self.lock:
            for queue in found:
                self.worked.setdefault(queue, None)
            while len(self.worked) > WORKED_QUEUES:
                self.worked.popitem(last=False)

    def check_stalled(self, resume: bool = False) -> None:
        """Every stalled interval, run BullMQ's stalled check for each queue worked
        here: a job whose lock lapsed goes back to wait (or fails, past
        MAX_STALLED_COUNT). BullMQ's script runs it once an interval per queue, however
        many processes and instances ask. `resume`: first find the queues with jobs
        active."""
        if resume:
            self.resume()
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


def claim_options(token: str, lock_ms: int) -> bytes:
    """Return a claim's options as bullmq's Scripts.moveToActive packs them, for a
    worker with no limiter of its own (the queue's global rate limit and concurrency
    are in its meta)."""
    options: bytes = msgpack.packb(
        {"token": token, "lockDuration": lock_ms, "limiter": None}, use_bin_type=True
    )
    return options


def claimed(reply: Any, token: str, lock_ms: int) -> Claim | None:
    """Return the job moveToActive answered, locked with `token`; None for none."""
    fields, job_id, _, _ = upstream.bullmq_next_job(reply)
    if not fields:
        return None
    JOB_OUTCOMES.labels("claimed").inc()
    return Claim(
        as_text(job_id), {as_text(k): as_text(v) for k, v in fields.items()}, token, lock_ms
    )


NO_LOCK = "0"  # BullMQ's token for "moved with no lock"


def refuse_no_lock(token: str) -> None:
    """Raise NotLockHolder for the token "0": BullMQ's move scripts take it to mean a
    job moved with no lock, and move the job without checking one. No caller's lock
    token is that, so a caller who sends it holds nothing."""
    if token == NO_LOCK:
        raise NotLockHolder


def check_moved(result: Any, queue: str, job_id: str) -> None:
    """Raise what a BullMQ move's answer says went wrong (its ErrorCode), if anything."""
    if isinstance(result, int) and result < 0:
        if result == -1:
            raise NoSuchJob(queue, job_id)
        if result in (-2, -6):
            raise NotLockHolder
        raise NotActive(NOT_IN_STATE.get(result, f"BullMQ refused the move ({result})"))


def stop_all() -> None:
    """End every claim waiting in this process within a second (it is stopping)."""
    for life in list(LIVES):
        life.stop()


@functools.lru_cache(maxsize=1024)
def queue_scripts(prefix: str, queue: str) -> Any:
    """Return bullmq's Scripts of a queue, made once per queue rather than per request:
    its keys are the queue's, and the methods used here only read them."""
    return upstream.bullmq_scripts(prefix, queue)


def as_text(value: bytes | str) -> str:
    """Return a reply's bytes as text (a cluster client's may be text already)."""
    return value if isinstance(value, str) else text(value)


def now_ms() -> int:
    """Return the time as BullMQ's scripts take it: milliseconds since the epoch."""
    return round(time.time() * 1000)
