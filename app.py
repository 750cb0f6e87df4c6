"""BullMQ job progress and logs over HTTP.

Workers report on the job they hold, authorized by the job's lock token:

    POST /queues/<queue>/jobs/<job_id>/progress   set the job's progress (any JSON)
    POST /queues/<queue>/jobs/<job_id>/logs       append one line to the job's logs

Dashboards and operators read, authorized by an API token that may read the queue
(AUTH_TOKENS, AUTH_TOKENS_FILE; see tokens.py):

    GET  /queues/<queue>/jobs/<job_id>/logs       one page of the job's logs
    GET  /queues/<queue>/jobs/<job_id>/progress   the job's progress
    GET  /queues/<queue>/jobs/<job_id>/events     the job, live: server-sent events
                                                  (see streams.py), also opened by
                                                  a watch token (?token=)
    POST /queues/<queue>/jobs/<job_id>/events/token   mint a watch token for a browser

and probes and tools ask, with no token: GET /healthz, GET /readyz, GET /openapi.json,
and GET /metrics (Prometheus; every gunicorn worker's figures added up).

Every read and write is one script on the job's keys in BullMQ's own layout, so the
BullMQ libraries see it all. The module reads top-down: blueprints, token decorators
and views; the request parsing they call; the job store and its scripts; the Redis
connections; settings; error handlers, the access log and the metrics; and
create_app, which wires them together.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

import gevent.lock
import prometheus_client
import redis
import yaml
from flask import Blueprint, Flask, Response, abort, current_app, request
from gevent import monkey
from gunicorn.http.errors import ParseException
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import ConnectionInterface
from redis.crc import key_slot
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool
from werkzeug.exceptions import HTTPException, Unauthorized
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response as BaseResponse

from streams import (
    RETRY_MS,
    JobState,
    StreamId,
    StreamLimits,
    TooManyStreams,
    Watcher,
    event_stream,
    parse_cursor,
    stream_id,
    text,
)
from tokens import ApiTokens, TokenFileError

log = logging.getLogger(__name__)
access_log = logging.getLogger(f"{__name__}.access")

jobs = Blueprint("jobs", __name__)
health = Blueprint("health", __name__)
docs = Blueprint("docs", __name__)

PLAIN = {"Content-Type": "text/plain; charset=utf-8"}
# Where a view leaves the name of the API token a request used, for the access log.
TOKEN_NAME = "bullmq_http.token_name"  # noqa: S105 (a key, not a secret)
# Where watch_or_api_token_required leaves when a request's watch token expires.
WATCH_TOKEN_EXPIRES = "bullmq_http.watch_token_expires"  # noqa: S105

# ------------------------------------------------------------------------- auth

# RFC 9110: the scheme in any case, then one or more spaces (tabs are let pass too); the
# token is every byte after them, none a space or tab, whatever else it is.
BEARER = re.compile(r"bearer[ \t]+([^ \t]+)", re.IGNORECASE)


def bearer_token() -> bytes:
    """Return the request's Bearer token as sent, or stop with a 401."""
    header = request.headers.get("Authorization")
    if header is None:
        abort(401, "send the token as 'Authorization: Bearer <token>'")
    match = BEARER.fullmatch(header)
    if match is None:
        abort(401, "the Authorization header must be exactly 'Bearer <token>'")
    # WSGI hands headers over as latin-1; this gives back the bytes the client sent.
    return match[1].encode("latin-1")


def with_job_token(view: Callable[..., Any]) -> Callable[..., Any]:
    """Hand the view the request's Bearer token as `token`, unchecked: the view's
    script compares it with the job's lock, in the same round trip as the write."""

    @functools.wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        return view(token=bearer_token(), **kwargs)

    return wrapper


def api_token_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Let the request through only with an API token that may read the route's queue."""

    @functools.wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        check_api_token(kwargs.get("queue"))
        return view(**kwargs)

    return wrapper


def watch_or_api_token_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Let the request through with a watch token for the route's job (?token=, what a
    browser's EventSource can send), or else an API token that may read its queue."""

    @functools.wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        token = request.args.get("token")
        if token is None:
            check_api_token(kwargs.get("queue"))
        else:
            expires = check_watch_token(token, kwargs["queue"], kwargs["job_id"])
            request.environ[TOKEN_NAME] = "watch-token"  # for the access log
            request.environ[WATCH_TOKEN_EXPIRES] = expires
        return view(**kwargs)

    return wrapper


def check_api_token(queue: str | None) -> None:
    """Stop with 401 unless the request has a valid API token, 403 unless it may read
    the queue."""
    tokens: ApiTokens = current_app.extensions["bullmq_http.tokens"]
    token = tokens.find(bearer_token())
    if token is None:
        if not len(tokens.current):
            abort(401, "this server has no API token configured (AUTH_TOKENS)")
        abort(401, "the API token is not valid")
    request.environ[TOKEN_NAME] = token.name  # for the access log
    if queue is not None and not token.reads(queue):
        abort(403, f"this token may not read queue {queue!r}")


def watch_token(secret: str, queue: str, job_id: str, expires: int) -> str:
    """Return the watch token of one job's events, good until `expires` (Unix time)."""
    message = f"bullmq-http watch\n{queue}\n{job_id}\n{expires}".encode()
    signature = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"{expires}.{signature}"


def check_watch_token(token: str, queue: str, job_id: str) -> int:
    """Stop with 401 unless the token is an unexpired watch token of this job; return
    when it expires (Unix time)."""
    secret = current_app.config["WATCH_TOKEN_SECRET"]
    if not secret:
        abort(401, "watch tokens are off on this server (WATCH_TOKEN_SECRET)")
    expires, _, _ = token.partition(".")
    if not (token.isascii() and expires.isdigit() and len(expires) <= 12):
        abort(401, "the watch token is not valid for this job")
    expected = watch_token(secret, queue, job_id, int(expires))
    if not hmac.compare_digest(token.encode(), expected.encode()):
        abort(401, "the watch token is not valid for this job")
    if int(expires) <= time.time():
        abort(401, "the watch token has expired: ask for a new one")
    return int(expires)


# ------------------------------------------------------------------------ views


@jobs.url_value_preprocessor
def check_queue_name(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Refuse queue names that BullMQ would refuse, before any other work."""
    queue = (values or {}).get("queue", "")
    low = current_app.config["MIN_QUEUE_NAME_LENGTH"]
    high = current_app.config["MAX_QUEUE_NAME_LENGTH"]
    if not low <= len(queue) <= high:
        abort(400, f"the queue name must be {low} to {high} characters long")
    if ":" in queue:
        abort(400, "the queue name must not contain ':'")


@jobs.post("/queues/<queue>/jobs/<path:job_id>/progress")
@with_job_token
def set_progress(queue: str, job_id: str, token: bytes) -> tuple[str, dict[str, str]]:
    """Set the progress of the job the caller holds."""
    store().set_progress(queue, job_id, token, progress_json(request_body()))
    return "OK", PLAIN


@jobs.post("/queues/<queue>/jobs/<path:job_id>/logs")
@with_job_token
def add_log(queue: str, job_id: str, token: bytes) -> tuple[str, dict[str, str]]:
    """Append one line to the logs of the job the caller holds."""
    store().add_log(queue, job_id, token, log_line(request_body()))
    return "OK", PLAIN


@jobs.get("/queues/<queue>/jobs/<path:job_id>/logs")
@api_token_required
def read_logs(queue: str, job_id: str) -> Response:
    """Return one page of a job's logs, oldest first unless order=desc."""
    no_query_parameters_but(("start", "length", "order"))
    start = query_number("start", 0, parse_start)
    length = query_number("length", 10, parse_length)
    order = request.args.get("order", "asc")
    if order not in ("asc", "desc"):
        abort(400, "order must be asc or desc")
    count, lines = store().read_logs(queue, job_id, start, length, newest_first=order == "desc")
    body = {"count": count, "logs": [line.decode("utf-8", "replace") for line in lines]}
    return current_app.response_class(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        mimetype="application/json",
    )


@jobs.get("/queues/<queue>/jobs/<path:job_id>/progress")
@api_token_required
def read_progress(queue: str, job_id: str) -> Response:
    """Return a job's progress as stored, or 0 when it was never set, as BullMQ reads it."""
    no_query_parameters_but(())
    progress = store().read_progress(queue, job_id)
    return Response(b"0" if progress is None else progress, mimetype="application/json")


@jobs.get("/queues/<queue>/jobs/<path:job_id>/events")
@watch_or_api_token_required
def job_events(queue: str, job_id: str) -> Response:
    """Stream a job's progress and log lines as server-sent events, as they happen."""
    no_query_parameters_but(("tail", "token"))
    tail = query_number("tail", 10, parse_tail)
    resume = None
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id:
        resume = parse_cursor(last_event_id)
        if resume is None:
            abort(400, "Last-Event-ID must be the id of an event this service sent")
    # A stream opened with a watch token ends when the token expires.
    expires = request.environ.get(WATCH_TOKEN_EXPIRES)
    until = None if expires is None else time.monotonic() + (expires - time.time())
    limits: StreamLimits = current_app.extensions["bullmq_http.stream_limits"]
    if expires is None:
        give_back = limits.take("api", request.environ[TOKEN_NAME])
    else:
        give_back = limits.take("watch", request.args["token"])
    try:
        job_store = store()
        state = job_store.job_state(queue, job_id)
        watcher: Watcher = current_app.extensions["bullmq_http.watcher"]
        events = event_stream(job_store, watcher, queue, job_id, state, tail, resume, until)
        response = Response(
            counted_stream(events),
            mimetype="text/event-stream",
            # Not cached, and not buffered by nginx (X-Accel-Buffering), which would hold
            # the events back until its buffer fills.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    except BaseException:
        give_back()
        raise
    # The server closes the response when the stream ends, however it ends.
    response.call_on_close(give_back)
    return response


@jobs.post("/queues/<queue>/jobs/<path:job_id>/events/token")
@api_token_required
def mint_watch_token(queue: str, job_id: str) -> Response:
    """Return a short-lived token that opens this job's events and nothing else."""
    secret = current_app.config["WATCH_TOKEN_SECRET"]
    if not secret:
        abort(404, "watch tokens are off: set WATCH_TOKEN_SECRET, the same on every instance")
    expires = int(time.time()) + current_app.config["WATCH_TOKEN_SECONDS"]
    body = {"token": watch_token(secret, queue, job_id, expires), "expires": expires}
    return Response(json.dumps(body), mimetype="application/json")


@health.get("/healthz")
def healthz() -> tuple[str, dict[str, str]]:
    """Answer that the process is alive, touching nothing else."""
    return "OK", PLAIN


@health.get("/readyz")
def readyz() -> tuple[str, dict[str, str]]:
    """Answer whether Redis answers, and the job watcher does its work."""
    store().ping()
    watcher: Watcher = current_app.extensions["bullmq_http.watcher"]
    trouble = watcher.trouble()
    if trouble is not None:
        abort(503, trouble)
    return "OK", PLAIN


@health.get("/metrics")
def metrics() -> Response:
    """Return the service's metrics in Prometheus's text format, every worker's added up."""
    if not current_app.config["METRICS"]:
        abort(404, "metrics are turned off (METRICS=0)")
    registry = prometheus_client.REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # under gunicorn: gunicorn.conf.py
        registry = prometheus_client.CollectorRegistry()
        MultiProcessCollector(registry)
    return Response(
        prometheus_client.generate_latest(registry),
        content_type=prometheus_client.CONTENT_TYPE_LATEST,
    )


OPENAPI = Path(__file__).with_name("openapi.yaml")


@docs.get("/openapi.json")
def openapi() -> Response:
    """Return the OpenAPI description, its server URL where the caller reached us."""
    spec = {**current_app.extensions["openapi"], "servers": [{"url": request.script_root or "/"}]}
    return current_app.response_class(json.dumps(spec), mimetype="application/json")


# ------------------------------------------------------------------------ input


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """Return a parser of whole numbers from low to high, written in ASCII digits."""
    digits = len(str(high))  # longer text is out of range: no need to convert it

    def parse(value: str) -> int:
        if not (
            value.isascii()
            and value.isdigit()
            and len(value) <= digits
            and low <= int(value) <= high
        ):
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(value)

    return parse


# start stops at JavaScript's largest safe integer: BullMQ's clients cannot page past it.
parse_start = whole_number(0, 2**53 - 1)
parse_length = whole_number(1, 100)
parse_tail = whole_number(0, 100)


def no_query_parameters_but(known: tuple[str, ...]) -> None:
    """Stop with 400 at a query parameter the route does not take: a misspelt one
    (strat=20) would otherwise give a silently wrong answer."""
    unknown = sorted(request.args.keys() - set(known))
    if unknown and not known:
        abort(400, f"unknown query parameter {unknown[0]!r}: this route takes none")
    if unknown:
        names = " and ".join((", ".join(known[:-1]), known[-1])) if known[:-1] else known[0]
        abort(400, f"unknown query parameter {unknown[0]!r}: use {names}")


def query_number(name: str, default: int, parse: Callable[[str], int]) -> int:
    """Return a whole-number query parameter as `parse` reads it, or stop with a 400."""
    text = request.args.get(name)
    if text is None:
        return default
    try:
        return parse(text)
    except ValueError as error:
        abort(400, f"{name} {error}")


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_number(text: str) -> float:
    # JSON.parse reads every number as a double, integers too.
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:40]}{'...' if len(text) > 40 else ''} is too large")
    return number


def request_body() -> bytes:
    """Return the whole request body, or stop with a 4xx when it cannot be had whole.

    A body is whole only when as many bytes arrived as its Content-Length declares, or,
    chunked, when its last chunk arrived: a client that disconnects or stalls mid-body
    must not have the part that did arrive stored as if it were all.
    """
    limit = current_app.config["MAX_BODY_BYTES"]
    too_large = f"the body is larger than {limit} bytes (MAX_BODY_BYTES)"
    declared = request.content_length
    if declared is not None and declared > limit:
        abort(413, too_large)
    # Without a length, only a server that ends the stream with the body (gunicorn and
    # werkzeug say so in wsgi.input_terminated) can be read to its end; werkzeug's own
    # limited stream would cut a chunked body at the limit and let the rest pass unseen.
    if declared is None and not request.environ.get("wsgi.input_terminated"):
        return b""
    try:
        body = request.environ["wsgi.input"].read(limit + 1 if declared is None else declared)
    except TimeoutError:
        abort(408, "the body did not arrive in time (REQUEST_TIMEOUT): send it at once")
    except ParseException as error:
        abort(400, f"the chunked body is malformed ({error})")
    except OSError:
        abort(400, "the body ended before all of it arrived")
    if declared is None and len(body) > limit:
        abort(413, too_large)
    if declared is not None and len(body) < declared:
        abort(400, f"the body ended after {len(body)} of the {declared} bytes declared")
    return body


def parse_json(body: bytes, what: str) -> Any:
    """Parse a body as one JSON value, or stop with a 400 that says what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        abort(400, f"{what} is not valid UTF-8")
    try:
        return json.loads(
            text, parse_constant=_not_json, parse_float=_finite_number, parse_int=_finite_number
        )
    except (ValueError, RecursionError) as error:
        reason = "is nested too deeply" if isinstance(error, RecursionError) else f"({error})"
        abort(400, f"{what} must be valid JSON {reason}")


def progress_json(body: bytes) -> bytes:
    """Return the request's progress as JSON.stringify would write it, or stop with a 4xx."""
    limit = current_app.config["MAX_PROGRESS_BYTES"]
    too_large = f"the progress is larger than {limit} bytes (MAX_PROGRESS_BYTES)"
    if len(body) > limit:  # refused before the cost of parsing it
        abort(413, too_large)
    try:
        text = stringify(parse_json(body, "the progress"))
    except RecursionError:
        abort(400, "the progress must be valid JSON is nested too deeply")
    # A lone surrogate cannot be UTF-8; JSON.stringify writes it as an escape, as here.
    stored = text.encode("utf-8", "backslashreplace")
    if len(stored) > limit:  # a number such as 1e20 is longer written out
        abort(413, too_large)
    return stored


def stringify(value: Any) -> str:
    """Write a parsed JSON value exactly as JavaScript's JSON.stringify writes it.

    Compact; numbers as JavaScript writes them (js_number); an object's keys in the
    order JavaScript keeps them: array indexes ("0", "7") first, ascending, then the
    others as they came, a repeated key where it first came with its last value.
    """
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is True or value is False or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return js_number(value)
    if isinstance(value, list):
        return "[" + ",".join(map(stringify, value)) + "]"
    indexes = sorted((key for key in value if is_array_index(key)), key=int)
    keys = indexes + [key for key in value if not is_array_index(key)] if indexes else value
    return (
        "{"
        + ",".join(f"{json.dumps(key, ensure_ascii=False)}:{stringify(value[key])}" for key in keys)
        + "}"
    )


def is_array_index(key: str) -> bool:
    """Say whether JavaScript takes an object key for an array index."""
    return (
        key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(key) < 2**32 - 1
    )


def js_number(number: float) -> str:
    """Write a finite number as JavaScript does (Number::toString in ECMA-262): the
    shortest digits that read back the same (as Python's repr), placed by its rules."""
    if number == 0:
        return "0"  # -0 too
    mantissa, _, exponent = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    written = whole + fraction
    significant = written.lstrip("0")
    # The value is 0.<digits> * 10**n.
    n = len(whole) + int(exponent or 0) - (len(written) - len(significant))
    digits = significant.rstrip("0")
    sign = "-" if number < 0 else ""
    if len(digits) <= n <= 21:
        return sign + digits + "0" * (n - len(digits))
    if 0 < n <= 21:
        return f"{sign}{digits[:n]}.{digits[n:]}"
    if -6 < n <= 0:
        return f"{sign}0.{'0' * -n}{digits}"
    fraction = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{fraction}e{'+' if n > 0 else '-'}{abs(n - 1)}"


def log_line(body: bytes) -> str:
    """Return the log line the request carries, or stop with a 400."""
    if request.is_json:
        line = parse_json(body, "the log line")
        if not isinstance(line, str):
            abort(400, 'a JSON log line must be a JSON string, like "a line"')
    else:
        try:
            line = body.decode("utf-8")
        except UnicodeDecodeError:
            abort(400, "the log line is not valid UTF-8")
    if not line:
        abort(400, "the log line is empty")
    try:
        size = len(line.encode("utf-8"))
    except UnicodeEncodeError:
        abort(400, "the log line holds an unpaired UTF-16 surrogate, which is not text")
    limit = current_app.config["MAX_LOG_LINE_BYTES"]
    if size > limit:
        abort(413, f"the log line is longer than {limit} bytes (MAX_LOG_LINE_BYTES)")
    return line


# -------------------------------------------------------------------- job store


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
]]
if redis.call("GET", KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call("TYPE", KEYS[1])["ok"] ~= "hash" then return -2 end

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

local lines = redis.call("LRANGE", KEYS[2], ARGV[1], ARGV[2])
local first, last, step = 1, #lines, 1
if ARGV[3] == "desc" then first, last, step = #lines, 1, -1 end
local page = {redis.call("LLEN", KEYS[2])}
local room = tonumber(ARGV[4])
for i = first, last, step do
  room = room - #lines[i]
  if room < 0 and #page > 1 then break end
  page[#page + 1] = lines[i]
end
return page
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

  ARGV[1] job id

  Returns {progress or "", 1 if progress was set else 0, "completed", "failed" or "",
           the return value or the failed reason, how many log lines the job has,
           the newest id in the event stream, the oldest} ("0-0" for none)
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
return {progress or "", progress and 1 or 0, finished, outcome,
        redis.call("LLEN", KEYS[2]), newest and newest[1] or "0-0", oldest and oldest[1] or "0-0"}
"""

# Script return codes, turned into NotLockHolder and NoSuchJob in JobStore._run.
NOT_LOCK_HOLDER = -1
NO_SUCH_JOB = -2


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

    Every method is one script, one round trip; it raises NotLockHolder, NoSuchJob or
    CrossSlot for what the caller got wrong, a RedisError for what Redis did.
    """

    set_progress_script = Script("set_progress", SET_PROGRESS, "written")
    add_log_script = Script("add_log", ADD_LOG, "written")
    read_logs_script = Script("read_logs", READ_LOGS, "read")
    read_progress_script = Script("read_progress", READ_PROGRESS, "read")
    job_state_script = Script("job_state", JOB_STATE, "read")

    def __init__(
        self,
        connect: Callable[[], RedisCommands],
        prefix: str,
        max_logs: int | None = None,
        cluster: bool = False,
        max_page_bytes: int = 1024 * 1024,
    ) -> None:
        self.connect = connect
        self.prefix = prefix
        self.max_logs = b"" if max_logs is None else str(max_logs).encode()
        self.max_page_bytes = max_page_bytes
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

    def ping(self) -> None:
        """Raise a RedisError unless Redis answers."""
        self.redis.execute_command("PING")

    def key(self, queue: str, *parts: str) -> str:
        """Return BullMQ's key for a queue, or for one of its jobs and a suffix."""
        return ":".join((self.prefix, queue, *parts))

    def set_progress(self, queue: str, job_id: str, token: bytes, progress: bytes) -> None:
        """Store a job's progress and publish a progress event."""
        keys = (
            self.key(queue, job_id),
            self.key(queue, job_id, "lock"),
            self.key(queue, "events"),
            self.key(queue, "meta"),
        )
        self._run(self.set_progress_script, queue, job_id, keys, (token, job_id, progress))

    def add_log(self, queue: str, job_id: str, token: bytes, line: str) -> int:
        """Append a line to a job's logs; return how many lines the job keeps."""
        keys = (
            self.key(queue, job_id),
            self.key(queue, job_id, "lock"),
            self.key(queue, job_id, "logs"),
        )
        args = (token, line, self.max_logs)
        count: int = self._run(self.add_log_script, queue, job_id, keys, args)
        return count

    def read_logs(
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

    def read_progress(self, queue: str, job_id: str) -> bytes | None:
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
        )
        progress, has_progress, finished, outcome, log_count, newest, oldest = self._run(
            self.job_state_script, queue, job_id, keys, (job_id,)
        )
        return JobState(
            progress=text(progress) if has_progress else None,
            finished=text(finished) or None,
            outcome=text(outcome),
            log_count=log_count,
            stream_top=stream_id(newest),
            stream_first=stream_id(oldest),
        )

    def events_after(
        self, queue: str, after: StreamId, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Return up to `count` entries of a queue's event stream after a position."""
        start = f"({after[0]}-{after[1]}"
        key = self.key(queue, "events")
        entries = self.redis.execute_command("XRANGE", key, start, "+", "COUNT", count)
        # A cluster's client has parsed each entry's fields into a dict already.
        return [
            (entry_id, fields if isinstance(fields, dict) else pairs(fields))
            for entry_id, fields in entries
        ]

    def log_page(self, queue: str, job_id: str, start: int, count: int) -> list[bytes]:
        """Return up to `count` of a job's log lines from index `start`, as many whole
        lines as fit in max_page_bytes (at least one)."""
        return self.read_logs(queue, job_id, start, count, newest_first=False)[1]

    def _run(
        self, script: Script, queue: str, job_id: str, keys: tuple[str, ...], args: tuple[Any, ...]
    ) -> Any:
        """Run one of the scripts on a job's keys; raise what its return code stands for."""
        if self.one_slot and len({key_slot(key.encode()) for key in keys}) > 1:
            raise CrossSlot(keys[0])
        redis_ = self.redis
        try:
            try:
                result = redis_.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                # Redis restarted or its scripts were flushed: send the script itself,
                # which Redis caches again for the EVALSHA of the next request.
                result = redis_.execute_command("EVAL", script.source, len(keys), *keys, *args)
        except redis.exceptions.ResponseError as error:
            raise script_error(error, script) from error
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


# How Redis 6.2, Redis 7 and Valkey word an ACL's refusal inside a script, and how they
# name the line of the script that was refused.
SCRIPT_DENIED = ("NOPERM", "The user executing the script can't", "ACL failure in script")
SCRIPT_LINE = re.compile(r"@user_script: ?(\d+)")
SCRIPT_CALL = re.compile(r'redis\.call\("(\w+)"')


def store() -> JobStore:
    """Return the current app's job store."""
    store: JobStore = current_app.extensions["bullmq_http"]
    return store


# ---------------------------------------------------------------------- Redis


class RedisCommands(Protocol):
    """What the job store needs of Redis: one server's connections, or a cluster's."""

    def execute_command(self, *args: Any) -> Any: ...

    def close(self) -> None: ...


class Connections:
    """The process's connections to one Redis server, each lent to one command at a time.

    At most `size` are open; a command beyond them waits up to `timeout` for one to come
    free, then fails (503). This is redis-py's BlockingConnectionPool and client call
    less what costs more than the round trip itself (bench/results.md): a poll of each
    connection as it is lent, which under gevent is a trip through the hub, and
    telemetry. A connection that broke while idle (Redis restarted, or a failover
    demoted its server) is found by the command, which is sent once more on a new
    connection; a command that timed out is never sent again, as it may have run.
    """

    def __init__(self, pool: redis.ConnectionPool, size: int, timeout: float) -> None:
        # The pool makes the connections: address, credentials, TLS, the sentinels' word.
        self.connection_pool = pool
        self.timeout = timeout
        self.idle: list[ConnectionInterface] = []  # the most recently used last
        self.free = bounded_semaphore(size)

    def execute_command(self, *args: Any) -> Any:
        """Send one command and return Redis's reply."""
        if not self.free.acquire(timeout=self.timeout):
            raise redis.exceptions.ConnectionError(
                f"no Redis connection came free within {self.timeout:g} s (REDIS_MAX_CONNECTIONS)"
            )
        connection = self.idle.pop() if self.idle else self.connection_pool.make_connection()
        try:
            try:
                return self.call(connection, args)
            except redis.exceptions.ConnectionError:
                connection.disconnect()
                return self.call(connection, args)
        finally:
            self.idle.append(connection)
            self.free.release()

    @staticmethod
    def call(connection: ConnectionInterface, args: tuple[Any, ...]) -> Any:
        """Send a command on a connection and return the reply; connect first if need be
        (a connection of Sentinel's asks the sentinels where the master is)."""
        connection.connect()
        connection.send_command(*args)
        return connection.read_response()

    def close(self) -> None:
        """Close the idle connections, and any the pool holds itself (a Sentinel pool's,
        to the sentinels); a closed one connects again when next used."""
        for connection in self.idle:
            connection.disconnect()
        self.connection_pool.disconnect()


def bounded_semaphore(size: int) -> threading.BoundedSemaphore:
    """Return a semaphore for `size` holders, of gevent's kind where gevent has patched
    threading: threading's own, rebuilt on patched locks, costs more than a Redis call."""
    if monkey.is_module_patched("threading"):
        return gevent.lock.BoundedSemaphore(size)
    return threading.BoundedSemaphore(size)


def redis_client(config: Mapping[str, Any]) -> RedisCommands:
    """Make the process's Redis connections from the settings."""
    options: dict[str, Any] = {
        "socket_timeout": config["REDIS_TIMEOUT"],
        "socket_connect_timeout": config["REDIS_TIMEOUT"],
        # A failed connect is tried once more at once; a timeout never is.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        # No CLIENT SETINFO on connecting: a round trip, and a command the service's
        # least-privilege Redis user is not granted (deploy/redis-acl.conf).
        "driver_info": None,
        **tls_options(config),
    }
    if config["REDIS_CLUSTER"]:
        return cluster_client(config, options)
    if config["REDIS_SENTINELS"]:
        sentinels = Sentinel(
            config["REDIS_SENTINELS"],
            # The sentinels are reached as the servers are: over TLS where they are.
            sentinel_kwargs={
                "password": config["REDIS_SENTINEL_PASSWORD"],
                "socket_timeout": config["REDIS_TIMEOUT"],
                "driver_info": None,
                **({"ssl": True, **tls_options(config)} if redis_tls(config) else {}),
            },
        )
        # The pool asks the sentinels for the master whenever it connects, so after a
        # failover the next connection goes to the new master.
        pool: redis.ConnectionPool = SentinelPool(
            config["REDIS_SENTINEL_MASTER"],
            sentinels,
            username=config["REDIS_USERNAME"],
            password=config["REDIS_PASSWORD"],
            ssl=redis_tls(config),
            **options,
        )
    elif config["REDIS_URL"]:
        pool = redis.ConnectionPool.from_url(config["REDIS_URL"], **options)
    else:
        pool = redis.ConnectionPool(
            host=config["REDIS_HOST"],
            port=config["REDIS_PORT"],
            username=config["REDIS_USERNAME"],
            password=config["REDIS_PASSWORD"],
            connection_class=redis.SSLConnection if redis_tls(config) else redis.Connection,
            **options,
        )
    return Connections(pool, config["REDIS_MAX_CONNECTIONS"], config["REDIS_TIMEOUT"])


def watcher_client(config: Mapping[str, Any]) -> redis.Redis | RedisCluster:
    """Make the job watcher's own client: one connection (one per node of a cluster)."""
    client = redis_client({**config, "REDIS_MAX_CONNECTIONS": 1})
    if isinstance(client, Connections):
        return redis.Redis.from_pool(client.connection_pool)  # closed with the client
    assert isinstance(client, RedisCluster)
    return client


class SentinelPool(SentinelConnectionPool):
    """redis-py's pool of a Sentinel master's connections, which, disconnected whole (as
    closing a client of it does), closes its connections to the sentinels too.

    It asks the sentinels where the master is through a client of each, whose
    connections redis-py leaves open until the garbage collector finds them. When the
    master moves, redis-py disconnects the pool's idle connections only, and the
    sentinels' stay open for the next question.
    """

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                sentinel.connection_pool.disconnect()


class Cluster(RedisCluster):
    """redis-py's Redis Cluster client, whose close() closes every node's connections.

    Made from a URL, as cluster_client makes it, each node's client is handed a pool it
    does not own, and RedisCluster.close() leaves that pool's connections open until the
    garbage collector finds them.
    """

    def close(self) -> None:
        nodes = self.get_nodes()
        super().close()
        for node in nodes:
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


def cluster_client(config: Mapping[str, Any], options: dict[str, Any]) -> RedisCluster:
    """Make a Redis Cluster client from its seed nodes."""
    seeds = [ClusterNode(host, port) for host, port in config["REDIS_CLUSTER_NODES"]]
    credentials = {"username": config["REDIS_USERNAME"], "password": config["REDIS_PASSWORD"]}
    for url in (config["REDIS_URL"] or "").split(","):
        if url.strip():
            parts = urlsplit(url.strip())
            seeds.append(ClusterNode(parts.hostname or "localhost", parts.port or 6379))
            credentials = {"username": parts.username, "password": parts.password}
    if not seeds:
        seeds = [ClusterNode(config["REDIS_HOST"], config["REDIS_PORT"])]
    first, *others = seeds
    # Each node's connections take the options of one server's (timeouts, TLS); the
    # cluster retries its own way, below.
    node_options = {name: value for name, value in options.items() if name != "retry"}
    return Cluster(
        # Given a URL, the client makes each node's pool of connection_pool_class; given
        # none, it makes pools that refuse a caller past their size instead of waiting.
        url=f"{'rediss' if redis_tls(config) else 'redis'}://{first.host}:{first.port}",
        startup_nodes=others,
        **node_options,
        # At most this many connections per node; a request beyond them waits for one to
        # come free, up to REDIS_TIMEOUT, then answers 503.
        connection_pool_class=redis.BlockingConnectionPool,
        max_connections=config["REDIS_MAX_CONNECTIONS"],
        timeout=config["REDIS_TIMEOUT"],
        # MOVED and ASK are followed at once; a node down or a failover under way is
        # retried a few times, within about a second, before the request answers 503.
        retry=Retry(ExponentialBackoff(cap=0.4, base=0.05), 4),
        **credentials,
    )


def redis_tls(config: Mapping[str, Any]) -> bool:
    """Return whether the service reaches Redis over TLS: as REDIS_URL's scheme says
    where it names the servers (rediss://), else as REDIS_TLS says."""
    if config["REDIS_URL"] and not config["REDIS_SENTINELS"]:
        urls = config["REDIS_URL"].split(",")
        return any(urlsplit(url.strip()).scheme == "rediss" for url in urls)
    return bool(config["REDIS_TLS"])


def tls_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return redis-py's TLS options from the settings; none for a plain link.

    Without REDIS_TLS_CA_FILE the system's trusted CAs verify the server, as a managed
    Redis with a public certificate needs.
    """
    if not redis_tls(config):
        return {}
    return {
        "ssl_ca_certs": config["REDIS_TLS_CA_FILE"],
        "ssl_certfile": config["REDIS_TLS_CERT_FILE"],
        "ssl_keyfile": config["REDIS_TLS_KEY_FILE"],
        "ssl_check_hostname": config["REDIS_TLS_CHECK_HOSTNAME"],
    }


def check_tls_files(config: Mapping[str, Any]) -> None:
    """Raise ConfigError unless the TLS files load as the link will load them."""
    named = [name for name in TLS_FILES if config[name]]
    if named and not redis_tls(config):
        raise ConfigError(
            f"{named[0]} is set, but the link to Redis is not TLS: "
            "set REDIS_TLS=true, or use a rediss:// REDIS_URL"
        )
    if config["REDIS_TLS_KEY_FILE"] and not config["REDIS_TLS_CERT_FILE"]:
        raise ConfigError("REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE, its certificate")
    context = ssl.create_default_context()
    for name in named:
        try:
            if name == "REDIS_TLS_CA_FILE":
                context.load_verify_locations(cafile=config[name])
            elif name == "REDIS_TLS_CERT_FILE":
                context.load_cert_chain(config[name], config["REDIS_TLS_KEY_FILE"])
        except OSError as error:  # missing, unreadable, no PEM, or a key not the cert's
            raise ConfigError(f"{name}={config[name]} cannot be used: {error}") from None


TLS_FILES = ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")


# -------------------------------------------------------------------- settings


class ConfigError(RuntimeError):
    """A setting that cannot work; start-up stops with its one-line message."""


def _text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 60:
        raise ValueError("must be a number of seconds above 0 and at most 60")
    return seconds


def _flag(value: str) -> bool:
    flags = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in flags:
        raise ValueError("must be true or false")
    return flags[value.lower()]


def _redis_url(value: str) -> str:
    # Several, comma separated, name the seed nodes of a cluster.
    for url in value.split(","):
        if urlsplit(url.strip()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
    return value


def _addresses(value: str) -> tuple[tuple[str, int], ...]:
    addresses = []
    for item in value.split(","):
        host, _, port = item.strip().rpartition(":")
        if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("must be host:port, comma separated")
        addresses.append((host, int(port)))
    return tuple(addresses)


def _token_list(value: str) -> tuple[str, ...]:
    return tuple(token.strip() for token in value.split(",") if token.strip())


@dataclass(frozen=True)
class Setting:
    """A setting's default, and the parser of its environment variable (which raises
    ValueError saying what is expected)."""

    default: Any
    parse: Callable[[str], Any]


# Each setting is read from the environment variable of its name.
SETTINGS: dict[str, Setting] = {
    "REDIS_URL": Setting(None, _redis_url),
    "REDIS_HOST": Setting("localhost", _text),
    "REDIS_PORT": Setting(6379, whole_number(1, 65535)),
    "REDIS_USERNAME": Setting(None, _text),
    "REDIS_PASSWORD": Setting(None, _text),
    "REDIS_TLS": Setting(False, _flag),
    "REDIS_TLS_CA_FILE": Setting(None, _text),
    "REDIS_TLS_CERT_FILE": Setting(None, _text),
    "REDIS_TLS_KEY_FILE": Setting(None, _text),
    "REDIS_TLS_CHECK_HOSTNAME": Setting(True, _flag),
    "REDIS_TIMEOUT": Setting(2.0, _seconds),
    "REDIS_MAX_CONNECTIONS": Setting(50, whole_number(1, 10_000)),
    "REDIS_CLUSTER": Setting(False, _flag),
    "REDIS_CLUSTER_NODES": Setting((), _addresses),
    "REDIS_SENTINELS": Setting((), _addresses),
    "REDIS_SENTINEL_MASTER": Setting(None, _text),
    "REDIS_SENTINEL_PASSWORD": Setting(None, _text),
    "QUEUE_PREFIX": Setting("bull", _text),
    "AUTH_TOKENS": Setting((), _token_list),
    "AUTH_TOKENS_FILE": Setting(None, _text),  # read by api_tokens
    "MIN_QUEUE_NAME_LENGTH": Setting(3, whole_number(1, 1000)),
    "MAX_QUEUE_NAME_LENGTH": Setting(100, whole_number(1, 1000)),
    "MAX_BODY_BYTES": Setting(1024 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "MAX_PROGRESS_BYTES": Setting(64 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "MAX_LOG_LINE_BYTES": Setting(64 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "MAX_LOGS_PER_JOB": Setting(None, whole_number(1, 2**31)),
    "MAX_PAGE_BYTES": Setting(1024 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "TRUSTED_PROXIES": Setting(0, whole_number(0, 10)),
    "METRICS": Setting(True, _flag),
    "WATCH_TOKEN_SECRET": Setting(None, _text),
    "WATCH_TOKEN_SECONDS": Setting(300, whole_number(1, 86_400)),
    # Unset, from the worker's room: see default_max_streams.
    "MAX_STREAMS": Setting(None, whole_number(0, 10_000)),
    "MAX_STREAMS_PER_TOKEN": Setting(100, whole_number(1, 10_000)),
    "MAX_STREAMS_PER_WATCH_TOKEN": Setting(10, whole_number(1, 10_000)),
    # gunicorn's, read here too: the room a worker has sizes its streams.
    "WORKER_CLASS": Setting("gevent", _text),
    "WORKER_CONNECTIONS": Setting(1000, whole_number(1, 10_000)),
    "THREADS": Setting(8, whole_number(1, 1024)),
}
DEFAULTS = {name: setting.default for name, setting in SETTINGS.items()}


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Parse the service's environment variables; raise ConfigError on a bad one."""
    settings: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        value = environ.get(name)
        # An empty variable is unset, except AUTH_TOKENS: empty there means none.
        if value is None or (value == "" and name != "AUTH_TOKENS"):
            continue
        try:
            settings[name] = setting.parse(value)
        except ValueError as error:
            raise ConfigError(f"{name}={value!r} {error}") from None
    return settings


def api_tokens(config: Mapping[str, Any]) -> ApiTokens:
    """Return the API tokens of AUTH_TOKENS and AUTH_TOKENS_FILE (tokens may come from
    both, say while one is being rotated out); raise ConfigError for a bad file."""
    try:
        return ApiTokens(config["AUTH_TOKENS"], config["AUTH_TOKENS_FILE"])
    except TokenFileError as error:
        raise ConfigError(str(error)) from None


HASH_TAG = re.compile(r"\{[^}]+\}")

# The share of a gevent worker's connections that streams of events may hold: the rest
# stay free for writes, reads and probes.
STREAM_SHARE = 0.8


def default_max_streams(config: Mapping[str, Any]) -> int:
    """Return how many streams of events one worker holds, unless MAX_STREAMS says.

    A stream holds a connection of a gevent worker, a thread of a gthread worker, and a
    whole sync worker, for as long as it lasts: gevent keeps a fifth of its connections
    for other requests, gthread half its threads, and sync serves no streams.
    """
    if config["WORKER_CLASS"] == "gevent":
        return max(1, int(config["WORKER_CONNECTIONS"] * STREAM_SHARE))
    if config["WORKER_CLASS"] == "gthread":
        return config["THREADS"] // 2
    return 0


def check_settings(config: Mapping[str, Any]) -> None:
    """Raise ConfigError when settings contradict each other; warn of risky ones."""
    if config["MIN_QUEUE_NAME_LENGTH"] > config["MAX_QUEUE_NAME_LENGTH"]:
        raise ConfigError(
            f"MIN_QUEUE_NAME_LENGTH={config['MIN_QUEUE_NAME_LENGTH']} is above "
            f"MAX_QUEUE_NAME_LENGTH={config['MAX_QUEUE_NAME_LENGTH']}"
        )
    if config["REDIS_CLUSTER"] and config["REDIS_SENTINELS"]:
        raise ConfigError("REDIS_CLUSTER and REDIS_SENTINELS are set: choose one")
    if config["REDIS_SENTINELS"] and not config["REDIS_SENTINEL_MASTER"]:
        raise ConfigError("REDIS_SENTINELS is set without REDIS_SENTINEL_MASTER, the master's name")
    if "," in (config["REDIS_URL"] or "") and not config["REDIS_CLUSTER"]:
        raise ConfigError("REDIS_URL names several servers: set REDIS_CLUSTER=1 for a cluster")
    check_tls_files(config)
    if config["WORKER_CLASS"] == "gevent" and config["MAX_STREAMS"] >= config["WORKER_CONNECTIONS"]:
        raise ConfigError(
            f"MAX_STREAMS={config['MAX_STREAMS']} must be below "
            f"WORKER_CONNECTIONS={config['WORKER_CONNECTIONS']}: streams would leave no "
            "connection for writes and probes"
        )
    if config["REDIS_CLUSTER"] and not HASH_TAG.search(config["QUEUE_PREFIX"].split(":")[0]):
        log.warning(
            "QUEUE_PREFIX=%s has no hash tag: on Redis Cluster every queue name then needs "
            "one, like {orders}; QUEUE_PREFIX={bull} covers every queue",
            config["QUEUE_PREFIX"],
        )


# ---------------------------------------------------------------------- errors


def plain_error(error: HTTPException) -> BaseResponse:
    """Render an HTTP error as its plain-text reason, keeping headers such as Allow."""
    response = error.get_response()
    response.set_data(error.description or "")
    response.content_type = PLAIN["Content-Type"]
    if error.code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def not_lock_holder(error: NotLockHolder) -> BaseResponse:
    """Answer 401 to a job token that is not the job's lock."""
    return plain_error(
        Unauthorized(
            "the token is not this job's lock token: the lock expired or moved, "
            "the job finished, or the token is wrong"
        )
    )


def no_such_job(error: NoSuchJob) -> Response:
    """Answer 404 for a job that is not there."""
    return Response(f"job {error.job_id!r} not found in queue {error.queue!r}", 404, PLAIN)


def cross_slot(error: CrossSlot) -> Response:
    """Answer 400 for a queue whose keys a Redis Cluster cannot handle together."""
    return Response(
        "on Redis Cluster a queue's keys must share one slot: give QUEUE_PREFIX a hash tag "
        "({bull}) or put one in the queue name ({orders})",
        400,
        PLAIN,
    )


# Who holds too many streams, and the setting that says how many it may.
STREAM_CREDENTIALS = {
    "api": ("this API token", "MAX_STREAMS_PER_TOKEN"),
    "watch": ("this watch token", "MAX_STREAMS_PER_WATCH_TOKEN"),
}


def too_many_streams(error: TooManyStreams) -> Response:
    """Answer 429 to a credential at its limit of open streams, 503 when this worker is
    at its own: at once, before the stream costs anything."""
    if error.kind is not None:
        who, setting = STREAM_CREDENTIALS[error.kind]
        message = (
            f"{who} holds its most open streams of events here ({setting}={error.limit}): "
            "close one, then retry"
        )
        return Response(message, 429, {"Retry-After": "10", **PLAIN})
    message = (
        f"this worker holds its most streams of events (MAX_STREAMS={error.limit}); retry shortly"
    )
    return Response(message, 503, {"Retry-After": str(RETRY_MS // 1000), **PLAIN})


# Redis trouble answers 503: the caller may retry, and the pool reconnects by itself.
REDIS_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    # The Redis user may not run a command, or touch a key: its ACL is short of what
    # the service needs (deploy/redis-acl.conf).
    redis.exceptions.NoPermissionError,
    # A cluster that is failing over, resharding, or missing a slot's master.
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterException,
)


# What to fix, where the error is the settings' or the Redis user's, not an outage.
REDIS_ERROR_HINTS = (
    (redis.exceptions.AuthenticationError, " (check REDIS_USERNAME and REDIS_PASSWORD)"),
    (
        redis.exceptions.NoPermissionError,
        " (grant the Redis user what deploy/redis-acl.conf grants)",
    ),
)


def redis_unavailable(error: redis.exceptions.RedisError) -> Response:
    """Answer 503 while Redis cannot be reached; the pool reconnects by itself."""
    REDIS_ERRORS.labels(type(error).__name__).inc()
    log.warning(
        "Redis unavailable for %s %s (API token %s, request %s): %s%s",
        request.method,
        loggable(request.path),
        loggable(request.environ.get(TOKEN_NAME, "-")),
        request.environ.get("HTTP_X_REQUEST_ID", "-"),
        error,
        next((hint for kind, hint in REDIS_ERROR_HINTS if isinstance(error, kind)), ""),
    )
    return Response(
        "Redis is unavailable; retry shortly",
        503,
        {"Retry-After": "1", **PLAIN},
    )


# ------------------------------------------------------------------ access log

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
    return loggable(text.encode("latin-1").decode("utf-8", "surrogateescape"))


# A watch token in a query string is logged as "token=-": whoever reads the log must not
# be able to open the stream.
WATCH_TOKEN = re.compile(r"(?<![^&])token=[^&]*")

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
                + (loggable_wsgi(f"?{WATCH_TOKEN.sub('token=-', query)}") if query else ""),
                status,
                seconds * 1000,
                request_id,
                loggable(environ.get(TOKEN_NAME, "-")),
                extra={"fields": ACCESS_FIELDS},
            )
            if self.metrics:
                count_request(environ, method, status, seconds, response_bytes)


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
        return json.dumps(entry, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """Return the record's time in ISO 8601, to the millisecond, with its offset."""
        moment = datetime.datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------- metrics

# In prometheus_client's default registry. Under gunicorn each worker writes its figures
# to files in PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py), and /metrics adds them up.
# Routes are labelled by their template, never by the path: queue names and job ids
# would make a new series each.
REQUESTS = Counter(
    "bullmq_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
DURATION = Histogram(
    "bullmq_http_request_duration_seconds",
    "Time from a request's arrival in the app to its response, by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SIZES = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
REQUEST_BYTES = Histogram(
    "bullmq_http_request_body_bytes",
    "Request bodies as declared (Content-Length), by route template.",
    ["route"],
    buckets=SIZES,
)
RESPONSE_BYTES = Histogram(
    "bullmq_http_response_body_bytes",
    "Response bodies, by route template.",
    ["route"],
    buckets=SIZES,
)
REDIS_ERRORS = Counter(
    "bullmq_http_redis_errors",
    "Redis errors, each answered 503, by kind (the redis-py exception's name).",
    ["kind"],
)
SCRIPT_OUTCOMES = Counter(
    "bullmq_http_script_outcomes",
    "Scripts run on a job's keys, by script and outcome: written or read, "
    "not_lock_holder, no_such_job.",
    ["script", "outcome"],
)
OPEN_STREAMS = Gauge(
    "bullmq_http_open_event_streams",
    "Event streams open now (GET .../events).",
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter(
    "bullmq_http_worker_restarts",
    "gunicorn workers that exited and were replaced, whatever the reason.",
)
# Where note_route leaves the matched route's template; a request no route matched (404,
# 405) is labelled "unmatched".
ROUTE = "bullmq_http.route"
UNMATCHED = "unmatched"


def note_route(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Leave the matched route's template in the environ, where count_request finds it
    after Flask has let go of the request; first of the URL value preprocessors, so that
    a request one of them refuses is labelled with its route too."""
    rule = request.url_rule
    if rule is not None:
        request.environ[ROUTE] = rule.rule


def counted_stream(events: Iterator[bytes]) -> Iterator[bytes]:
    """Pass a stream's events on, counting it among the open streams while it lasts."""
    OPEN_STREAMS.inc()
    try:
        yield from events
    finally:
        OPEN_STREAMS.dec()


def count_request(
    environ: dict[str, Any], method: str, status: str, seconds: float, response_bytes: str
) -> None:
    """Count one answered request in the metrics."""
    route = environ.get(ROUTE, UNMATCHED)
    if method not in KNOWN_METHODS:
        method = "other"  # a label per made-up method would be a new series each
    request_count(route, method, status).inc()
    duration, request_size, response_size = route_metrics(route)
    duration.observe(seconds)
    declared = environ.get("CONTENT_LENGTH") or "0"
    request_size.observe(int(declared) if declared.isdigit() else 0)
    response_size.observe(int(response_bytes) if response_bytes.isdigit() else 0)


KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


# A labelled series is looked up once per process, not per request (half the cost of
# counting one); routes, methods and statuses are few, so these stay small.
@functools.cache
def request_count(route: str, method: str, status: str) -> Counter:
    """Return the request counter of one route, method and status."""
    return REQUESTS.labels(route, method, status)


@functools.cache
def script_outcome(script: str, outcome: str) -> Counter:
    """Return the counter of one script's outcome."""
    return SCRIPT_OUTCOMES.labels(script, outcome)


@functools.cache
def route_metrics(route: str) -> tuple[Histogram, Histogram, Histogram]:
    """Return the duration, request size and response size histograms of one route."""
    return DURATION.labels(route), REQUEST_BYTES.labels(route), RESPONSE_BYTES.labels(route)


# ------------------------------------------------------------------------- app


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service: defaults, then environment variables, then `config`."""
    app = Flask(__name__, static_folder=None)
    app.config.update(DEFAULTS)
    app.config.update(settings_from_env(os.environ))
    app.config.update(config or {})
    if app.config["MAX_STREAMS"] is None:
        app.config["MAX_STREAMS"] = default_max_streams(app.config)
    check_settings(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]
    tokens = app.extensions["bullmq_http.tokens"] = api_tokens(app.config)
    if not len(tokens.current):
        log.warning("no API token configured (AUTH_TOKENS): GET logs will answer 401")

    app.extensions["openapi"] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    job_store = app.extensions["bullmq_http"] = JobStore(
        functools.partial(redis_client, dict(app.config)),
        app.config["QUEUE_PREFIX"],
        app.config["MAX_LOGS_PER_JOB"],
        cluster=app.config["REDIS_CLUSTER"],
        max_page_bytes=app.config["MAX_PAGE_BYTES"],
    )
    app.extensions["bullmq_http.watcher"] = Watcher(
        functools.partial(watcher_client, dict(app.config)),
        job_store.key,
        # Its XREAD waits at most 250 ms, and at most half its socket's REDIS_TIMEOUT.
        block_ms=max(1, min(250, int(app.config["REDIS_TIMEOUT"] * 500))),
    )
    app.extensions["bullmq_http.stream_limits"] = StreamLimits(
        app.config["MAX_STREAMS"],
        per_api_token=app.config["MAX_STREAMS_PER_TOKEN"],
        per_watch_token=app.config["MAX_STREAMS_PER_WATCH_TOKEN"],
    )
    if app.config["METRICS"]:
        app.url_value_preprocessor(note_route)
    app.register_blueprint(jobs)
    app.register_blueprint(health)
    app.register_blueprint(docs)
    app.register_error_handler(HTTPException, plain_error)
    app.register_error_handler(NotLockHolder, not_lock_holder)
    app.register_error_handler(NoSuchJob, no_such_job)
    app.register_error_handler(CrossSlot, cross_slot)
    app.register_error_handler(TooManyStreams, too_many_streams)
    for error in REDIS_UNAVAILABLE:
        app.register_error_handler(error, redis_unavailable)

    hops = app.config["TRUSTED_PROXIES"]
    if hops:
        # Each proxy appends the address it saw to X-Forwarded-For: believe that many
        # entries. The scheme and mount prefix are set (not appended) by the nearest.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=1, x_prefix=1)  # type: ignore[method-assign]
    app.wsgi_app = AccessLog(app.wsgi_app, metrics=app.config["METRICS"])  # type: ignore[method-assign]
    return app
