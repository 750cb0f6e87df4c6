"""Live events of watched jobs, for GET /queues/<queue>/jobs/<job_id>/events.

One Watcher per process reads every watched queue's event stream (BullMQ's
`<prefix>:<queue>:events`, where BullMQ and this service note progress, completion and
failure) and every watched job's new log lines, and hands each event to the streams
that watch that job. However many streams are open, it holds one Redis connection (one
per node of a cluster) besides the process's pool:

- on one server (or Sentinel's master), one blocking XREAD over all the watched
  queues' streams, woken by the next event, then at most every POLL_SECONDS one
  pipeline of each watched job's new log lines;
- on a cluster, whose queues live on different nodes, one pipeline per node every
  POLL_SECONDS for both.

event_stream() turns what a job holds and what the watcher hands on into the
text/event-stream a browser's EventSource reads. Each event's id is a cursor, the
stream position and the number of log lines seen ("1732870000000-0/12"): a client that
reconnects with it as Last-Event-ID gets exactly what it missed.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from gevent import monkey
from redis.cluster import RedisCluster
from redis.typing import KeyT, StreamIdT

from .metrics import WATCHER_ERRORS

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # the longest a new log line waits to be seen
HEARTBEAT_SECONDS = 15.0  # a comment this often keeps proxies from closing idle streams
RETRY_MS = 2000  # how soon browsers reconnect
# How far a stream may fall behind before it is ended (the client resumes from its
# cursor): in events, and in bytes of their data, so that a reader that stops reading
# while large progress values pour in holds at most this much of the worker's memory.
INBOX = 1000
INBOX_BYTES = 1024 * 1024
PAGE = 100  # entries of an event stream, or log lines, read at once
# The most entries of a queue's event stream that resuming one stream reads, and the
# most bytes of the job's own entries it takes from them: a cursor further behind gets
# the job's current progress instead, as a trimmed stream does.
REPLAY_ENTRIES = 1000
REPLAY_BYTES = 1024 * 1024

StreamId = tuple[int, int]
START: StreamId = (0, 0)
CURSOR = re.compile(r"(\d{1,20})-(\d{1,20})/(\d{1,16})")
# Redis stream ids are two unsigned 64-bit numbers; a job's log count is a list length,
# below 2^53 as BullMQ's clients read it.
LARGEST_ID_PART = 2**64 - 1
LARGEST_LOG_COUNT = 2**53 - 1


def text(raw: bytes) -> str:
    """Return bytes from Redis as text: what is not UTF-8 becomes U+FFFD, never an error
    (a queue's event stream holds whatever any client wrote)."""
    return raw.decode("utf-8", "replace")


def stream_id(raw: bytes | str) -> StreamId:
    """Return a Redis stream id as a pair of numbers, which order as the ids do."""
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def cursor_text(position: StreamId, log_count: int) -> str:
    """Return the cursor of a stream position and a number of log lines."""
    return f"{position[0]}-{position[1]}/{log_count}"


def parse_cursor(cursor: str) -> tuple[StreamId, int] | None:
    """Return (stream position, log count) from a cursor, or None if it is not one this
    service could have made."""
    found = CURSOR.fullmatch(cursor.strip())
    if found is None:
        return None
    milliseconds, sequence, log_count = int(found[1]), int(found[2]), int(found[3])
    if max(milliseconds, sequence) > LARGEST_ID_PART or log_count > LARGEST_LOG_COUNT:
        return None
    return (milliseconds, sequence), log_count


@dataclass(frozen=True)
class Event:
    """What happened to a job: kind is progress, log, completed, failed or removed;
    position its stream id, or for a log line its index in the job's list."""

    kind: str
    position: StreamId | int
    data: str


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

    @property
    def status(self) -> str:
        """Return "completed", "failed", "active" (a worker holds it) or "waiting"."""
        return self.finished or ("active" if self.locked else "waiting")


class JobReader(Protocol):
    """What event_stream reads of a job beside its state (store.JobStore)."""

    def job_state(self, queue: str, job_id: str) -> JobState:
        """Raise LookupError for a job that is not there."""
        ...

    def job_events_after(
        self, queue: str, job_id: str, after: StreamId, count: int, max_bytes: int
    ) -> tuple[StreamId | None, list[tuple[bytes, dict[bytes, bytes]]]]:
        """Return the position of the last of up to `count` entries after `after` (None
        for none), and the job's entries among them; raise TooManyBytes
        when those hold more than max_bytes."""
        ...

    def log_page(self, queue: str, job_id: str, start: int, count: int) -> list[bytes]:
        """Return up to `count` of the job's lines from index `start`, as many whole
        lines as fit in a page's bytes (at least one); raise LookupError for a job that
        is not there."""
        ...


def stream_event(entry_id: bytes, fields: dict[bytes, bytes]) -> Event | None:
    """Return the event of one entry of a queue's event stream, if a stream cares."""
    kind = text(fields.get(b"event", b""))
    position = stream_id(entry_id)
    if kind == "progress":
        return Event("progress", position, text(fields.get(b"data", b"0")))
    if kind in FINAL:
        outcome = text(fields.get(FINAL[kind].encode(), b""))
        return Event(kind, position, final_data(kind, outcome))
    if kind == "removed":
        return Event("removed", position, "")
    return None


# A finished job's last event, and the field of the job hash and of the stream entry
# that holds its outcome.
FINAL = {"completed": "returnvalue", "failed": "failedReason"}


def final_data(kind: str, outcome: str | None) -> str:
    """Return a completed or failed event's data. A return value that cannot be read
    as JSON (not JSON, or nested deeper than Python reads) is carried as the text it
    was stored as: whatever a job returned, its stream ends as it should."""
    if kind == "completed":
        try:
            return json.dumps({"returnvalue": json.loads(outcome or "null")}, ensure_ascii=False)
        except (ValueError, RecursionError) as error:
            log.warning("a return value carried as text, not read as JSON: %s", error)
            return json.dumps({"returnvalue": outcome}, ensure_ascii=False)
    return json.dumps({"failedReason": outcome or ""}, ensure_ascii=False)


# Why a stream ends before its job does; the client reconnects and resumes.
BEHIND = "the client fell too far behind"
UNREADABLE = "a key of the job's queue is not in BullMQ's layout"


@dataclass(eq=False)
class Subscription:
    """One open stream's place in the watcher: the events handed on that the stream has
    not sent yet, at most INBOX of them and INBOX_BYTES of their data."""

    queue_name: str
    job_id: str
    inbox: queue.Queue[Event] = field(default_factory=lambda: queue.Queue(INBOX))
    inbox_bytes: int = 0
    counting: threading.Lock = field(default_factory=threading.Lock)
    ended: str | None = None  # BEHIND or UNREADABLE: the watcher no longer serves it

    def put(self, event: Event) -> None:
        """Hand the stream an event, or end it when it is too far behind."""
        with self.counting:
            if self.inbox_bytes + len(event.data) > INBOX_BYTES or self.inbox.full():
                self.ended = BEHIND
                return
            self.inbox_bytes += len(event.data)
        self.inbox.put_nowait(event)  # only the watcher's thread puts: there is room

    def get(self, timeout: float) -> Event:
        """Return the next event handed on; raise queue.Empty after `timeout` seconds."""
        event = self.inbox.get(timeout=timeout)
        with self.counting:
            self.inbox_bytes -= len(event.data)
        return event


@dataclass
class WatchedJob:
    subscriptions: set[Subscription]
    log_next: int  # the index of the next line to read


# How long the watcher waits after an error it did not expect before it tries again,
# doubling each time it fails again, up to the last.
RESTART_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0)


class Watcher:
    """Reads the events and new log lines of every watched job, for the whole process.

    Nothing Redis holds stops it: a connection lost is made again; a key of a queue that
    is not in BullMQ's layout ends the streams of that queue alone; any other error is
    logged with its traceback, counted, and the loop starts again after a pause.
    """

    def __init__(
        self,
        connect: Callable[[], redis.Redis | RedisCluster],
        key: Callable[..., str],
        block_ms: int,
    ) -> None:
        self.connect = connect
        self.key = key  # BullMQ's key of a queue's part, or a job's (store.JobStore.key)
        self.block_ms = block_ms
        self.lock = threading.Lock()
        self.queues: dict[str, StreamId] = {}  # queue -> position in its event stream
        self.jobs: dict[tuple[str, str], WatchedJob] = {}
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.failure: str | None = None  # the last turn's unexpected error, if it failed
        WATCHERS.add(self)

    def subscribe(
        self, queue_name: str, job_id: str, stream_top: StreamId, log_count: int
    ) -> tuple[Subscription, StreamId, int]:
        """Watch a job whose stream and logs the caller has read up to stream_top and
        log_count; return the subscription and the watcher's own positions, which may
        be further on: what lies between, the caller reads itself."""
        subscription = Subscription(queue_name, job_id)
        with self.lock:
            position = self.queues.setdefault(queue_name, stream_top)
            job = self.jobs.setdefault((queue_name, job_id), WatchedJob(set(), log_count))
            job.subscriptions.add(subscription)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.run, name="watcher", daemon=True)
                self.thread.start()
            return subscription, position, job.log_next

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop watching for one stream; forget what no stream watches any more."""
        with self.lock:
            key = (subscription.queue_name, subscription.job_id)
            job = self.jobs.get(key)
            if job is None:
                return
            job.subscriptions.discard(subscription)
            if not job.subscriptions:
                del self.jobs[key]
                if not any(queue_name == subscription.queue_name for queue_name, _ in self.jobs):
                    # Gone already where the watcher found the queue unreadable.
                    self.queues.pop(subscription.queue_name, None)

    def trouble(self) -> str | None:
        """Return why the watcher is not doing its work, or None while it is (or while
        no stream has needed it yet)."""
        if self.thread is not None and not self.thread.is_alive() and not self.stopping.is_set():
            return "the job watcher has stopped"
        if self.failure is not None:
            return f"the job watcher is failing: {self.failure}"
        return None

    def run(self) -> None:
        """Read and hand on events until stopped, then close the connection; outlive
        Redis outages, and whatever else goes wrong."""
        client: redis.Redis | RedisCluster | None = None
        polled = 0.0
        failures = 0
        while not self.stopping.is_set():
            try:
                if client is None:
                    client = self.connect()
                if not self.queues:
                    time.sleep(POLL_SECONDS)
                elif isinstance(client, RedisCluster):
                    polled = time.monotonic()
                    self.poll(client, events=True)
                    time.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - polled)))
                else:
                    self.read_events(client)
                    if time.monotonic() - polled >= POLL_SECONDS:
                        polled = time.monotonic()
                        self.poll(client, events=False)
                failures, self.failure = 0, None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                log.warning("Redis unavailable to the job watcher, retrying: %s", error)
                self.disconnect(client)
                client = None
                self.stopping.wait(1.0)
            except Exception as error:
                # Not an outage: a fault of this code or of what Redis answered. The
                # loop starts again, a little later each time it fails again.
                pause = RESTART_SECONDS[min(failures, len(RESTART_SECONDS) - 1)]
                failures += 1
                log.exception("the job watcher failed; it starts again in %g s", pause)
                WATCHER_ERRORS.inc()
                self.failure = f"{type(error).__name__}: {error}"  # last: /readyz tells
                self.disconnect(client)
                client = None
                self.stopping.wait(pause)
        self.disconnect(client)

    @staticmethod
    def disconnect(client: redis.Redis | RedisCluster | None) -> None:
        """Close the watcher's connection, if it has one."""
        if client is not None:
            client.close()

    def read_events(self, client: redis.Redis) -> None:
        """Wait up to block_ms for new events in any watched queue; hand them on."""
        with self.lock:
            queues = dict(self.queues)
        if not queues:  # the last stream closed since the loop looked
            return
        ids: dict[KeyT, StreamIdT] = {
            self.key(name, "events"): f"{at[0]}-{at[1]}" for name, at in queues.items()
        }
        try:
            replies = client.xread(ids, count=PAGE, block=self.block_ms) or []
        except redis.exceptions.ResponseError:
            # One key of the lot is not a stream; the others must go on.
            self.end_unreadable_queues(client, list(queues))
            return
        self.deliver_events(replies, self.stream_names(queues))

    def end_unreadable_queues(self, client: redis.Redis, queues: list[str]) -> None:
        """End the streams of every queue whose event stream key holds something other
        than a stream, and stop watching it."""
        pipe = client.pipeline(transaction=False)
        for name in queues:
            pipe.type(self.key(name, "events"))
        for name, kind in zip(queues, pipe.execute(), strict=True):
            if kind not in (b"stream", b"none"):
                self.end_queue(name, f"{self.key(name, 'events')} is a {text(kind)}")

    def end_queue(self, queue_name: str, why: str) -> None:
        """End every stream of a queue that cannot be read, and stop watching it."""
        log.warning("%s, not a stream: the streams of queue %r end", why, queue_name)
        with self.lock:
            self.queues.pop(queue_name, None)
            for (name, _), job in list(self.jobs.items()):
                if name == queue_name:
                    for subscription in job.subscriptions:
                        subscription.ended = UNREADABLE

    def end_job(self, queue_name: str, job_id: str, why: str) -> None:
        """End every stream of a job whose keys cannot be read."""
        log.warning("%s: the streams of job %r in queue %r end", why, job_id, queue_name)
        with self.lock:
            job = self.jobs.get((queue_name, job_id))
            for subscription in job.subscriptions if job else ():
                subscription.ended = UNREADABLE

    def poll(self, client: redis.Redis | RedisCluster, events: bool) -> None:
        """Read each watched job's new log lines (and, on a cluster, each watched
        queue's new events), in one pipeline; hand them on."""
        with self.lock:
            queues = dict(self.queues)
            jobs = {key: job.log_next for key, job in self.jobs.items()}
        pipe = client.pipeline(transaction=False)
        if events:
            for name, position in queues.items():
                pipe.xread({self.key(name, "events"): f"{position[0]}-{position[1]}"}, count=PAGE)
        for (name, job_id), start in jobs.items():
            pipe.exists(self.key(name, job_id))
            pipe.lrange(self.key(name, job_id, "logs"), start, start + PAGE - 1)
        # A key of the wrong type fails its own command, not the others.
        replies = iter(pipe.execute(raise_on_error=False))
        if events:
            names = self.stream_names(queues)
            for name in queues:
                reply = next(replies)
                if isinstance(reply, redis.exceptions.ResponseError):
                    self.end_queue(name, f"{self.key(name, 'events')}: {reply}")
                else:
                    self.deliver_events(reply or [], names)
        for (name, job_id), start in jobs.items():
            exists, lines = next(replies), next(replies)
            if isinstance(exists, Exception) or isinstance(lines, Exception):
                self.end_job(name, job_id, f"{self.key(name, job_id, 'logs')}: {lines}")
                continue
            if not exists:
                self.deliver(name, job_id, Event("removed", START, ""))
                continue
            with self.lock:
                job = self.jobs.get((name, job_id))
                if job is None or job.log_next != start:
                    continue
                job.log_next = start + len(lines)
            for index, line in enumerate(lines, start):
                self.deliver(name, job_id, Event("log", index, log_data(index, line)))

    def stream_names(self, queues: Iterable[str]) -> dict[bytes, str]:
        """Return the queues by the keys of their event streams, as XREAD names them."""
        return {self.key(name, "events").encode(): name for name in queues}

    def deliver_events(self, replies: Any, names: dict[bytes, str]) -> None:
        """Hand on what XREAD gave, and move past it. An entry of a job that no stream
        watches is passed over unread: its values are any client's, and only a
        watched job's are worth the cost of reading."""
        for key, entries in replies:
            name = names[key]
            if not entries:
                continue
            with self.lock:
                watched = {job_id for queue_name, job_id in self.jobs if queue_name == name}
            for entry_id, fields in entries:
                job_id = text(fields.get(b"jobId", b""))
                if job_id in watched and (event := stream_event(entry_id, fields)) is not None:
                    self.deliver(name, job_id, event)
            with self.lock:
                if name in self.queues:
                    self.queues[name] = max(self.queues[name], stream_id(entries[-1][0]))

    def deliver(self, queue_name: str, job_id: str, event: Event) -> None:
        """Hand an event to every stream watching the job."""
        with self.lock:
            job = self.jobs.get((queue_name, job_id))
            for subscription in job.subscriptions if job else ():
                subscription.put(event)

    def stop(self) -> None:
        """End every open stream within a second (the process is stopping)."""
        self.stopping.set()

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for a stopped watcher's thread to end."""
        if self.thread is not None:
            self.thread.join(timeout)


# Every watcher of the process, for stop_all.
WATCHERS: weakref.WeakSet[Watcher] = weakref.WeakSet()


def stop_all() -> None:
    """End every open stream of the process within a second: it is stopping, and its
    clients should resume elsewhere with their Last-Event-ID rather than hold it up."""
    for watcher in list(WATCHERS):
        watcher.stop()


def log_data(index: int, line: bytes) -> str:
    """Return a log event's data: the line's index in the job's list, and the line."""
    return json.dumps({"index": index, "line": text(line)}, ensure_ascii=False)


class TooManyStreams(Exception):
    """A stream past a limit of this process: its credential's, whose kind (`"api"` or
    `"watch"`) `kind` says, or with `kind` None the process's own."""

    def __init__(self, kind: str | None, limit: int) -> None:
        super().__init__(kind, limit)
        self.kind = kind
        self.limit = limit


class StreamLimits:
    """How many streams of events this process holds, in all and per credential (an API
    token's identity, or a watch token), within the limits its settings set."""

    def __init__(self, most: int, per_api_token: int, per_watch_token: int) -> None:
        self.most = most
        self.per_kind = {"api": per_api_token, "watch": per_watch_token}
        self.open = 0
        self.held: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def take(self, *credentials: tuple[str, str]) -> Callable[[], None]:
        """Count one more stream against each credential given, (kind, identity) with
        kind "api" or "watch", or raise TooManyStreams naming the first at its limit;
        return the function that gives it back, once."""
        with self.lock:
            if self.open >= self.most:
                raise TooManyStreams(None, self.most)
            for kind, identity in credentials:
                if self.held.get((kind, identity), 0) >= self.per_kind[kind]:
                    raise TooManyStreams(kind, self.per_kind[kind])
            self.open += 1
            for credential in credentials:
                self.held[credential] = self.held.get(credential, 0) + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            with self.lock:
                if given_back:
                    return
                given_back = True
                self.open -= 1
                for credential in credentials:
                    self.held[credential] -= 1
                    if not self.held[credential]:
                        del self.held[credential]

        return give_back


class Cursor:
    """Where one stream is: the event stream position it has covered, and the number of
    log lines it has sent; it formats events and drops those already sent."""

    def __init__(self, position: StreamId, log_next: int) -> None:
        self.position = position
        self.log_next = log_next

    def __str__(self) -> str:
        return cursor_text(self.position, self.log_next)

    def send(self, event: Event) -> bytes | None:
        """Return an event from Redis as text/event-stream, or None if already sent."""
        if event.kind == "log":
            assert isinstance(event.position, int)
            if event.position < self.log_next:
                return None
            self.log_next = event.position + 1
        else:
            assert isinstance(event.position, tuple)
            if event.position <= self.position:
                return None
            self.position = event.position
        return self.announce(event)

    def announce(self, event: Event) -> bytes:
        """Return an event as text/event-stream, with this cursor as its id; a line
        break in its data starts another data field."""
        data = "".join(f"data: {part}\n" for part in event.data.split("\n"))
        return f"id: {self}\nevent: {event.kind}\n{data}\n".encode()


def comment(line: str) -> bytes:
    """Return a comment of text/event-stream: a client's EventSource passes it over."""
    return f": {line}\n\n".encode()


class TooManyBytes(Exception):
    """What a read of Redis would return holds more bytes than it may."""


class ReplayTooLong(Exception):
    """The events to replay lie further than REPLAY_ENTRIES entries of the stream, or
    the job's own hold more than REPLAY_BYTES."""


def replay(
    reader: JobReader, queue_name: str, job_id: str, after: StreamId, until: StreamId
) -> Iterator[Event]:
    """Yield the job's events in its queue's stream after `after`, up to `until`; raise
    ReplayTooLong after REPLAY_ENTRIES entries short of `until`, or REPLAY_BYTES of the
    job's own. Redis passes the other jobs' entries over: only the job's are sent."""
    entries_left, bytes_left = REPLAY_ENTRIES, REPLAY_BYTES
    while after < until:
        if entries_left <= 0:
            raise ReplayTooLong
        try:
            last, entries = reader.job_events_after(
                queue_name, job_id, after, min(PAGE, entries_left), bytes_left
            )
        except TooManyBytes:
            raise ReplayTooLong from None
        if last is None:
            return
        entries_left -= min(PAGE, entries_left)
        for entry_id, fields in entries:
            position = stream_id(entry_id)
            if position > until:
                return
            bytes_left -= sum(map(len, fields.values()))
            event = stream_event(entry_id, fields)
            if event is not None:
                yield event
        after = last


def lines(
    reader: JobReader, queue_name: str, job_id: str, start: int, stop: int
) -> Iterator[Event]:
    """Yield the job's log lines from index start up to stop, a page at a time."""
    while start < stop:
        page = reader.log_page(queue_name, job_id, start, min(stop - start, PAGE))
        if not page:
            return
        for index, line in enumerate(page, start):
            yield Event("log", index, log_data(index, line))
        start += len(page)


def event_stream(
    reader: JobReader,
    watcher: Watcher,
    queue_name: str,
    job_id: str,
    state: JobState,
    tail: int,
    resume: tuple[StreamId, int] | None,
    until: float | None = None,
    client: socket.socket | None = None,
) -> Iterator[bytes]:
    """Yield a job's events as text/event-stream: what it holds (or, resuming, what the
    client missed), then what happens to it, until it finishes or is removed, or, given
    `until` (a time.monotonic()), until then; given the client's socket, until the
    client hangs up."""
    subscription, watched_position, watched_logs = watcher.subscribe(
        queue_name, job_id, state.stream_top, state.log_count
    )
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        current = Event("progress", state.stream_top, state.progress or "")
        if resume is None:
            cursor = Cursor(state.stream_top, max(0, state.log_count - tail))
            if state.progress is not None:
                yield cursor.announce(current)
        elif resume[0] <= state.stream_top and (
            resume[0] == START or START < state.stream_first <= resume[0]
        ):
            # All the stream since the cursor is there: replay what the job missed.
            # Its end, if it came, is in the state read below, after its last lines.
            cursor = Cursor(resume[0], min(resume[1], state.log_count))
            try:
                for event in replay(reader, queue_name, job_id, resume[0], state.stream_top):
                    if event.kind == "progress" and (sent := cursor.send(event)) is not None:
                        yield sent
            except ReplayTooLong:
                yield comment("too much happened since Last-Event-ID: the current progress")
                if state.progress is not None:
                    cursor.position = state.stream_top
                    yield cursor.announce(current)
            cursor.position = max(cursor.position, state.stream_top)
        else:
            # Trimmed past the cursor (or a cursor of a stream since emptied): what it
            # missed is gone, but the progress is not.
            cursor = Cursor(state.stream_top, min(resume[1], state.log_count))
            if state.progress is not None:
                yield cursor.announce(current)
        # The lines since the cursor, up to where the watcher starts.
        for event in lines(reader, queue_name, job_id, cursor.log_next, watched_logs):
            if (sent := cursor.send(event)) is not None:
                yield sent
        if state.finished is not None:
            final = Event(
                state.finished, cursor.position, final_data(state.finished, state.outcome)
            )
            yield cursor.announce(final)
            return
        # Events the watcher handed on before this stream subscribed.
        events = replay(reader, queue_name, job_id, cursor.position, watched_position)
        yield from follow(reader, watcher, subscription, cursor, events, until, client)
    except LookupError:
        # Removed while the stream caught up.
        yield cursor.announce(Event("removed", cursor.position, json.dumps({"jobId": job_id})))
    except ReplayTooLong:
        pass  # the watcher was far ahead: the client resumes, from its cursor
    except redis.exceptions.RedisError as error:
        # The client reconnects with its cursor and misses nothing.
        log.warning(
            "Redis unavailable to the events of job %r in queue %r: %s", job_id, queue_name, error
        )
    finally:
        watcher.unsubscribe(subscription)


def follow(
    reader: JobReader,
    watcher: Watcher,
    subscription: Subscription,
    cursor: Cursor,
    events: Iterator[Event],
    until: float | None,
    client: socket.socket | None = None,
) -> Iterator[bytes]:
    """Yield the events given, then those the watcher hands on, until the job finishes
    or is removed, the process stops, the client falls too far behind or hangs up, or
    `until`. A client that hangs up is seen within a second, not at the next write: its
    place under the stream limits is free for its next stream at once."""
    beat = time.monotonic()
    while not watcher.stopping.is_set() and subscription.ended is None:
        event = next(events, None)
        if event is None:
            now = time.monotonic()
            if until is not None and now >= until:
                yield comment("the watch token expired: open the stream with a new one")
                return
            try:
                event = subscription.get(timeout=min(1.0, until - now) if until else 1.0)
            except queue.Empty:
                if client is not None and hung_up(client):
                    return
                if time.monotonic() - beat >= HEARTBEAT_SECONDS:
                    beat = time.monotonic()
                    yield comment("keep-alive")
                continue
        if event.kind == "removed":
            data = json.dumps({"jobId": subscription.job_id})
            yield cursor.announce(Event("removed", cursor.position, data))
            return
        if event.kind not in FINAL:
            if (sent := cursor.send(event)) is not None:
                yield sent
            continue
        try:
            state: JobState | None = reader.job_state(subscription.queue_name, subscription.job_id)
        except LookupError:
            state = None  # removed as it finished (BullMQ's removeOnComplete, removeOnFail)
        if state is not None and state.finished != event.kind:
            # A failed attempt that BullMQ retries leaves the job unfinished: not the end.
            cursor.send(event)
            continue
        if state is not None:
            # The lines the job wrote before it finished, which the watcher may not
            # have read yet, then the end.
            for line in lines(reader, subscription.queue_name, subscription.job_id,
                              cursor.log_next, state.log_count):  # fmt: skip
                if (sent := cursor.send(line)) is not None:
                    yield sent
        if (sent := cursor.send(event)) is not None:
            yield sent
        return


# The system's own poll: gevent's patched select module has none, and a poll that
# waits for nothing needs no greenlet.
poll = monkey.get_original("select", "poll")


def hung_up(client: socket.socket) -> bool:
    """Say whether the client has closed its end of the connection (or reset it)."""
    try:
        poller = poll()
        poller.register(client.fileno(), select.POLLRDHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True  # closed under us: gone all the same
