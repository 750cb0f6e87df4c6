"""One client's stream of a job's events, for GET /queues/<queue>/jobs/<job_id>/events.

event_stream() turns what a job holds and what the event reader hands on into the
text/event-stream a browser's EventSource reads. Each event's id is a cursor, the
stream position and the number of log lines seen ("1732870000000-0/12"): a client that
reconnects with it as Last-Event-ID gets exactly what it missed (README: "Resuming").
"""

from __future__ import annotations

import logging
import queue
import re
import select
import socket
import time
from collections.abc import Iterator
from typing import Protocol

import redis
from gevent import monkey

from .event_reader import PAGE, Event, EventReader, Subscription, final_data, log_data, stream_event
from .js_json import compact
from .layout import FINAL, START, JobState, StreamId, TooManyBytes, stream_id

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0  # a comment this often keeps proxies from closing idle streams
RETRY_MS = 2000  # how soon browsers reconnect
# The most entries of a queue's event stream that resuming one stream reads, and the
# most bytes of the job's own entries it takes from them: a cursor further behind gets
# the job's current progress instead, as a trimmed stream does.
REPLAY_ENTRIES = 1000
REPLAY_BYTES = 1024 * 1024
CURSOR = re.compile(r"(\d{1,20})-(\d{1,20})/(\d{1,16})")
# Redis stream ids are two unsigned 64-bit numbers; a job's log count is a list length,
# below 2^53 as BullMQ's clients read it.
LARGEST_ID_PART = 2**64 - 1
LARGEST_LOG_COUNT = 2**53 - 1


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


class JobSource(Protocol):
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


class Cursor:
    """Where one stream is: the event stream position it has covered, and the number of
    log lines it has sent; it formats events and drops those already sent."""

    def __init__(self, position: StreamId, log_next: int) -> None:
        self.position = position
        self.log_next = log_next

    def __str__(self) -> str:
        return cursor_text(self.position, self.log_next)

    def frame_if_new(self, event: Event) -> bytes | None:
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
        return self.frame(event)

    def frame(self, event: Event) -> bytes:
        """Return an event as text/event-stream, with this cursor as its id; a line
        break in its data starts another data field."""
        data = "".join(f"data: {part}\n" for part in event.data.split("\n"))
        return f"id: {self}\nevent: {event.kind}\n{data}\n".encode()


def comment(line: str) -> bytes:
    """Return a comment of text/event-stream: a client's EventSource passes it over."""
    return f": {line}\n\n".encode()


class ReplayTooLong(Exception):
    """The events to replay lie further than REPLAY_ENTRIES entries of the stream, or
    the job's own hold more than REPLAY_BYTES."""


def replay(
    jobs: JobSource, queue_name: str, job_id: str, after: StreamId, until: StreamId
) -> Iterator[Event]:
    """Yield the job's events in its queue's stream after `after`, up to `until`; raise
    ReplayTooLong after REPLAY_ENTRIES entries short of `until`, or REPLAY_BYTES of the
    job's own. Redis passes the other jobs' entries over: only the job's are sent."""
    entries_left, bytes_left = REPLAY_ENTRIES, REPLAY_BYTES
    while after < until:
        if entries_left <= 0:
            raise ReplayTooLong
        try:
            last, entries = jobs.job_events_after(
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


def lines(jobs: JobSource, queue_name: str, job_id: str, start: int, stop: int) -> Iterator[Event]:
    """Yield the job's log lines from index start up to stop, a page at a time."""
    while start < stop:
        page = jobs.log_page(queue_name, job_id, start, min(stop - start, PAGE))
        if not page:
            return
        for index, line in enumerate(page, start):
            yield Event("log", index, log_data(index, line))
        start += len(page)


def event_stream(
    jobs: JobSource,
    reader: EventReader,
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
    subscription, watched_position, watched_logs = reader.subscribe(
        queue_name, job_id, state.stream_top, state.log_count
    )
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        current = Event("progress", state.stream_top, state.progress or "")
        if resume is None:
            cursor = Cursor(state.stream_top, max(0, state.log_count - tail))
            if state.progress is not None:
                yield cursor.frame(current)
        elif resume[0] <= state.stream_top and (
            resume[0] == START or START < state.stream_first <= resume[0]
        ):
            # All the stream since the cursor is there: replay what the job missed.
            # Its end, if it came, is in the state read below, after its last lines.
            cursor = Cursor(resume[0], min(resume[1], state.log_count))
            try:
                for event in replay(jobs, queue_name, job_id, resume[0], state.stream_top):
                    if (
                        event.kind == "progress"
                        and (sent := cursor.frame_if_new(event)) is not None
                    ):
                        yield sent
            except ReplayTooLong:
                yield comment("too much happened since Last-Event-ID: the current progress")
                if state.progress is not None:
                    cursor.position = state.stream_top
                    yield cursor.frame(current)
            cursor.position = max(cursor.position, state.stream_top)
        else:
            # Trimmed past the cursor (or a cursor of a stream since emptied): what it
            # missed is gone, but the progress is not.
            cursor = Cursor(state.stream_top, min(resume[1], state.log_count))
            if state.progress is not None:
                yield cursor.frame(current)
        # The lines since the cursor, up to where the event reader starts.
        for event in lines(jobs, queue_name, job_id, cursor.log_next, watched_logs):
            if (sent := cursor.frame_if_new(event)) is not None:
                yield sent
        if state.finished is not None:
            final = Event(
                state.finished, cursor.position, final_data(state.finished, state.outcome)
            )
            yield cursor.frame(final)
            return
        # Events the event reader handed on before this stream subscribed.
        events = replay(jobs, queue_name, job_id, cursor.position, watched_position)
        yield from follow(jobs, reader, subscription, cursor, events, until, client)
    except LookupError:
        # Removed while the stream caught up.
        yield cursor.frame(Event("removed", cursor.position, compact({"jobId": job_id})))
    except ReplayTooLong:
        pass  # the event reader was far ahead: the client resumes, from its cursor
    except redis.exceptions.RedisError as error:
        # The client reconnects with its cursor and misses nothing.
        log.warning(
            "Redis unavailable to the events of job %r in queue %r: %s", job_id, queue_name, error
        )
    finally:
        reader.unsubscribe(subscription)


def follow(
    jobs: JobSource,
    reader: EventReader,
    subscription: Subscription,
    cursor: Cursor,
    events: Iterator[Event],
    until: float | None,
    client: socket.socket | None = None,
) -> Iterator[bytes]:
    """Yield the events given, then those the event reader hands on, until the job finishes
    or is removed, the process stops, the client falls too far behind or hangs up, or
    `until`. A client that hangs up is seen within a second, not at the next write: its
    place under the stream limits is free for its next stream at once."""
    # Under the service's gunicorn worker (gunicorn_worker.Client), the event reader
    # sends what comes while this waits with nothing left to send.
    direct = (
        DirectWrites(cursor, client) if client is not None and hasattr(client, "send_now") else None
    )
    beat = time.monotonic()
    while not reader.stopping.is_set() and subscription.ended is None:
        event = next(events, None)
        if event is None:
            now = time.monotonic()
            if until is not None and now >= until:
                yield comment("the watch token expired: open the stream with a new one")
                return
            subscription.writer = direct
            try:
                event = subscription.get(timeout=min(1.0, until - now) if until else 1.0)
            except queue.Empty:
                event = None
            finally:
                subscription.writer = None
            if direct is not None:
                direct.send_backlog()
            if event is None:
                if client is not None and hung_up(client):
                    return
                if time.monotonic() - beat >= HEARTBEAT_SECONDS:
                    beat = time.monotonic()
                    yield comment("keep-alive")
                continue
        if event.kind == "removed":
            data = compact({"jobId": subscription.job_id})
            yield cursor.frame(Event("removed", cursor.position, data))
            return
        if event.kind not in FINAL:
            if (sent := cursor.frame_if_new(event)) is not None:
                yield sent
            continue
        try:
            state: JobState | None = jobs.job_state(subscription.queue_name, subscription.job_id)
        except LookupError:
            state = None  # removed as it finished (BullMQ's removeOnComplete, removeOnFail)
        if state is not None and state.finished != event.kind:
            # A failed attempt that BullMQ retries leaves the job unfinished: not the end.
            cursor.frame_if_new(event)
            continue
        if state is not None:
            # The lines the job wrote before it finished, which the event reader may not
            # have read yet, then the end.
            for line in lines(jobs, subscription.queue_name, subscription.job_id,
                              cursor.log_next, state.log_count):  # fmt: skip
                if (sent := cursor.frame_if_new(line)) is not None:
                    yield sent
        if (sent := cursor.frame_if_new(event)) is not None:
            yield sent
        return


class StreamSocket(Protocol):
    """A stream's socket, as the event reader sends to it (gunicorn_worker.Client)."""

    def send_now(self, data: bytes) -> bytes:
        """Send what the socket's buffer takes at once; return the rest, framed."""
        ...

    def sendall(self, data: bytes) -> None: ...


class DirectWrites:
    """Sends a stream's events from the event reader as they come, while the stream's
    own greenlet waits with nothing left to send: an event then costs the worker a frame
    and a send, not a hand-over to the greenlet and a trip up through the WSGI server
    (bench/results.md). Both run on one thread (gevent's greenlets), and the greenlet
    takes its writer back before it sends anything itself.

    What the socket's buffer cannot take at once is the backlog, which the greenlet
    sends first when it wakes, within the send deadline; until then the reader queues
    events to it as before. An event that ends the stream is the greenlet's to send.
    """

    def __init__(self, cursor: Cursor, client: StreamSocket) -> None:
        self.cursor = cursor
        self.client = client
        self.backlog = b""

    def __call__(self, event: Event) -> bool:
        """Send an event, unless the stream's greenlet must; return whether it went
        whole. One that did not is queued, and wakes the greenlet, which sends the
        backlog and then finds the event already sent."""
        if event.kind in FINAL or event.kind == "removed":
            return False
        frame = self.cursor.frame_if_new(event)
        if frame is not None:
            self.backlog = self.client.send_now(frame)
        return not self.backlog

    def send_backlog(self) -> None:
        """Send what the socket did not take, within the send deadline: the stream's
        greenlet does, before it sends anything itself."""
        if self.backlog:
            backlog, self.backlog = self.backlog, b""
            self.client.sendall(backlog)


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
