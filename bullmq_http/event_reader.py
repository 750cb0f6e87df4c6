"""The event reader: one per process, it reads every watched job's events and new log
lines and hands each to the streams that watch that job (event_stream.py).

It reads BullMQ's `<prefix>:<queue>:events` stream, where BullMQ and this service note
progress, completion and failure, and each watched job's `:logs` list. However many
streams are open, it holds two Redis connections (one per node of a cluster) besides
the process's own:

- on one server (or Sentinel's master), one blocking XREAD over all the watched
  queues' streams, woken by the next event, then at most every POLL_SECONDS one
  pipeline of each watched job's new log lines; and a subscription to the channel of
  each watched job's lines, named as its logs key, where the service publishes each
  line it stores (store.py's ADD_LOG), so that such a line reaches the streams at once.
  Lines that BullMQ's own `job.log()` writes, which it publishes nowhere, come by the
  poll;
- on a cluster, whose queues live on different nodes, one pipeline per node every
  POLL_SECONDS for both.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.client import PubSub
from redis.cluster import RedisCluster
from redis.typing import KeyT, StreamIdT

from .js_json import compact
from .layout import FINAL, START, StreamId, stream_id, text
from .metrics import READER_ERRORS

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # the longest a new log line waits to be seen
LISTEN_SECONDS = 0.05  # the longest a new stream's job waits to be listened to
# How far a stream may fall behind before it is ended (the client resumes from its
# cursor): in events, and in bytes of their data, so that a reader that stops reading
# while large progress values pour in holds at most this much of the worker's memory.
INBOX = 1000
INBOX_BYTES = 1024 * 1024
PAGE = 100  # entries of an event stream, or log lines, read at once


@dataclass(frozen=True)
class Event:
    """What happened to a job: kind is progress, log, active (a worker took it: an
    attempt starts), completed, failed or removed; position its stream id, or for a log
    line its index in the job's list."""

    kind: str
    position: StreamId | int
    data: str


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
    if kind == "active":
        return Event("active", position, "{}")
    return None


def final_data(kind: str, outcome: str | None) -> str:
    """Return a completed or failed event's data. A return value that cannot be read
    as JSON (not JSON, or nested deeper than Python reads) is carried as the text it
    was stored as: whatever a job returned, its stream ends as it should."""
    if kind == "completed":
        try:
            return compact({"returnvalue": json.loads(outcome or "null")})
        except (ValueError, RecursionError) as error:
            log.warning("a return value carried as text, not read as JSON: %s", error)
            return compact({"returnvalue": outcome})
    return compact({"failedReason": outcome or ""})


# Why a stream ends before its job does; the client reconnects and resumes.
BEHIND = "the client fell too far behind"
UNREADABLE = "a key of the job's queue is not in BullMQ's layout"


@dataclass(eq=False)
class Subscription:
    """One open stream's place in the event reader: the events handed on that the stream has
    not sent yet, at most INBOX of them and INBOX_BYTES of their data."""

    queue_name: str
    job_id: str
    inbox: queue.Queue[Event] = field(default_factory=lambda: queue.Queue(INBOX))
    inbox_bytes: int = 0
    counting: threading.Lock = field(default_factory=threading.Lock)
    ended: str | None = None  # BEHIND or UNREADABLE: the event reader no longer serves it
    # While the stream waits with nothing left to send, what may send an event for it
    # at once, from the event reader (event_stream.DirectWrites); True: it went whole.
    writer: Callable[[Event], bool] | None = None

    def put(self, event: Event) -> None:
        """Hand the stream an event, or end it when it is too far behind."""
        with self.counting:
            if self.writer is not None and self.inbox.empty() and self.writer(event):
                return
            if self.inbox_bytes + len(event.data) > INBOX_BYTES or self.inbox.full():
                self.ended = BEHIND
                return
            self.inbox_bytes += len(event.data)
            self.inbox.put_nowait(event)  # only a putter holding `counting`: there is room

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


# How long the event reader waits after an error it did not expect before it tries again,
# doubling each time it fails again, up to the last.
RESTART_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0)


class EventReader:
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
        self.jobs_changed = threading.Event()  # a job to listen to, or to stop listening to
        self.thread: threading.Thread | None = None
        self.listener: threading.Thread | None = None
        self.on_cluster = False  # found by the listener, which then stops for good
        self.failure: str | None = None  # the last turn's unexpected error, if it failed
        READERS.add(self)

    def subscribe(
        self, queue_name: str, job_id: str, stream_top: StreamId, log_count: int
    ) -> tuple[Subscription, StreamId, int]:
        """Watch a job whose stream and logs the caller has read up to stream_top and
        log_count; return the subscription and the event reader's own positions, which may
        be further on: what lies between, the caller reads itself."""
        subscription = Subscription(queue_name, job_id)
        with self.lock:
            position = self.queues.setdefault(queue_name, stream_top)
            if (queue_name, job_id) not in self.jobs:
                self.jobs[queue_name, job_id] = WatchedJob(set(), log_count)
                self.jobs_changed.set()
            job = self.jobs[queue_name, job_id]
            job.subscriptions.add(subscription)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.run, name="event-reader", daemon=True)
                self.thread.start()
            if not self.on_cluster and (self.listener is None or not self.listener.is_alive()):
                self.listener = threading.Thread(
                    target=self.listen, name="line-listener", daemon=True
                )
                self.listener.start()
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
                self.jobs_changed.set()
                if not any(queue_name == subscription.queue_name for queue_name, _ in self.jobs):
                    # Gone already where the event reader found the queue unreadable.
                    self.queues.pop(subscription.queue_name, None)

    def trouble(self) -> str | None:
        """Return why the event reader is not doing its work, or None while it is (or while
        no stream has needed it yet)."""
        if self.thread is not None and not self.thread.is_alive() and not self.stopping.is_set():
            return "the event reader has stopped"
        if self.failure is not None:
            return f"the event reader is failing: {self.failure}"
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
                log.warning("Redis unavailable to the event reader, retrying: %s", error)
                self.disconnect(client)
                client = None
                self.stopping.wait(1.0)
            except Exception as error:
                # Not an outage: a fault of this code or of what Redis answered. The
                # loop starts again, a little later each time it fails again.
                pause = RESTART_SECONDS[min(failures, len(RESTART_SECONDS) - 1)]
                failures += 1
                log.exception("the event reader failed; it starts again in %g s", pause)
                READER_ERRORS.inc()
                self.failure = f"{type(error).__name__}: {error}"  # last: /readyz tells
                self.disconnect(client)
                client = None
                self.stopping.wait(pause)
        self.disconnect(client)

    @staticmethod
    def disconnect(client: redis.Redis | RedisCluster | None) -> None:
        """Close the event reader's connection, if it has one."""
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
            self.deliver_lines(name, job_id, start, lines)

    def deliver_lines(self, queue_name: str, job_id: str, start: int, lines: list[bytes]) -> None:
        """Hand on a job's lines read from index `start`, in order, unless lines were
        handed on since they were read (by the poll, or as published): each line once."""
        with self.lock:
            job = self.jobs.get((queue_name, job_id))
            if job is None or job.log_next != start:
                return
            job.log_next = start + len(lines)
            for index, line in enumerate(lines, start):
                event = Event("log", index, log_data(index, line))
                for subscription in job.subscriptions:
                    subscription.put(event)

    def listen(self) -> None:
        """Hand on each line published for a watched job as it comes (one server or
        Sentinel's master only), until stopped; outlive Redis outages. A line that is
        not the next one a job's streams expect (a line of BullMQ's own came between)
        waits for the poll, as do all lines while this cannot listen."""
        client: redis.Redis | RedisCluster | None = None
        pubsub: PubSub | None = None
        channels: dict[bytes, tuple[str, str]] = {}  # channel -> (queue, job id)
        while not self.stopping.is_set():
            try:
                if client is None:
                    client = self.connect()
                    if isinstance(client, RedisCluster):
                        self.on_cluster = True  # its nodes would all relay every line
                        break
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    channels = {}
                    self.jobs_changed.set()
                assert pubsub is not None
                if self.jobs_changed.is_set():
                    self.jobs_changed.clear()
                    channels = self.listen_to(pubsub, channels)
                if not channels:
                    self.jobs_changed.wait(POLL_SECONDS)
                    continue
                message = pubsub.get_message(timeout=LISTEN_SECONDS)
                while message is not None:
                    index, _, line = message["data"].partition(b" ")
                    # Anyone may publish: what is not a line's index is passed over.
                    if message["channel"] in channels and index.isdigit():
                        self.deliver_lines(*channels[message["channel"]], int(index), [line])
                    message = pubsub.get_message(timeout=0)
            except redis.exceptions.RedisError as error:
                # Lost, or refused (an ACL user without the channels): the poll goes on.
                log.warning("the event reader cannot listen for lines, retrying: %s", error)
                self.disconnect(client)
                client = None
                refused = isinstance(error, redis.exceptions.ResponseError)
                self.stopping.wait(RESTART_SECONDS[-1] if refused else 1.0)
        self.disconnect(client)

    def listen_to(
        self, pubsub: PubSub, channels: dict[bytes, tuple[str, str]]
    ) -> dict[bytes, tuple[str, str]]:
        """Listen to the channel of every watched job, and to no other; return them."""
        with self.lock:
            wanted = {self.key(name, job_id, "logs").encode(): (name, job_id)
                      for name, job_id in self.jobs}  # fmt: skip
        if added := wanted.keys() - channels.keys():
            pubsub.subscribe(*added)
        if gone := channels.keys() - wanted.keys():
            pubsub.unsubscribe(*gone)
        return wanted

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
        """Wait up to `timeout` seconds for a stopped event reader's thread to end."""
        for thread in (self.thread, self.listener):
            if thread is not None:
                thread.join(timeout)


# Every event reader of the process, for stop_all.
READERS: weakref.WeakSet[EventReader] = weakref.WeakSet()


def stop_all() -> None:
    """End every open stream of the process within a second: it is stopping, and its
    clients should resume elsewhere with their Last-Event-ID rather than hold it up."""
    for reader in list(READERS):
        reader.stop()


def log_data(index: int, line: bytes) -> str:
    """Return a log event's data: the line's index in the job's list, and the line."""
    return compact({"index": index, "line": text(line)})
