"""BullMQ's keys of the jobs in one Redis database or cluster: the job store.

JobStore reads and writes a job's keys in BullMQ's own layout (`<prefix>:<queue>:<id>`
hash, `:lock`, `:logs`, the queue's `:events` stream), each write and each read of a
route one Lua script in one round trip; what the caller got wrong comes back as
NotLockHolder, NoSuchJob or CrossSlot, what Redis did as a RedisError.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.crc import key_slot

from .layout import JobAttempts, JobState, JobTimes, StreamId, TooManyBytes, key, stream_id, text
from .metrics import script_outcome
from .redis_link import RedisCommands


class NotLockHolder(Exception):
    """The caller's token is not the job's current lock token."""


class NoSuchJob(LookupError):
    """The job is not in its queue."""

    def __init__(self, queue: str, job_id: str) -> None:
        super().__init__(queue, job_id)
        self.queue = queue
        self.job_id = job_id


class CrossSlot(Exception):
    """A job's keys would fall in different Redis Cluster slots."""


class NotBullmqLayout(Exception):
    """A key of the job or its queue holds another type than BullMQ's layout gives it
    (a string where the event stream should be, say); `key` names it."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


SET_PROGRESS = """
--[[
  Set a job's progress, exactly as BullMQ's updateProgress does, if the caller holds
  the job's lock.

  KEYS[1] job hash         <prefix>:<queue>:<id>
  KEYS[2] job lock         <prefix>:<queue>:<id>:lock
  KEYS[3] event stream     <prefix>:<queue>:events
  KEYS[4] queue meta hash  <prefix>:<queue>:meta

  ARGV[1] job token (must equal the lock's value)
  ARGV[2] job id
  ARGV[3] progress, as JSON

  Returns  0 written
          -1 the token is not the job's current lock token (nothing written)
          -2 no such job (nothing written)
          {-3, 3} the event stream key holds another type (nothing written: Redis
                  would not undo the writes before a failed XADD)
]]
if redis.call("GET", KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call("TYPE", KEYS[1])["ok"] ~= "hash" then return -2 end
local events = redis.call("TYPE", KEYS[3])["ok"]
if events ~= "stream" and events ~= "none" then return {-3, 3} end

local maxEvents = redis.call("HGET", KEYS[4], "opts.maxLenEvents")
if not maxEvents then
  maxEvents = 10000
  redis.call("HSET", KEYS[4], "opts.maxLenEvents", maxEvents)
end
redis.call("HSET", KEYS[1], "progress", ARGV[3])
redis.call("XADD", KEYS[3], "MAXLEN", "~", maxEvents, "*",
           "event", "progress", "jobId", ARGV[2], "data", ARGV[3])
return 0
"""

ADD_LOG = """
--[[
  Append one line to a job's logs, as BullMQ's Job.log does (honouring the job's own
  keepLogs option, stored as "kl" in the JSON of the hash field "opts"), if the caller
  holds the job's lock; then keep at most the server's cap of newest lines, if any.

  KEYS[1] job hash   <prefix>:<queue>:<id>
  KEYS[2] job lock   <prefix>:<queue>:<id>:lock
  KEYS[3] job logs   <prefix>:<queue>:<id>:logs

  ARGV[1] job token (must equal the lock's value)
  ARGV[2] the log line
  ARGV[3] the most lines a job keeps (MAX_LOGS_PER_JOB), or "" for no cap
  ARGV[4] the channel to publish "<index> <line>" on for the streams watching the job
          (the logs key's name), or "" for none (a cluster, whose nodes would all relay it)

  Returns >0 the number of lines the job keeps, this one included
          -1 the token is not the job's current lock token (nothing written)
          -2 no such job (nothing written)
]]
if redis.call("GET", KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call("TYPE", KEYS[1])["ok"] ~= "hash" then return -2 end

local count = redis.call("RPUSH", KEYS[3], ARGV[2])
local keep = tonumber(ARGV[3])
local opts = redis.call("HGET", KEYS[1], "opts")
if opts then
  local ok, decoded = pcall(cjson.decode, opts)
  local kl = ok and type(decoded) == "table" and tonumber(decoded["kl"])
  if kl and kl >= 1 and (not keep or kl < keep) then keep = math.floor(kl) end
end
if keep and count > keep then
  redis.call("LTRIM", KEYS[3], -keep, -1)
  count = keep
end
if ARGV[4] ~= "" then
  -- The line is stored whatever this answers: refused (an ACL user without the
  -- channel), the streams read it at their next poll instead.
  redis.pcall("PUBLISH", ARGV[4], (count - 1) .. " " .. ARGV[2])
end
return count
"""

READ_LOGS = """
--[[
  Return one page of a job's logs and how many lines it has. A script, not MULTI: Redis
  refuses every MULTI while it is out of memory, and reads must still work then.

  KEYS[1] job hash   <prefix>:<queue>:<id>
  KEYS[2] job logs   <prefix>:<queue>:<id>:logs

  ARGV[1] LRANGE start   (the page, as indexes of the list)
  ARGV[2] LRANGE stop
  ARGV[3] "desc" to return the page newest first, else oldest first
  ARGV[4] the most bytes of lines one page holds; it always holds at least one line

  Returns {count, line, line, ...}: whole lines, as many as fit
          -2 no such job
]]
if redis.call("TYPE", KEYS[1])["ok"] ~= "hash" then return -2 end

-- The page is LRANGE's own table, turned and cut in place: a copy costs Redis more.
local lines = redis.call("LRANGE", KEYS[2], ARGV[1], ARGV[2])
local n = #lines
if ARGV[3] == "desc" then
  for i = 1, math.floor(n / 2) do lines[i], lines[n + 1 - i] = lines[n + 1 - i], lines[i] end
end
local room = tonumber(ARGV[4])
for i = 1, n do
  room = room - #lines[i]
  if room < 0 and i > 1 then
    for j = n, i, -1 do lines[j] = nil end
    break
  end
end
table.insert(lines, 1, redis.call("LLEN", KEYS[2]))
return lines
"""

READ_PROGRESS = """
--[[
  Return a job's progress as stored.

  KEYS[1] job hash   <prefix>:<queue>:<id>

  Returns {progress}, or {} when none was ever set
          -2 no such job
]]
if redis.call("TYPE", KEYS[1])["ok"] ~= "hash" then return -2 end
local progress = redis.call("HGET", KEYS[1], "progress")
if progress then return {progress} end
return {}
"""

JOB_STATE = """
--[[
  Return what a job holds, and where its queue's event stream stands, for a stream of
  the job's events to start from.

  KEYS[1] job hash         <prefix>:<queue>:<id>
  KEYS[2] job logs         <prefix>:<queue>:<id>:logs
  KEYS[3] event stream     <prefix>:<queue>:events
  KEYS[4] completed jobs   <prefix>:<queue>:completed
  KEYS[5] failed jobs      <prefix>:<queue>:failed
  KEYS[6] job lock         <prefix>:<queue>:<id>:lock

  ARGV[1] job id

  Returns {progress or "", 1 if progress was set else 0, "completed", "failed" or "",
           the return value or the failed reason, how many log lines the job has,
           the newest id in the event stream, the oldest ("0-0" for none),
           the job's name, 1 if a worker holds its lock else 0,
           its timestamp, processedOn and finishedOn ("" for none),
           its attempts made, started and allowed (its `attempts` option), and its
           failedReason ("" for none)}
          -2 no such job
]]
if redis.call("TYPE", KEYS[1])["ok"] ~= "hash" then return -2 end
local progress = redis.call("HGET", KEYS[1], "progress")
local finished, outcome = "", ""
if redis.call("ZSCORE", KEYS[4], ARGV[1]) then
  finished, outcome = "completed", redis.call("HGET", KEYS[1], "returnvalue") or "null"
elseif redis.call("ZSCORE", KEYS[5], ARGV[1]) then
  finished, outcome = "failed", redis.call("HGET", KEYS[1], "failedReason") or ""
end
local newest = redis.call("XREVRANGE", KEYS[3], "+", "-", "COUNT", 1)[1]
local oldest = redis.call("XRANGE", KEYS[3], "-", "+", "COUNT", 1)[1]
local held = redis.call("HMGET", KEYS[1], "name", "timestamp", "processedOn", "finishedOn",
                        "atm", "ats", "opts", "failedReason")
local read, opts = pcall(cjson.decode, held[7] or "{}")
local allowed = read and type(opts) == "table" and tonumber(opts["attempts"]) or ""
return {progress or "", progress and 1 or 0, finished, outcome,
        redis.call("LLEN", KEYS[2]), newest and newest[1] or "0-0", oldest and oldest[1] or "0-0",
        held[1] or "", redis.call("EXISTS", KEYS[6]), held[2] or "", held[3] or "", held[4] or "",
        held[5] or "", held[6] or "", allowed, held[8] or ""}
"""

JOB_EVENTS = """
--[[
  Return one job's entries in a page of its queue's event stream: Redis reads the
  page, and sends only that job's entries, within a budget of bytes, so that resuming
  a stream costs the same whatever the other jobs' values hold.

  KEYS[1] event stream     <prefix>:<queue>:events

  ARGV[1] the position to read after, as an exclusive XRANGE start: "(<ms>-<seq>"
  ARGV[2] the most entries of the stream to read
  ARGV[3] job id
  ARGV[4] the most bytes of the job's entries' values to return

  Returns {the id of the last entry read, or "" for none, {the job's entries}}
          -4 the job's entries hold more than ARGV[4] bytes
]]
local entries = redis.call("XRANGE", KEYS[1], ARGV[1], "+", "COUNT", ARGV[2])
local found, room = {}, tonumber(ARGV[4])
for _, entry in ipairs(entries) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == "jobId" then
      if fields[i + 1] == ARGV[3] then
        for j = 2, #fields, 2 do room = room - #fields[j] end
        if room < 0 then return -4 end
        found[#found + 1] = entry
      end
      break
    end
  end
end
local last = entries[#entries]
return {last and last[1] or "", found}
"""

# Script return codes, turned into NotLockHolder, NoSuchJob and NotBullmqLayout in
# JobStore._run.
NOT_LOCK_HOLDER = -1
NO_SUCH_JOB = -2
NOT_BULLMQ_LAYOUT = -3  # with the index of the key, in KEYS, that is not
TOO_MANY_BYTES = -4


def line_stamp(seconds: float) -> str:
    """Return a moment as the start of a stamped log line (LOG_LINE_TIMESTAMPS): ISO 8601
    in UTC to the millisecond, `2026-12-05T11:45:56.123Z`."""
    whole = int(seconds)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        + f".{int((seconds - whole) * 1000):03d}Z"
    )


class Script:
    """A Lua script, run by its SHA1 from Redis's script cache; `name` and `done` (what
    it did when it succeeded) label its outcomes in the metrics."""

    def __init__(self, name: str, source: str, done: str) -> None:
        self.name = name
        self.done = done
        self.source = source
        # Redis names cached scripts by SHA1; a name, not a safeguard.
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


class JobStore:
    """BullMQ's keys of the jobs in one Redis database or cluster.

    What a route reads or writes is one script, one round trip; the streams of events
    also read a queue's event stream and a job's lines in pages, and ping checks that
    Redis answers. A method raises NotLockHolder, NoSuchJob or CrossSlot for what the
    caller got wrong, a RedisError for what Redis did.
    """

    set_progress_script = Script("set_progress", SET_PROGRESS, "written")
    add_log_script = Script("add_log", ADD_LOG, "written")
    read_logs_script = Script("read_logs", READ_LOGS, "read")
    read_progress_script = Script("read_progress", READ_PROGRESS, "read")
    job_state_script = Script("job_state", JOB_STATE, "read")
    job_events_script = Script("job_events", JOB_EVENTS, "read")

    def __init__(
        self,
        connect: Callable[[], RedisCommands],
        prefix: str,
        max_logs: int | None = None,
        cluster: bool = False,
        max_page_bytes: int = 1024 * 1024,
        stamp_lines: bool = False,
    ) -> None:
        self.connect = connect
        self.prefix = prefix
        self.max_logs = b"" if max_logs is None else str(max_logs).encode()
        self.max_page_bytes = max_page_bytes
        self.stamp_lines = stamp_lines
        # A script may touch one cluster slot only.
        self.one_slot = cluster
        self._redis: RedisCommands | None = None
        self._lock = threading.Lock()

    @property
    def redis(self) -> RedisCommands:
        """Return the Redis connections, made on first use.

        A cluster client reads the cluster's layout as it is made; made here, a cluster
        that is down at start-up costs 503s until it is up, not a failed start.
        """
        if self._redis is None:
            with self._lock:
                if self._redis is None:
                    self._redis = self.connect()
        return self._redis

    def close(self) -> None:
        """Close the Redis connections, if they were made; they are made anew on use."""
        with self._lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = None

    def queues_with_active_jobs(self) -> Iterator[str]:
        """Yield the name of every queue that has jobs active, found by SCAN (every
        master of a cluster), a page of keys a round trip."""
        pattern, head, tail = f"{self.prefix}:*:active", len(self.prefix) + 1, -len(":active")
        if self.one_slot:
            keys = self.redis.scan_iter(match=pattern, count=1000, _type="list")  # type: ignore[attr-defined]
        else:
            keys = self.scan(pattern)
        for found in keys:
            queue = text(found)[head:tail]
            if queue and ":" not in queue:
                yield queue

    def scan(self, pattern: str) -> Iterator[bytes]:
        """Yield the lists whose keys match `pattern` on one server, a page at a time."""
        cursor = b"0"
        while True:
            cursor, keys = self.redis.execute_command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 1000, "TYPE", "list"
            )
            yield from keys
            if cursor in (0, b"0", "0"):
                return

    def ping(self) -> None:
        """Raise a RedisError unless Redis answers."""
        self.redis.execute_command("PING")

    def key(self, queue: str, *parts: str) -> str:
        """Return BullMQ's key for a queue, or for one of its jobs and a suffix."""
        return key(self.prefix, queue, *parts)

    def write_progress(self, queue: str, job_id: str, token: bytes, progress: bytes) -> None:
        """Store a job's progress and publish a progress event."""
        keys = (
            self.key(queue, job_id),
            self.key(queue, job_id, "lock"),
            self.key(queue, "events"),
            self.key(queue, "meta"),
        )
        self._run(self.set_progress_script, queue, job_id, keys, (token, job_id, progress))

    def append_log(self, queue: str, job_id: str, token: bytes, line: str) -> int:
        """Append a line to a job's logs, after the time it came (line_stamp) when lines
        are stamped, and publish it to the streams watching the job (event_reader.py);
        return how many lines the job keeps."""
        if self.stamp_lines:
            line = f"{line_stamp(time.time())} {line}"
        keys = (
            self.key(queue, job_id),
            self.key(queue, job_id, "lock"),
            self.key(queue, job_id, "logs"),
        )
        args = (token, line, self.max_logs, b"" if self.one_slot else keys[2])
        count: int = self._run(self.add_log_script, queue, job_id, keys, args)
        return count

    def page_of_logs(
        self, queue: str, job_id: str, start: int, length: int, newest_first: bool
    ) -> tuple[int, list[bytes]]:
        """Return (total count, one page of lines) of a job's logs.

        The page holds whole lines up to max_page_bytes, and at least one line.
        """
        keys = (self.key(queue, job_id), self.key(queue, job_id, "logs"))
        end = start + length - 1
        # Newest first counts from the end of the list; BullMQ appends at the end.
        span = (-(end + 1), -(start + 1)) if newest_first else (start, end)
        order = b"desc" if newest_first else b"asc"
        args = (*span, order, self.max_page_bytes)
        count, *lines = self._run(self.read_logs_script, queue, job_id, keys, args)
        return count, lines

    def stored_progress(self, queue: str, job_id: str) -> bytes | None:
        """Return a job's progress as stored, None if it was never set."""
        keys = (self.key(queue, job_id),)
        found: list[bytes] = self._run(self.read_progress_script, queue, job_id, keys, ())
        return found[0] if found else None

    def job_state(self, queue: str, job_id: str) -> JobState:
        """Return what a job holds, and where its queue's event stream stands."""
        keys = (
            self.key(queue, job_id),
            self.key(queue, job_id, "logs"),
            self.key(queue, "events"),
            self.key(queue, "completed"),
            self.key(queue, "failed"),
            self.key(queue, job_id, "lock"),
        )
        (progress, has_progress, finished, outcome, log_count, newest, oldest, name, locked,
         *held) = self._run(self.job_state_script, queue, job_id, keys, (job_id,))  # fmt: skip
        added, processed, ended, made, started = (
            int(value) if value.isdigit() else None for value in map(text, held[:5])
        )
        return JobState(
            progress=text(progress) if has_progress else None,
            finished=text(finished) or None,
            outcome=text(outcome),
            log_count=log_count,
            stream_top=stream_id(newest),
            stream_first=stream_id(oldest),
            name=text(name),
            locked=bool(locked),
            times=JobTimes(added, processed, ended),
            attempts=JobAttempts(
                made or 0, started or 0, max(1, int(held[5] or 1)), text(held[6]) or None
            ),
        )

    def job_events_after(
        self, queue: str, job_id: str, after: StreamId, count: int, max_bytes: int
    ) -> tuple[StreamId | None, list[tuple[bytes, dict[bytes, bytes]]]]:
        """Return the position of the last of up to `count` entries of a queue's event
        stream after a position (None if there are none), and the job's entries among
        them; raise TooManyBytes if the job's entries hold more than max_bytes."""
        keys = (self.key(queue, "events"),)
        args = (f"({after[0]}-{after[1]}", count, job_id, max_bytes)
        last, entries = self._run(self.job_events_script, queue, job_id, keys, args)
        return (stream_id(last) if last else None), [
            (entry_id, pairs(fields)) for entry_id, fields in entries
        ]

    def log_page(self, queue: str, job_id: str, start: int, count: int) -> list[bytes]:
        """Return up to `count` of a job's log lines from index `start`, as many whole
        lines as fit in max_page_bytes (at least one)."""
        return self.page_of_logs(queue, job_id, start, count, newest_first=False)[1]

    def run_script(
        self,
        script: Script,
        keys: tuple[str, ...] | list[str],
        args: tuple[Any, ...] | list[Any],
    ) -> Any:
        """Run a script on keys of one cluster slot, by its SHA1 (the script itself when
        Redis does not hold it), and return its reply. Raise CrossSlot, NotBullmqLayout
        for a key of another type, or a RedisError."""
        if self.one_slot and len({key_slot(key.encode()) for key in keys}) > 1:
            raise CrossSlot(keys[0])
        redis_ = self.redis
        try:
            try:
                return redis_.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                # Redis restarted or its scripts were flushed: send the script itself,
                # which Redis caches again for the EVALSHA of the next request.
                return redis_.execute_command("EVAL", script.source, len(keys), *keys, *args)
        except redis.exceptions.ResponseError as error:
            if "WRONGTYPE" in str(error):
                raise NotBullmqLayout(wrong_key(error, script, tuple(keys))) from error
            raise script_error(error, script) from error

    def _run(
        self, script: Script, queue: str, job_id: str, keys: tuple[str, ...], args: tuple[Any, ...]
    ) -> Any:
        """Run one of the scripts on a job's keys; raise what its return code stands for."""
        result = self.run_script(script, keys, args)
        if isinstance(result, list) and result[:1] == [NOT_BULLMQ_LAYOUT]:
            raise NotBullmqLayout(keys[result[1] - 1])
        if result == TOO_MANY_BYTES:
            script_outcome(script.name, "too_many_bytes").inc()
            raise TooManyBytes
        if result == NOT_LOCK_HOLDER:
            script_outcome(script.name, "not_lock_holder").inc()
            raise NotLockHolder
        if result == NO_SUCH_JOB:
            script_outcome(script.name, "no_such_job").inc()
            raise NoSuchJob(queue, job_id)
        script_outcome(script.name, script.done).inc()
        return result


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """Return a stream entry's fields, given as name, value, name, value..."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def script_error(
    error: redis.exceptions.ResponseError, script: Script
) -> redis.exceptions.RedisError:
    """Return the error a failed script stands for.

    Redis before 7 reports a write refused inside a script (out of memory, a read-only
    replica) as a script error, where Redis 7 reports the refusal itself. A command the
    Redis user may not run is a script error everywhere, and only Valkey's names the
    command: the line of the script that Redis names does.
    """
    message = str(error)
    if any(sign in message for sign in SCRIPT_DENIED):
        line = SCRIPT_LINE.search(message)
        called = line and SCRIPT_CALL.search(script.source.splitlines()[int(line[1]) - 1])
        if called:
            message += f" (the {script.name} script's '{called[1].lower()}')"
        return redis.exceptions.NoPermissionError(message)
    if "OOM command not allowed" in message:
        return redis.exceptions.OutOfMemoryError(message)
    if "-READONLY" in message:
        return redis.exceptions.ReadOnlyError(message)
    return error


def wrong_key(error: redis.exceptions.ResponseError, script: Script, keys: tuple[str, ...]) -> str:
    """Return the key a WRONGTYPE error inside a script is about: the one the script's
    line that Redis names works on (or, where it names none, every key of the call)."""
    line = SCRIPT_LINE.search(str(error))
    used = line and SCRIPT_KEY.search(script.source.splitlines()[int(line[1]) - 1])
    return keys[int(used[1]) - 1] if used else " or ".join(keys)


# How Redis 6.2, Redis 7 and Valkey word an ACL's refusal inside a script, and how they
# name the line of the script that was refused, and the key a line works on.
SCRIPT_DENIED = ("NOPERM", "The user executing the script can't", "ACL failure in script")
SCRIPT_LINE = re.compile(r"@user_script: ?(\d+)")
SCRIPT_CALL = re.compile(r'redis\.call\("(\w+)"')
SCRIPT_KEY = re.compile(r"KEYS\[(\d+)\]")
