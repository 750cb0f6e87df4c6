"""The access log: one line per request, escaped so that a line is always one line, as
plain text or JSON (LOG_FORMAT=json); and the formatters of plain and JSON lines.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from .js_json import compact
from .metrics import UNMATCHED, count_request

access_log = logging.getLogger("bullmq_http.access")


@dataclass
class RequestRecord:
    """What the app learns of a request that its access line and its metrics say once
    it is answered: AccessLog makes one per request, in the environ under RECORD."""

    request_id: str
    credential: str = "-"  # the API token's name, "watch-token", or "-" for none
    route: str = UNMATCHED  # the matched route's template, for the metrics


RECORD = "bullmq_http.request"


# A request id from the caller is kept when it is a plain token, so it can be logged
# and echoed safely; anything else is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

# What a client sends is logged with spaces, control characters (ANSI escapes, NUL,
# CR and LF among them), quotes and backslashes written as \xNN, and bytes that are not
# UTF-8 likewise: one request is always one line, its fields split on spaces.
LOG_ESCAPES = str.maketrans(
    {
        **{chr(c): f"\\x{c:02x}" for c in (*range(0x21), 0x22, 0x5C, *range(0x7F, 0xA0))},
        **{chr(0xDC00 + b): f"\\x{b:02x}" for b in range(0x80, 0x100)},  # not UTF-8
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)


def loggable(text: str) -> str:
    """Return text as one field of a log line, escaped."""
    return text.translate(LOG_ESCAPES)


def loggable_wsgi(text: str) -> str:
    """Return a WSGI string (bytes the client sent, as latin-1) as one log field."""
    if not text.isascii():  # ASCII is the same text in latin-1 and UTF-8
        text = text.encode("latin-1").decode("utf-8", "surrogateescape")
    return loggable(text)


def redacted(query: str) -> str:
    """Return a query string with the value of each `token` parameter written as "-":
    whoever reads the log must not be able to open a stream. A parameter is a token
    wherever the route reads it as one: its name after %-decoding (tok%65n=)."""
    if "token" not in query and "%" not in query:
        return query  # nothing can be named token
    parts = query.split("&")
    for n, part in enumerate(parts):
        name = part.partition("=")[0]
        if unquote_plus(name) == "token":
            parts[n] = f"{name}=-"
    return "&".join(parts)


# What an access-log line holds, in order: the plain line is these fields joined as
# ACCESS_LINE lays them out, a JSON line (LOG_FORMAT=json) is an object of them.
ACCESS_FIELDS = (
    "client", "method", "path", "status", "duration_ms", "request_id", "token",
)  # fmt: skip
ACCESS_LINE = '%s "%s %s" %s %.2fms %s %s'


class AccessLog:
    """WSGI middleware: give each request an id (X-Request-ID), log one line for it, and
    count it in the metrics (unless `metrics` is False).

    The line holds the client address, method, path, status, duration, request id and
    the name of the API token used ("-" for none); behind trusted proxies it sees the
    address and prefix they forwarded.
    """

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], metrics: bool = True) -> None:
        self.wsgi_app = wsgi_app
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID", "")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = environ["HTTP_X_REQUEST_ID"] = os.urandom(16).hex()
        record = environ[RECORD] = RequestRecord(request_id)
        status = "500"
        response_bytes = "0"

        def start(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal status, response_bytes
            status = line[:3]
            for name, value in headers:
                if name == "Content-Length":
                    response_bytes = value
            headers.append(("X-Request-ID", request_id))
            return start_response(line, headers, exc_info)

        try:
            return self.wsgi_app(environ, start)
        finally:
            seconds = time.perf_counter() - started
            query = environ.get("QUERY_STRING")
            method = environ.get("REQUEST_METHOD", "")
            access_log.info(
                ACCESS_LINE,
                loggable_wsgi(environ.get("REMOTE_ADDR") or "-"),
                loggable_wsgi(method),
                loggable_wsgi(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
                + (loggable_wsgi(f"?{redacted(query)}") if query else ""),
                status,
                seconds * 1000,
                request_id,
                loggable(record.credential),
                extra={"fields": ACCESS_FIELDS},
            )
            if self.metrics:
                declared = environ.get("CONTENT_LENGTH") or "0"
                count_request(record.route, method, status, seconds, declared, response_bytes)


class PlainLogFormatter(logging.Formatter):
    """logging's Formatter, writing each second's time once rather than on every line
    (a request's access line is written in microseconds); for date formats to the
    second, as LOG_FORMAT=plain's."""

    def __init__(self, fmt: str, datefmt: str) -> None:
        super().__init__(fmt, datefmt)
        self._second = -1
        self._written = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._written = time.strftime(self.datefmt or "", self.converter(second))
            self._second = second
        return self._written


class JsonLogFormatter(logging.Formatter):
    """Format each record as one JSON object: an access-log line as its fields, any
    other record as its level, logger and message (LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            entry.update(zip(fields, record.args or (), strict=True))
            entry["status"] = int(entry["status"])
            entry["duration_ms"] = round(entry["duration_ms"], 2)
        else:
            entry.update(level=record.levelname, logger=record.name, message=record.getMessage())
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
        return compact(entry)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """Return the record's time in ISO 8601, to the millisecond, with its offset."""
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")
