"""BullMQ's layout and values: the floor that the job store and the event reader both
stand on. A job's keys are `<prefix>:<queue>:<id>` (the hash) with suffixes (`:logs`,
`:lock`), a queue's `<prefix>:<queue>:<part>` (`:events`, `:wait`, `:active`, …);
stream ids order as pairs of numbers; bytes from Redis are read as text whatever they
hold."""

from __future__ import annotations

from dataclasses import dataclass


def key(prefix: str, queue: str, *parts: str) -> str:
    """Return BullMQ's key for a queue, or for one of its jobs and a suffix."""
    return ":".join((prefix, queue, *parts))


StreamId = tuple[int, int]
START: StreamId = (0, 0)


def text(raw: bytes) -> str:
    """Return bytes from Redis as text: what is not UTF-8 becomes U+FFFD, never an error
    (a queue's event stream holds whatever any client wrote)."""
    return raw.decode("utf-8", "replace")


def stream_id(raw: bytes | str) -> StreamId:
    """Return a Redis stream id as a pair of numbers, which order as the ids do."""
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(frozen=True)
class JobTimes:
    """When a job was added, started and finished, in milliseconds since the epoch, as
    BullMQ's `timestamp`, `processedOn` and `finishedOn` say; None for not yet."""

    added: int | None
    processed: int | None
    finished: int | None


@dataclass(frozen=True)
class JobAttempts:
    """A job's attempts, as BullMQ counts them: made (finished, `atm`), started (`ats`),
    allowed (its `attempts` option), and why the last failed one failed."""

    made: int
    started: int
    allowed: int
    failed_reason: str | None


@dataclass(frozen=True)
class JobState:
    """What a job holds when a stream opens (JobStore.job_state)."""

    progress: str | None
    finished: str | None  # "completed", "failed" or None
    outcome: str | None  # the return value's JSON, or the failed reason
    log_count: int
    stream_top: StreamId  # the newest id in the queue's event stream
    stream_first: StreamId  # the oldest still there
    name: str  # the job's name
    locked: bool  # whether a worker holds the job (BullMQ's lock)
    times: JobTimes = JobTimes(None, None, None)
    attempts: JobAttempts = JobAttempts(0, 0, 1, None)

    @property
    def status(self) -> str:
        """Return "completed", "failed", "active" (a worker holds it) or "waiting"."""
        return self.finished or ("active" if self.locked else "waiting")


# A finished job's last event, and the field of the job hash and of the stream entry
# that holds its outcome.
FINAL = {"completed": "returnvalue", "failed": "failedReason"}


class TooManyBytes(Exception):
    """What a read of Redis would return holds more bytes than it may."""
