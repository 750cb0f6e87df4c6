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
- Turns between keep-alive connections: before waiting for a connection's next request,
  its greenlet lets the others run. A client that sends its next request as soon as it
  reads a response would otherwise find it already there, and gevent only switches when
  a read would block: one connection could be served again and again while the others
  wait for hundreds of milliseconds (bench/results.md: p99 at 32 connections).
- Each response in one write: gunicorn sends a response's head and its body apart, a
  send more per response, and on the client's side a wake-up more (README, Performance).
- gunicorn's own answers to malformed requests in plain text, like the service's.
- On SIGTERM, open streams of events end within a second instead of holding the
  graceful stop.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import gevent
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

import streams

# Past this share of worker_connections, a new connection closes the longest-idle one.
CROWDED = 0.9
# A response's body up to this size goes out in one write with its head; a larger one is
# sent after it rather than copied onto it.
ONE_WRITE_BYTES = 64 * 1024


def write_plain_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """Answer a request gunicorn could not parse, in plain text."""
    body = (message or reason).encode("utf-8", "backslashreplace")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class Client:
    """A client's socket as the worker's HTTP parser reads it, with the deadlines, and
    as its responses are written, each in one write.

    Everything else passes through to the socket.
    """

    def __init__(self, sock: socket.socket, worker: DeadlineWorker) -> None:
        self.sock = sock
        self.worker = worker
        self.deadline: float | None = None  # while a request arrives: when it must have
        self.in_app = False  # the request's headers arrived and the app has it
        self.linger = False  # the client may still be sending when the connection closes
        self.hold_head = False  # a response starts: its head waits for its body
        self.head: bytes | None = None  # the head held

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

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
        idle[self] = None
        try:
            self.sock.settimeout(self.worker.cfg.keepalive or self.worker.request_timeout)
            data = self.sock.recv(size)
        except TimeoutError:
            return b""  # idle too long: close
        finally:
            idle.pop(self, None)
            self.sock.settimeout(None)
        self.deadline = time.monotonic() + self.worker.request_timeout
        return data

    def sendall(self, data: bytes) -> None:
        """Send bytes of a response. Its first are its head, which gunicorn writes
        alone: hold it, and send it with the body's first bytes. (A streamed response's
        head so waits for its first chunk with bytes in it: the streams of events send
        one at once.)"""
        if self.hold_head:
            self.hold_head = False
            self.head = data
            return
        if self.head is not None and len(data) <= ONE_WRITE_BYTES:
            data, self.head = self.head + data, None
        else:
            self.send_head()  # before a large body, on its own
        self.sock.sendall(data)

    def send_head(self) -> None:
        """Send a response's head still held: its response has no body (HEAD, 204)."""
        self.hold_head = False
        head, self.head = self.head, None
        if head is not None:
            self.sock.sendall(head)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        self.send_head()
        return self.sock.sendfile(file, offset, count)

    def close(self) -> None:
        """Close the connection; after an answer to a request that did not arrive whole,
        drain what the client still sends for a moment first: a socket closed on unread
        input sends a reset, and the client may lose the answer before reading it."""
        self.head = None  # a response that failed mid-way: its head alone would mislead
        if self.linger:
            util.close_graceful(self.sock)
        else:
            self.sock.close()

    def close_idle(self) -> None:
        """Close this idle connection: its wait for a request ends at once."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ClosingReader:
    """A request body's reader that, when reading fails, ends the connection after the
    response: where the next request would start is then unknown."""

    def __init__(self, reader: Any, request: Any, client: Client) -> None:
        self.reader = reader
        self.request = request
        self.client = client

    def read(self, size: int) -> bytes:
        try:
            return self.reader.read(size)
        except Exception:
            self.request.must_close = True  # the response says Connection: close
            self.client.linger = True
            raise


class DeadlineWorker(GeventWorker):
    """gunicorn's gevent worker, with a deadline on each request and on idle clients."""

    request_timeout = 10.0  # seconds; gunicorn.conf.py sets it from REQUEST_TIMEOUT

    def init_process(self) -> None:
        self.idle: dict[Client, None] = {}  # idle connections, the longest idle first
        self.open = 0
        util.write_error = write_plain_error
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Streams of events would hold a graceful stop for its whole timeout: end them
        # now, and their clients resume elsewhere with Last-Event-ID.
        super().handle_exit(sig, frame)
        streams.stop_all()

    def timeout_ctx(self) -> contextlib.AbstractContextManager[None]:
        # Client.first_bytes bounds the wait for each request to start.
        return contextlib.nullcontext()

    def handle(self, listener: socket.socket, client: socket.socket, addr: Any) -> None:
        self.open += 1
        try:
            if self.open > CROWDED * self.worker_connections and self.idle:
                longest_idle = next(iter(self.idle))
                del self.idle[longest_idle]
                longest_idle.close_idle()
            super().handle(listener, Client(client, self), addr)
        finally:
            self.open -= 1

    def handle_request(self, listener_name: Any, req: Any, sock: Client, addr: Any) -> Any:
        sock.in_app = True
        sock.hold_head = True
        if req.body is not None:
            req.body.reader = ClosingReader(req.body.reader, req, sock)
        try:
            answered = super().handle_request(listener_name, req, sock, addr)
            sock.send_head()
            return answered
        except StopIteration:  # answered, and the connection closes after it
            sock.send_head()
            raise
        finally:
            sock.in_app = False
            sock.deadline = None
            sock.hold_head = False  # a head never sent belongs to a response that failed
            sock.head = None
