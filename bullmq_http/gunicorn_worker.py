"""The gunicorn worker the service runs in: gevent's, with a deadline on every client.

gunicorn's gevent worker waits as long as a client likes for a request's headers and
body, and keeps idle keep-alive connections until they time out, so slow, stalled or
merely idle clients can hold every connection a worker has. This one adds:

- A deadline for each request to arrive whole, headers and body, counted from its first
  byte (REQUEST_TIMEOUT). Past it, a client still sending headers is answered 408 and
  the connection closes; a body still arriving makes the app's read of it raise
  TimeoutError, which the app answers 408, and gunicorn closes the connection after.
- An idle connection, before its first request or between two, is closed after
  `keepalive` seconds; when a worker holds nearly `worker_connections`, each new
  connection closes the one idle the longest, so idle clients never keep a new one out.
  A connection whose request has arrived is not idle, whether or not its greenlet has
  run yet: it is never closed this way.
- A deadline for each write of a response (SEND_TIMEOUT): a client that stops reading
  has its connection closed, and the memory it held freed, instead of holding a
  greenlet (a stream's, say) for as long as it likes. A stream of events is also sent
  through a small socket buffer, so that what a stalled reader holds is small too.
- Turns between keep-alive connections: before waiting for a connection's next request,
  its greenlet lets the others run. A client that sends its next request as soon as it
  reads a response would otherwise find it already there, and gevent only switches when
  a read would block: one connection could be served again and again while the others
  wait for hundreds of milliseconds (bench/results.md: p99 at 32 connections).
- gunicorn's own answers to malformed requests in plain text, like the service's.
- On SIGTERM, connections idle for a second close (the others once they have been, or
  once their request is answered), and open streams of events end within a second
  (those whose clients stopped reading included) instead of holding the graceful stop.

For every worker class, BodyReader hands the app a body gunicorn cannot parse (a
malformed chunk) as a ValueError, and closes the connection after the answer.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import socket
import termios
import time
from typing import Any

import gevent
from gunicorn import util
from gunicorn.http.errors import ParseException
from gunicorn.workers.ggevent import GeventWorker

# Past this share of worker_connections, a new connection closes the longest-idle one,
# if it has been idle this long: a burst of new connections must not close its own.
CROWDED = 0.9
IDLE_ENOUGH_SECONDS = 1.0
# The socket send buffer of a stream of events (Linux doubles it): events are small, and
# a client that stops reading holds this much of the kernel's memory, not megabytes.
STREAM_SEND_BUFFER = 32 * 1024
# How long streams of events have to end by themselves after SIGTERM before their
# connections are closed under them.
STREAMS_STOP_SECONDS = 1.0
# How a stream of events names itself in its response's head.
EVENT_STREAM = b"content-type: text/event-stream"
CHUNKED = b"transfer-encoding: chunked"


def write_plain_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """Answer a request gunicorn could not parse, in plain text."""
    body = (message or reason).encode("utf-8", "backslashreplace")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class Client:
    """A client's socket as the worker's HTTP parser reads it and its responses are
    written, with the deadlines; everything else passes through to the socket.

    Its state is its own: the worker tells it where a request stands (request_arrived,
    request_done), and a failed body read tells it through body_failed.
    """

    def __init__(self, sock: socket.socket, worker: DeadlineWorker) -> None:
        self.sock = sock
        self.worker = worker
        self.deadline: float | None = None  # while a request arrives: when it must have
        self.in_app = False  # the request's headers arrived and the app has it
        self.first_write = False  # the next write is a response's head
        self.linger = False  # the client may still be sending when the connection closes
        self.streaming = False  # the response is a stream of events
        self.chunked = False  # ... sent in chunks (HTTP/1.1), so send_now frames its bytes
        self.shut_here = False  # the worker ended the connection under its greenlet

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def request_arrived(self) -> None:
        """The request's headers are in, and the app has it."""
        self.in_app = True
        self.first_write = True

    def request_done(self) -> None:
        """The request is answered, or failed: the next one starts afresh."""
        self.in_app = False
        self.first_write = False
        self.deadline = None
        if self.streaming:
            self.streaming = False
            self.worker.streams.discard(self)

    def body_failed(self) -> None:
        """Reading the body failed: where the next request would start is unknown, and
        the client may still be sending as the connection closes."""
        self.linger = True

    def recv(self, size: int) -> bytes:
        """Return the next bytes, or b"" (closing the connection) when they are late."""
        if self.deadline is None:
            return self.first_bytes(size)
        try:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            return self.sock.recv(size)
        except TimeoutError:
            self.linger = True
            if self.in_app:
                raise TimeoutError("the request did not arrive within REQUEST_TIMEOUT") from None
            # Headers still arriving: answer, then end the connection as if it closed.
            with contextlib.suppress(OSError):
                write_plain_error(
                    self.sock,
                    408,
                    "Request Timeout",
                    f"the request did not arrive within {self.worker.request_timeout:g} "
                    "seconds (REQUEST_TIMEOUT)",
                )
            return b""
        finally:
            self.sock.settimeout(None)

    def first_bytes(self, size: int) -> bytes:
        """Let the other connections take their turn, then wait, idle, for the first
        bytes of a request; start its deadline."""
        gevent.sleep(0)
        idle = self.worker.idle
        idle[self] = time.monotonic()
        try:
            self.sock.settimeout(self.worker.cfg.keepalive or self.worker.request_timeout)
            data = self.sock.recv(size)
        except TimeoutError:
            return b""  # idle too long: close
        except OSError:
            if self.shut_here:
                return b""  # closed to make room, or for a stop: as if the client left
            raise
        finally:
            idle.pop(self, None)
            self.sock.settimeout(None)
        self.deadline = time.monotonic() + self.worker.request_timeout
        return data

    def sendall(self, data: bytes) -> None:
        """Send bytes of a response, within the send deadline: a client that reads none
        of them for SEND_TIMEOUT seconds has its connection closed."""
        if self.first_write:
            self.first_write = False
            head = data.partition(b"\r\n\r\n")[0].lower()
            if EVENT_STREAM in head:
                self.start_stream(chunked=CHUNKED in head)
        try:
            try:
                # Most writes fit the socket's buffer whole: one send that never waits
                # (gevent's timeout 0.0); the deadline's timer only for what did not fit.
                sent = self.sock.send(data, 0, 0.0)  # type: ignore[call-arg]  # gevent's
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                self.sock.settimeout(self.worker.send_timeout)
                try:
                    self.sock.sendall(memoryview(data)[sent:])
                finally:
                    self.sock.settimeout(None)
        except TimeoutError:
            self.worker.log.info(
                "closed a connection whose client read nothing for %g s (SEND_TIMEOUT)",
                self.worker.send_timeout,
            )
            # As a client gone away: gunicorn ends the connection without a traceback.
            raise BrokenPipeError(errno.EPIPE, "the client stopped reading") from None
        except OSError:
            if self.shut_here:  # a stream still open as the worker stops
                raise BrokenPipeError(errno.EPIPE, "the worker is stopping") from None
            raise

    def send_now(self, data: bytes) -> bytes:
        """Send the bytes of a stream's event from whichever greenlet has them (the
        event reader's), as far as the socket's buffer takes them without waiting, and
        framed as gunicorn frames the response's bytes; return what it did not take, for
        the stream's own greenlet to send with sendall, within the deadline. A socket
        that fails takes nothing here: sendall finds out why."""
        if self.chunked:
            data = b"%X\r\n%s\r\n" % (len(data), data)
        try:
            sent = self.sock.send(data, 0, 0.0)  # type: ignore[call-arg]  # gevent's
        except OSError:  # BlockingIOError among them
            sent = 0
        return data[sent:]

    def start_stream(self, chunked: bool) -> None:
        """Send the response, a stream of events, through a small buffer, and let a
        stopping worker end it."""
        self.streaming = True
        self.chunked = chunked
        self.worker.streams.add(self)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)

    def close(self) -> None:
        """Close the connection; after an answer to a request that did not arrive whole,
        drain what the client still sends for a moment first: a socket closed on unread
        input sends a reset, and the client may lose the answer before reading it."""
        if self.linger:
            util.close_graceful(self.sock)
        else:
            self.sock.close()

    def close_idle(self) -> bool:
        """Close this connection, if it is still idle (its wait for a request ends at
        once); return whether it was. A connection whose next request has arrived, but
        whose greenlet has not run yet, is not idle."""
        if self.pending() > 0:
            return False
        self.shut()
        return True

    def pending(self) -> int:
        """Return how many bytes have arrived that nothing read yet."""
        count = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, count)
        except OSError:
            return 0  # closed already
        return count[0]

    def shut(self) -> None:
        """End the connection under whatever waits on it, which then finds it closed."""
        self.shut_here = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class BodyReader:
    """A request body's reader for the app: a body gunicorn cannot parse (a malformed
    chunk) is a ValueError saying why; and when reading fails, the connection ends after
    the answer, as where the next request would start is unknown."""

    def __init__(self, reader: Any, request: Any, client: Client | None) -> None:
        self.reader = reader
        self.request = request
        self.client = client

    def read(self, size: int) -> bytes:
        try:
            return self.reader.read(size)
        except ParseException as error:
            self.failed()
            raise ValueError(f"the chunked body is malformed ({error})") from None
        except Exception:
            self.failed()
            raise

    def failed(self) -> None:
        self.request.must_close = True  # the response says Connection: close
        if self.client is not None:
            self.client.body_failed()


def read_body_safely(request: Any, client: Client | None = None) -> None:
    """Have the app read a request's body through a BodyReader (once)."""
    if request.body is not None and not isinstance(request.body.reader, BodyReader):
        request.body.reader = BodyReader(request.body.reader, request, client)


class DeadlineWorker(GeventWorker):
    """gunicorn's gevent worker, with a deadline on each request, each write and idle
    clients."""

    request_timeout = 10.0  # seconds; gunicorn.conf.py sets it from REQUEST_TIMEOUT
    send_timeout = 10.0  # seconds; gunicorn.conf.py sets it from SEND_TIMEOUT

    @staticmethod
    def end_streams() -> None:
        """End the app's open streams of events within a second; gunicorn.conf.py sets
        it to the app's own (this worker knows nothing of the app)."""

    def init_process(self) -> None:
        # Idle connections, the longest idle first, and since when.
        self.idle: dict[Client, float] = {}
        self.streams: set[Client] = set()  # connections sending a stream of events
        self.open = 0
        self.room_later: gevent.Greenlet | None = None  # make_room, when it can
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Idle connections and streams of events would hold a graceful stop for its
        # whole timeout: close the idle ones, and end the streams now; their clients
        # resume elsewhere with Last-Event-ID.
        super().handle_exit(sig, frame)
        self.close_idle_for_stop()
        self.end_streams()
        gevent.spawn_later(STREAMS_STOP_SECONDS, self.cut_streams)

    def close_idle_for_stop(self) -> None:
        """Close the connections idle for a second or more; look again a second later
        for the others, while any are left: a request may be on its way on a fresh one
        (a worker goes on accepting for up to a second after it is told to stop)."""
        enough = time.monotonic() - IDLE_ENOUGH_SECONDS
        for client, since in list(self.idle.items()):
            if since <= enough:
                client.close_idle()
        if self.idle:
            gevent.spawn_later(IDLE_ENOUGH_SECONDS, self.close_idle_for_stop)

    def cut_streams(self) -> None:
        """Close the connections of the streams still open: their clients stopped
        reading, and their writes would otherwise wait for SEND_TIMEOUT."""
        for client in list(self.streams):
            client.shut()

    def timeout_ctx(self) -> contextlib.AbstractContextManager[None]:
        # Client.first_bytes bounds the wait for each request to start.
        return contextlib.nullcontext()

    def handle(self, listener: socket.socket, client: socket.socket, addr: Any) -> None:
        self.open += 1
        try:
            self.make_room()
            super().handle(listener, Client(client, self), addr)
        finally:
            self.open -= 1

    def make_room(self) -> None:
        """When the worker is nearly full, close the connection idle the longest, passing
        over any whose request has just arrived; if none has been idle long enough yet,
        look again when the longest will have been."""
        if self.open <= CROWDED * self.worker_connections:
            return
        enough = time.monotonic() - IDLE_ENOUGH_SECONDS
        for client, since in list(self.idle.items()):
            if since > enough:
                if self.room_later is None:
                    self.room_later = gevent.spawn_later(since - enough, self.make_room_later)
                return
            del self.idle[client]
            if client.close_idle():
                return

    def make_room_later(self) -> None:
        self.room_later = None
        self.make_room()

    def handle_request(self, listener_name: Any, req: Any, sock: Client, addr: Any) -> Any:
        sock.request_arrived()
        read_body_safely(req, sock)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            sock.request_done()
