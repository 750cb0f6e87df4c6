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
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from redis.cluster import RedisCluster
from redis.typing import KeyT, StreamIdT

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # the longest a new log line waits to be seen
HEARTBEAT_SECONDS = 15.0  # a comment this often keeps proxies from closing idle streams
RETRY_MS = 2000  # how soon browsers reconnect
INBOX = 1000  # events a stream may fall behind before it is ended (the client resumes)
PAGE = 500  # events or lines read at once when catching up

StreamId = tuple[int, int]
START: StreamId = (0, 0)
CURSOR = re.compile(r"(\d{1,20})-(\d{1,20})/(\d{1,12})")


def stream_id(raw: bytes | str) -> StreamId:
    """Return a Redis stream id as a pair of numbers, which order as the ids do."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def cursor_text(position: StreamId, log_count: int) -> str:
    """Return the cursor of a stream position and a number of log lines."""
    return f"{position[0]}-{position[1]}/{log_count}"


def parse_cursor(text: str) -> tuple[StreamId, int] | None:
    """Return (stream position, log count) from a cursor, or None if it is not one."""
    found = CURSOR.fullmatch(text.strip())
    if found is None:
        return None
    return (int(found[1]), int(found[2])), int(found[3])


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


class JobReader(Protocol):
    """What event_stream reads of a job beside its state (app.JobStore)."""

    def job_state(self, queue: str, job_id: str) -> JobState:
        """Raise LookupError for a job that is not there."""
        ...

    def events_after(
        self, queue: str, after: StreamId, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes]]]: ...

    def log_lines(self, queue: str, job_id: str, start: int, stop: int) -> list[bytes]: ...


def stream_event(entry_id: bytes, fields: dict[bytes, bytes]) -> Event | None:
    """Return the event of one entry of a queue's event stream, if a stream cares."""
    kind = fields.get(b"event", b"").decode()
    position = stream_id(entry_id)
    if kind == "progress":
        return Event("progress", position, fields.get(b"data", b"0").decode())
    if kind in FINAL:
        outcome = fields.get(FINAL[kind].encode(), b"").decode()
        return Event(kind, position, final_data(kind, outcome))
    if kind == "removed":
        return Event("removed", position, "")
    return None


# A finished job's last event, and the field of the job hash and of the stream entry
# that holds its outcome.
FINAL = {"completed": "returnvalue", "failed": "failedReason"}


def final_data(kind: str, outcome: str | None) -> str:
    """Return a completed or failed event's data."""
    if kind == "completed":
        try:
            value = json.loads(outcome or "null")
        except ValueError:
            value = outcome  # not JSON: as it was stored
        return json.dumps({"returnvalue": value}, ensure_ascii=False)
    return json.dumps({"failedReason": outcome or ""}, ensure_ascii=False)


@dataclass(eq=False)
class Subscription:
    """One open stream's place in the watcher."""

    queue_name: str
    job_id: str
    inbox: queue.Queue[Event] = field(default_factory=lambda: queue.Queue(INBOX))
    overflowed: bool = False


@dataclass
class WatchedJob:
    subscriptions: set[Subscription]
    log_next: int  # the index of the next line to read


class Watcher:
    """Reads the events and new log lines of every watched job, for the whole process."""

    def __init__(
        self,
        connect: Callable[[], redis.Redis | RedisCluster],
        key: Callable[..., str],
        block_ms: int,
    ) -> None:
        self.connect = connect
        self.key = key  # BullMQ's key of a queue's part, or a job's (JobStore.key)
        self.block_ms = block_ms
        self.lock = threading.Lock()
        self.queues: dict[str, StreamId] = {}  # queue -> position in its event stream
        self.jobs: dict[tuple[str, str], WatchedJob] = {}
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
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
            if self.thread is None:
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
                    del self.queues[subscription.queue_name]

    def run(self) -> None:
        """Read and hand on events until stopped, then close the connection; outlive
        Redis outages."""
        client: redis.Redis | RedisCluster | None = None
        polled = 0.0
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
            except redis.exceptions.RedisError as error:
                log.warning("Redis unavailable to the job watcher, retrying: %s", error)
                if client is not None:
                    client.close()
                client = None
                self.stopping.wait(1.0)
        if client is not None:
            client.close()

    def read_events(self, client: redis.Redis) -> None:
        """Wait up to block_ms for new events in any watched queue; hand them on."""
        with self.lock:
            queues = dict(self.queues)
        ids: dict[KeyT, StreamIdT] = {
            self.key(name, "events"): f"{at[0]}-{at[1]}" for name, at in queues.items()
        }
        replies = client.xread(ids, count=PAGE, block=self.block_ms) or []
        self.deliver_events(replies, self.stream_names(queues))

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
        replies = iter(pipe.execute())
        if events:
            names = self.stream_names(queues)
            for _ in queues:
                self.deliver_events(next(replies) or [], names)
        for (name, job_id), start in jobs.items():
            exists, lines = next(replies), next(replies)
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
        """Hand on what XREAD gave, and move past it."""
        for key, entries in replies:
            name = names[key]
            for entry_id, fields in entries:
                event = stream_event(entry_id, fields)
                if event is not None:
                    self.deliver(name, fields.get(b"jobId", b"").decode(), event)
            if entries:
                with self.lock:
                    if name in self.queues:
                        self.queues[name] = max(self.queues[name], stream_id(entries[-1][0]))

    def deliver(self, queue_name: str, job_id: str, event: Event) -> None:
        """Put an event in the inbox of every stream watching the job."""
        with self.lock:
            job = self.jobs.get((queue_name, job_id))
            subscriptions = list(job.subscriptions) if job else []
        for subscription in subscriptions:
            try:
                subscription.inbox.put_nowait(event)
            except queue.Full:
                subscription.overflowed = True

    def stop(self) -> None:
        """End every open stream within a second (the process is stopping)."""
        self.stopping.set()


# Every watcher of the process, for stop_all.
WATCHERS: weakref.WeakSet[Watcher] = weakref.WeakSet()


def stop_all() -> None:
    """End every open stream of the process within a second: it is stopping, and its
    clients should resume elsewhere with their Last-Event-ID rather than hold it up."""
    for watcher in list(WATCHERS):
        watcher.stop()


def log_data(index: int, line: bytes) -> str:
    """Return a log event's data: the line's index in the job's list, and the line."""
    text = line.decode("utf-8", "replace")
    return json.dumps({"index": index, "line": text}, ensure_ascii=False)


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


def replay(
    reader: JobReader, queue_name: str, job_id: str, after: StreamId, until: StreamId
) -> Iterator[Event]:
    """Yield the job's events in its queue's stream after `after`, up to `until`."""
    while after < until:
        entries = reader.events_after(queue_name, after, PAGE)
        if not entries:
            return
        for entry_id, fields in entries:
            after = stream_id(entry_id)
            if after > until:
                return
            if fields.get(b"jobId", b"").decode() == job_id:
                event = stream_event(entry_id, fields)
                if event is not None:
                    yield event


def lines(
    reader: JobReader, queue_name: str, job_id: str, start: int, stop: int
) -> Iterator[Event]:
    """Yield the job's log lines from index start up to stop."""
    while start < stop:
        page = reader.log_lines(queue_name, job_id, start, min(stop, start + PAGE) - 1)
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
) -> Iterator[bytes]:
    """Yield a job's events as text/event-stream: what it holds (or, resuming, what the
    client missed), then what happens to it, until it finishes or is removed."""
    subscription, watched_position, watched_logs = watcher.subscribe(
        queue_name, job_id, state.stream_top, state.log_count
    )
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        if resume is None:
            cursor = Cursor(state.stream_top, max(0, state.log_count - tail))
            if state.progress is not None:
                yield cursor.announce(Event("progress", state.stream_top, state.progress))
        elif resume[0] == START or START < state.stream_first <= resume[0]:
            # All the stream since the cursor is there: replay what the job missed.
            # Its end, if it came, is in the state read below, after its last lines.
            cursor = Cursor(*resume)
            for event in replay(reader, queue_name, job_id, resume[0], state.stream_top):
                if event.kind == "progress" and (sent := cursor.send(event)) is not None:
                    yield sent
            cursor.position = max(cursor.position, state.stream_top)
        else:
            # Trimmed past the cursor: what it missed is gone, but the progress is not.
            cursor = Cursor(state.stream_top, resume[1])
            if state.progress is not None:
                yield cursor.announce(Event("progress", state.stream_top, state.progress))
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
        yield from follow(reader, watcher, subscription, cursor, events)
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
) -> Iterator[bytes]:
    """Yield the events given, then those the watcher hands on, until the job finishes
    or is removed, the process stops, or the client falls too far behind."""
    beat = time.monotonic()
    while not watcher.stopping.is_set() and not subscription.overflowed:
        event = next(events, None)
        if event is None:
            try:
                event = subscription.inbox.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - beat >= HEARTBEAT_SECONDS:
                    beat = time.monotonic()
                    yield b": keep-alive\n\n"
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
