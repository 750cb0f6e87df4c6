"""BullMQ job progress and logs over HTTP: the service's HTTP face, and nothing else.

Its routes come in three products, a blueprint each: reporting (workers report on the
job they hold, by its lock token; dashboards read its logs and progress, by an API
token), watching (streams of a job's events, watch tokens, and the watch page with
its session) and operations (health, readiness, metrics, the OpenAPI document). The
README's API section and openapi.yaml say what each route takes and answers.

It reads top-down: the token decorators; the views, product by product; the request
parsing they call; the service's parts; the error handlers; and create_app, which
wires them together. What is not about HTTP lives beside it, in the bullmq_http package.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import redis
import yaml
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    g,
    render_template,
    request,
    send_from_directory,
)
from werkzeug.exceptions import HTTPException, Unauthorized
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response as BaseResponse

from bullmq_http import js_json, metrics
from bullmq_http.access_log import RECORD, AccessLog, RequestRecord, loggable
from bullmq_http.event_reader import PAGE, EventReader
from bullmq_http.event_stream import RETRY_MS, event_stream, parse_cursor
from bullmq_http.layout import text
from bullmq_http.lifecycle import JobLife, NotActive
from bullmq_http.redis_link import UNAVAILABLE, error_hint, event_reader_client, redis_client
from bullmq_http.routes import JOB_ROUTES, JobRouteMap
from bullmq_http.settings import (
    DEFAULTS,
    check_settings,
    default_max_streams,
    read_secret_files,
    settings_from_env,
    whole_number,
)
from bullmq_http.store import CrossSlot, JobStore, NoSuchJob, NotBullmqLayout, NotLockHolder
from bullmq_http.stream_limits import StreamLimits, TooManyStreams
from bullmq_http.tokens import (
    NOT_THIS_JOB,
    READ,
    WORK,
    ApiTokens,
    BadWatchToken,
    MintingLimit,
    WatchToken,
    check_session_token,
    check_watch_token,
    session_token,
    watch_token,
)

log = logging.getLogger(__name__)

# Workers report on the job they hold; dashboards read it.
reporting = Blueprint("reporting", __name__, url_prefix=JOB_ROUTES)
# Workers over HTTP: claim a job, keep its lock, complete or fail it.
working = Blueprint("working", __name__)
# Streams of events, watch tokens, and the watch page with its session.
watching = Blueprint("watching", __name__, url_prefix=JOB_ROUTES)
# Probes and tools: health, readiness, metrics, the OpenAPI document.
operations = Blueprint("operations", __name__)

PLAIN = {"Content-Type": "text/plain; charset=utf-8"}
JSON = "application/json"
# The cookie a watch page exchanges its link's token for (POST .../watch/session).
WATCH_COOKIE = "bullmq_watch"

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


def api_token_required(right: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Let the request through only with an API token that has the right (READ, or
    WORK: claim the queue's jobs, as a BullMQ worker does) on the route's queue."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(**kwargs: Any) -> Any:
            check_api_token(kwargs.get("queue"), right)
            return view(**kwargs)

        return wrapper

    return decorator


def watch_or_api_token_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Let the request through with a watch token for the route's job, or else an API
    token that may read its queue. A watch token comes as ?token= (what a browser's
    EventSource can send), or in the cookie a watch page exchanged its link for."""

    @functools.wraps(view)
    def wrapper(**kwargs: Any) -> Any:
        queue, job_id = kwargs["queue"], kwargs["job_id"]
        token = request.args.get("token")
        if token is not None:
            g.watch_token = valid_watch_token(token, queue, job_id)
        elif "Authorization" not in request.headers and WATCH_COOKIE in request.cookies:
            g.watch_token = g.watch_session = cookie_session(queue, job_id)
        else:
            check_api_token(kwargs.get("queue"))
            return view(**kwargs)
        request_record().credential = "watch-token"
        return view(**kwargs)

    return wrapper


# The refusal of a bearer token that is no API token: a job's lock token, most often.
WRONG_CREDENTIAL = (
    "not a valid API token: this route takes an API token (AUTH_TOKENS), not a job's lock token"
)


def check_api_token(queue: str | None, right: str = READ) -> None:
    """Stop with 401 unless the request has a valid API token, 403 unless it has the
    right (READ, WORK) on the queue."""
    tokens = service().tokens
    token = tokens.find(bearer_token())
    if token is None:
        if not len(tokens.current):
            abort(401, "this server has no API token configured (AUTH_TOKENS)")
        abort(401, WRONG_CREDENTIAL)
    request_record().credential = token.name
    g.api_token = token
    if queue is not None and not token.may(right, queue):
        doing = "read" if right == READ else "work jobs of"
        abort(403, f"this token may not {doing} queue {queue!r}")


def cookie_session(queue: str, job_id: str) -> WatchToken:
    """Return what the page's session cookie grants on this job; of several (another
    job's whose Path is a prefix of this job's comes too, as a cut Path is), the first
    that opens this job. Stop with 401 if none does."""
    secret, longest = watch_secret()
    refusal = NOT_THIS_JOB
    for cookie in request.cookies.getlist(WATCH_COOKIE):
        try:
            return check_session_token(secret, cookie, queue, job_id, longest)
        except BadWatchToken as error:
            refusal = str(error)
    abort(401, refusal)


def valid_watch_token(token: str, queue: str, job_id: str) -> WatchToken:
    """Return the token, if it is an unexpired watch token of this job; else stop with
    401."""
    secret, longest = watch_secret()
    try:
        return check_watch_token(secret, token, queue, job_id, longest)
    except BadWatchToken as error:
        abort(401, str(error))


def watch_secret() -> tuple[str, int]:
    """Return the watch tokens' secret and WATCH_TOKEN_MAX_SECONDS; stop with 401 when
    watch tokens are off."""
    secret = current_app.config["WATCH_TOKEN_SECRET"]
    if not secret:
        abort(401, "watch tokens are off on this server (WATCH_TOKEN_SECRET)")
    return secret, current_app.config["WATCH_TOKEN_MAX_SECONDS"]


# ------------------------------------------------------------------------ views


@working.url_value_preprocessor
@watching.url_value_preprocessor
@reporting.url_value_preprocessor
def check_queue_name(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Refuse queue names that BullMQ would refuse, before any other work."""
    queue = (values or {}).get("queue", "")
    config = current_app.config
    low, high = config["MIN_QUEUE_NAME_LENGTH"], config["MAX_QUEUE_NAME_LENGTH"]
    if not low <= len(queue) <= high:
        abort(400, f"the queue name must be {low} to {high} characters long")
    if ":" in queue:
        abort(400, "the queue name must not contain ':'")


# ------------------------------------------------------------- views: reporting


@reporting.post("/progress")
@with_job_token
def set_progress(queue: str, job_id: str, token: bytes) -> Response:
    """Set the progress of the job the caller holds."""
    service().store.write_progress(queue, job_id, token, progress_json(request_body()))
    return ok()


@reporting.post("/logs")
@with_job_token
def add_log(queue: str, job_id: str, token: bytes) -> Response:
    """Append one line to the logs of the job the caller holds."""
    service().store.append_log(queue, job_id, token, log_line(request_body()))
    return ok()


@reporting.get("/logs")
@watch_or_api_token_required
def read_logs(queue: str, job_id: str) -> Response:
    """Return one page of a job's logs, oldest first unless order=desc; a watch token
    or the page's session reads them as an API token does (the page reads earlier
    lines so)."""
    no_query_parameters_but(("start", "length", "order", "token"))
    start = query_number("start", 0, parse_start)
    length = query_number("length", 10, parse_length)
    order = request.args.get("order", "asc")
    if order not in ("asc", "desc"):
        abort(400, "order must be asc or desc")
    count, lines = service().store.page_of_logs(
        queue, job_id, start, length, newest_first=order == "desc"
    )
    return json_answer({"count": count, "logs": [text(line) for line in lines]})


@reporting.get("/progress")
@api_token_required(READ)
def read_progress(queue: str, job_id: str) -> Response:
    """Return a job's progress as stored, or 0 when it was never set, as BullMQ reads it."""
    no_query_parameters_but(())
    progress = service().store.stored_progress(queue, job_id)
    return Response(b"0" if progress is None else progress, content_type=JSON)


# --------------------------------------------------------------- views: working


@working.post("/queues/<queue>/claim")
@api_token_required(WORK)
def claim_job(queue: str) -> Response:
    """Move the queue's next job to active for the caller, as a BullMQ worker takes one,
    and answer it with its lock token; 204 when no job is ready."""
    no_query_parameters_but(("wait",))
    longest = current_app.config["MAX_CLAIM_WAIT_SECONDS"]
    seconds = query_number("wait", 0, whole_number(0, longest))
    lock_ms, first = claim_request(request_body())
    parts = service()
    if first is not None:
        # The job the caller finished, completed in the same round trip as the claim.
        claimed = parts.job_life.complete_and_claim(queue, *first, lock_ms)
        if claimed is not None or not seconds:
            return Response(status=204) if claimed is None else json_answer(claimed.answer())
    if not seconds:
        claimed = parts.job_life.claim(queue, lock_ms)
    else:
        # A waiting claim holds a connection as a stream does, and is counted with them.
        give_back = parts.stream_limits.take(("claim", g.api_token.identity))
        try:
            client = request.environ.get("gunicorn.socket")
            claimed = parts.job_life.claim_waiting(queue, lock_ms, seconds, client)
        finally:
            give_back()
    if claimed is None:
        return Response(status=204)
    return json_answer(claimed.answer())


@working.post(f"{JOB_ROUTES}/lock")
@with_job_token
def extend_lock(queue: str, job_id: str, token: bytes) -> Response:
    """Extend the lock of the job the caller holds, as BullMQ's worker does."""
    no_query_parameters_but(())
    options = json_options(request_body(), {"duration": parse_lock_ms})
    lock_token = token.decode("latin-1")
    service().job_life.extend_lock(queue, job_id, lock_token, options.get("duration"))
    return ok()


@working.post(f"{JOB_ROUTES}/complete")
@with_job_token
def complete_job(queue: str, job_id: str, token: bytes) -> Response:
    """Complete the job the caller holds, the body its return value (JSON; none: null)."""
    no_query_parameters_but(())
    body = request_body()
    returnvalue = stringified(body, "the return value") if body.strip() else "null"
    service().job_life.complete(queue, job_id, token.decode("latin-1"), returnvalue)
    return ok()


@working.post(f"{JOB_ROUTES}/fail")
@with_job_token
def fail_job(queue: str, job_id: str, token: bytes) -> Response:
    """Fail the job the caller holds, as BullMQ's worker fails one: retried while it has
    attempts left, else failed; answer which, and the delay before the retry."""
    no_query_parameters_but(())
    failure = failure_report(request_body())
    outcome = service().job_life.fail(queue, job_id, token.decode("latin-1"), **failure)
    return json_answer({"state": outcome.state, "delay": outcome.delay})


# -------------------------------------------------------------- views: watching


@watching.get("/events")
@watch_or_api_token_required
def job_events(queue: str, job_id: str) -> Response:
    """Stream a job's progress and log lines as server-sent events, as they happen."""
    no_query_parameters_but(("tail", "token", "last_event_id"))
    tail = query_number("tail", 10, parse_tail)
    resume = None
    # A browser's own reconnect sends the header; a page that opens a new EventSource
    # cannot, and puts the id in the query. The header, the newer, wins.
    last_event_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if last_event_id:
        resume = parse_cursor(last_event_id)
        if resume is None:
            abort(400, "Last-Event-ID must be the id of an event this service sent")
    parts = service()
    watch: WatchToken | None = g.get("watch_token")
    if watch is None:
        until = None
        give_back = parts.stream_limits.take(("api", g.api_token.identity))
    else:
        # A stream opened with a watch token ends when the token expires, and counts
        # against the API token that minted it as well as against itself.
        until = time.monotonic() + (watch.expires - time.time())
        minter = () if watch.minter is None else (("api", watch.minter),)
        give_back = parts.stream_limits.take(("watch", watch.share), *minter)
    try:
        state = parts.store.job_state(queue, job_id)
        # gunicorn hands over the client's socket: a stream sees its client hang up.
        client = request.environ.get("gunicorn.socket")
        events = event_stream(
            parts.store, parts.event_reader, queue, job_id, state, tail, resume, until, client
        )
        response = Response(
            metrics.counted_stream(events),
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


@watching.after_request
def allow_watching_pages(response: Response) -> Response:
    """Let a page on an allowed origin (WATCH_ALLOWED_ORIGINS) read the stream it opens
    with a watch token, the preflight of its reconnects included; an API token's
    answers never carry CORS headers: a browser must never hold one."""
    allowed = current_app.config["WATCH_ALLOWED_ORIGINS"]
    if not allowed or request.endpoint != "watching.job_events":
        return response
    response.vary.add("Origin")
    origin = request.headers.get("Origin")
    if origin in allowed and "token" in request.args:
        response.headers["Access-Control-Allow-Origin"] = origin
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET"
            response.headers["Access-Control-Allow-Headers"] = "Last-Event-ID"
            response.headers["Access-Control-Max-Age"] = "600"
    return response


@watching.get("/watch")
def watch_page(queue: str, job_id: str) -> Response:
    """Serve the page that shows one job live to whoever holds its watch link
    (`watch#token=...`). It holds no job data: its script reads the job with the
    link's token, which stays in the URL's fragment, out of every server's log."""
    no_query_parameters_but(())
    response = current_app.response_class(
        render_template("watch.html", queue=queue, job_id=job_id), mimetype="text/html"
    )
    ancestors = " ".join(sorted(current_app.config["WATCH_FRAME_ANCESTORS"])) or "'none'"
    response.headers.update(
        {
            "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
            "style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
            f"form-action 'none'; frame-ancestors {ancestors}",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    return response


# The page's own files, beside it: found from any proxy's prefix, with no setting.
PAGE_FILES = Path(__file__).with_name("static")


@watching.get("/<any('watch.css', 'watch.js'):name>")
def watch_page_file(queue: str, job_id: str, name: str) -> Response:
    """Serve the watch page's style or script; the same for every job."""
    no_query_parameters_but(())
    response = send_from_directory(PAGE_FILES, name, max_age=300)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@watching.post("/watch/session")
def start_watching(queue: str, job_id: str) -> Response:
    """Exchange a watch token (the body: what a page took from its link's #token=) for
    a session: an HttpOnly cookie that opens this job's events and plain-text logs with
    no token in any URL the page asks for; answer what watched_job does."""
    no_query_parameters_but(())
    token = request_body().decode("ascii", "replace").strip()
    watch = valid_watch_token(token, queue, job_id)
    return with_session(job_summary(queue, job_id, watch.expires), queue, job_id, watch)


@watching.get("/watch/session")
@watch_or_api_token_required
def watched_job(queue: str, job_id: str) -> Response:
    """Return the job a page watches: its name and state, and when its watch token
    expires (null for an API token); a page's session cookie is renewed."""
    no_query_parameters_but(("token",))
    watch: WatchToken | None = g.get("watch_token")
    summary = job_summary(queue, job_id, None if watch is None else watch.expires)
    session = g.get("watch_session")
    if session is None:
        return json_answer(summary)
    return with_session(summary, queue, job_id, session)


def with_session(summary: dict[str, Any], queue: str, job_id: str, watch: WatchToken) -> Response:
    """Answer a job's summary with a new session cookie for it, opened with `watch`:
    it lasts WATCH_SESSION_SECONDS (never past the watch token), and the answer says
    for how long, so that a page open longer renews it in time."""
    secret = current_app.config["WATCH_TOKEN_SECRET"]
    seconds = current_app.config["WATCH_SESSION_SECONDS"]
    session, ends = session_token(secret, queue, job_id, watch, seconds)
    lasts = max(1, ends - int(time.time()))
    response = json_answer({**summary, "session_seconds": lasts})
    response.set_cookie(
        WATCH_COOKIE,
        session,
        max_age=lasts,
        path=job_cookie_path(queue, job_id),
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )
    return response


def job_summary(queue: str, job_id: str, expires: int | None) -> dict[str, Any]:
    """Return a job's queue, id, name, state and times (BullMQ's, in milliseconds since
    the epoch), and when a watch token expires."""
    state = service().store.job_state(queue, job_id)
    times, attempts = state.times, state.attempts
    return {
        "queue": queue, "id": job_id, "name": state.name, "state": state.status,
        "timestamp": times.added, "processedOn": times.processed, "finishedOn": times.finished,
        "attemptsMade": attempts.made, "attemptsStarted": attempts.started,
        "attempts": attempts.allowed, "failedReason": attempts.failed_reason,
        "expires": expires, "session_seconds": None,
    }  # fmt: skip


@watching.get("/logs.txt")
@watch_or_api_token_required
def logs_as_text(queue: str, job_id: str) -> Response:
    """Return all of a job's log lines as text, a line each, oldest first."""
    no_query_parameters_but(("token",))
    job_store = service().store
    first = job_store.log_page(queue, job_id, 0, PAGE)  # 404 for a missing job

    def lines() -> Iterator[bytes]:
        """The lines a page at a time, each page within MAX_PAGE_BYTES."""
        page, start = first, 0
        while page:
            yield b"".join(line + b"\n" for line in page)
            start += len(page)
            try:
                page = job_store.log_page(queue, job_id, start, PAGE)
            except LookupError:
                return  # removed meanwhile: what was there is sent

    filename = quote(f"{queue}-{job_id}.log", safe="")
    return current_app.response_class(
        lines(),
        mimetype="text/plain",
        headers={
            "Content-Disposition": f"attachment; filename*=UTF-8''{filename}",
            # Never run as a script, nor read by a page of another origin (<script src>).
            "X-Content-Type-Options": "nosniff",
            "Cross-Origin-Resource-Policy": "same-origin",
        },
    )


@watching.post("/events/token")
@api_token_required(READ)
def mint_watch_token(queue: str, job_id: str) -> Response:
    """Return a token that opens this job's events and nothing else, for `seconds`
    (by default WATCH_TOKEN_SECONDS, at most WATCH_TOKEN_MAX_SECONDS)."""
    no_query_parameters_but(("seconds",))
    secret = current_app.config["WATCH_TOKEN_SECRET"]
    if not secret:
        abort(404, "watch tokens are off: set WATCH_TOKEN_SECRET, the same on every instance")
    longest = current_app.config["WATCH_TOKEN_MAX_SECONDS"]
    default = min(current_app.config["WATCH_TOKEN_SECONDS"], longest)
    seconds = query_number("seconds", default, whole_number(1, longest))
    wait = service().minting.take(g.api_token.identity)
    if wait:
        message = (
            "this API token has minted its most watch tokens for now "
            f"(WATCH_TOKENS_PER_MINUTE={current_app.config['WATCH_TOKENS_PER_MINUTE']}): "
            "retry after Retry-After seconds, or hand out the tokens already minted"
        )
        abort(Response(message, 429, {"Retry-After": str(math.ceil(wait)), **PLAIN}))
    expires = int(time.time()) + seconds
    token = watch_token(secret, queue, job_id, expires, minter=g.api_token.identity)
    return json_answer({"token": token, "expires": expires})


# ------------------------------------------------------------ views: operations


@operations.get("/healthz")
def healthz() -> Response:
    """Answer that the process is alive, touching nothing else."""
    return ok()


@operations.get("/readyz")
def readyz() -> Response:
    """Answer whether Redis answers, and the event reader does its work."""
    parts = service()
    parts.store.ping()
    trouble = parts.event_reader.trouble()
    if trouble is not None:
        abort(503, trouble)
    return ok()


@operations.get("/metrics")
def prometheus_metrics() -> Response:
    """Return the service's metrics in Prometheus's text format, every worker's added up."""
    if not current_app.config["METRICS"]:
        abort(404, "metrics are turned off (METRICS=0)")
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


OPENAPI = Path(__file__).with_name("openapi.yaml")


@operations.get("/openapi.json")
def openapi() -> Response:
    """Return the OpenAPI description, its server URL where the caller reached us."""
    return json_answer({**service().openapi, "servers": [{"url": request.script_root or "/"}]})


# ------------------------------------------------------------------------ input


# start stops at JavaScript's largest safe integer: BullMQ's clients cannot page past it.
parse_start = whole_number(0, 2**53 - 1)
parse_length = whole_number(1, 100)
parse_tail = whole_number(0, 1000)


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
    value = request.args.get(name)
    if value is None:
        return default
    try:
        return parse(value)
    except ValueError as error:
        abort(400, f"{name} {error}")


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
    environ = request.environ
    if declared is None and not environ.get("wsgi.input_terminated"):
        return b""
    try:
        body = environ["wsgi.input"].read(limit + 1 if declared is None else declared)
    except TimeoutError:
        abort(408, "the body did not arrive in time (REQUEST_TIMEOUT): send it at once")
    except ValueError as error:  # the server could not parse it: a malformed chunk
        abort(400, str(error))
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
        return js_json.parse(body)
    except ValueError as error:
        abort(400, f"{what} {error}")


def progress_json(body: bytes) -> bytes:
    """Return the request's progress as JSON.stringify would write it, or stop with a 4xx."""
    limit = current_app.config["MAX_PROGRESS_BYTES"]
    too_large = f"the progress is larger than {limit} bytes (MAX_PROGRESS_BYTES)"
    if len(body) > limit:  # refused before the cost of parsing it
        abort(413, too_large)
    try:
        written = js_json.stringify(parse_json(body, "the progress"))
    except RecursionError:  # read, but too deep to write again
        abort(400, f"the progress {js_json.TOO_DEEP}")
    # A lone surrogate cannot be UTF-8; JSON.stringify writes it as an escape, as here.
    stored = written.encode("utf-8", "backslashreplace")
    if len(stored) > limit:  # a number such as 1e20 is longer written out
        abort(413, too_large)
    return stored


parse_lock_ms = whole_number(1, 24 * 3600 * 1000)
parse_delay_ms = whole_number(0, 2**53 - 1)


def json_options(body: bytes, known: dict[str, Callable[[str], int]]) -> dict[str, int]:
    """Return the options of an optional JSON object body, each a whole number its
    parser accepts; stop with a 400 saying what is wrong."""
    if not body.strip():
        return {}
    options = parse_json(body, "the body")
    if not isinstance(options, dict) or not options.keys() <= known.keys():
        names = ", ".join(f'"{name}"' for name in known)
        abort(400, f"the body must be a JSON object with at most {names}")
    return whole_numbers(options, known)


def whole_numbers(
    options: dict[str, Any], known: dict[str, Callable[[str], int]]
) -> dict[str, int]:
    """Return options of a JSON body, each a whole number its parser accepts; stop with
    a 400 saying which is wrong."""
    parsed = {}
    for name, value in options.items():
        try:
            parsed[name] = known[name](js_json.stringify(value))
        except ValueError as error:
            abort(400, f"{name} {error}")
    return parsed


def claim_request(body: bytes) -> tuple[int | None, tuple[str, str, str] | None]:
    """Return what a claim's optional JSON body asks: its lockDuration, and the job the
    caller finished to complete first (its id, lock token and return value as
    JSON.stringify writes it); or stop with a 400."""
    if not body.strip():
        return None, None
    asked = parse_json(body, "the body")
    if not isinstance(asked, dict) or not asked.keys() <= {"lockDuration", "complete"}:
        abort(400, 'the body must be a JSON object with at most "lockDuration" and "complete"')
    numbers = {name: value for name, value in asked.items() if name != "complete"}
    lock_ms = whole_numbers(numbers, {"lockDuration": parse_lock_ms}).get("lockDuration")
    done = asked.get("complete")
    if done is None:
        return lock_ms, None
    if (
        not isinstance(done, dict)
        or not done.keys() <= {"id", "token", "returnvalue"}
        or not all(isinstance(done.get(name), str) and done[name] for name in ("id", "token"))
    ):
        abort(400, 'complete must be {"id": "...", "token": "...", "returnvalue": ...}')
    try:
        returnvalue = js_json.stringify(done.get("returnvalue"))
    except RecursionError:
        abort(400, f"the return value {js_json.TOO_DEEP}")
    return lock_ms, (done["id"], done["token"], returnvalue)


def stringified(body: bytes, what: str) -> str:
    """Return a body's JSON as JSON.stringify would write it, or stop with a 400."""
    try:
        return js_json.stringify(parse_json(body, what))
    except RecursionError:  # read, but too deep to write again
        abort(400, f"{what} {js_json.TOO_DEEP}")


def failure_report(body: bytes) -> dict[str, Any]:
    """Return why a job failed, as fail_job's body says it: a JSON object (`reason`,
    and `retry`, `delay`, `stack` if given), or else the reason as plain text."""
    if not request.is_json:
        return {"reason": text_body(body, "the reason")}
    report = parse_json(body, "the body")
    known = {"reason", "retry", "delay", "stack"}
    if not isinstance(report, dict) or not report.keys() <= known or "reason" not in report:
        abort(400, 'the body must be {"reason": "...", "retry": true|false, "delay": ms}')
    reason, retry = report["reason"], report.get("retry", True)
    if not isinstance(reason, str) or not reason:
        abort(400, "the reason must be a JSON string, not empty")
    if not isinstance(retry, bool):
        abort(400, "retry must be true or false")
    failure: dict[str, Any] = {"reason": reason, "retry": retry}
    if "delay" in report:
        try:
            failure["delay_ms"] = parse_delay_ms(js_json.stringify(report["delay"]))
        except ValueError as error:
            abort(400, f"delay {error}")
    if "stack" in report:
        if not isinstance(report["stack"], str):
            abort(400, "stack must be a JSON string")
        failure["stack"] = report["stack"]
    return failure


def text_body(body: bytes, what: str) -> str:
    """Return a plain-text body, or stop with a 400 when it is empty or not UTF-8."""
    try:
        value = body.decode("utf-8")
    except UnicodeDecodeError:
        abort(400, f"{what} is not valid UTF-8")
    if not value.strip():
        abort(400, f"{what} is empty")
    return value


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


def job_cookie_path(queue: str, job_id: str) -> str:
    """Return the path a job's watch cookie is sent for: the job's routes as the page
    says its browser addresses them (X-Watch-Path), else as the client wrote them
    (behind a proxy that re-encodes paths, not as the browser does: nginx's proxy_pass
    does), up to the last slash before any character a cookie's Path cannot hold."""
    said = request.headers.get("X-Watch-Path", "")
    if said.startswith("/") and unquote(said).endswith(f"/queues/{queue}/jobs/{job_id}/"):
        base = said
    elif raw := request.environ.get("RAW_URI"):  # gunicorn's: the path as sent
        base = request.script_root + raw.partition("?")[0].removesuffix("watch/session")
    else:
        base = (
            f"{request.script_root}/queues/{quote(queue, safe='')}/jobs/{quote(job_id, safe='')}/"
        )
    # A ';' or a control character would end the Path, or start another attribute; the
    # browser sends a cookie to every path its Path is a prefix of.
    cut = COOKIE_PATH_END.search(base)
    return base if cut is None else base[: base.rindex("/", 0, cut.start()) + 1]


# What a cookie's Path cannot hold (RFC 6265: no control characters, no ';').
COOKIE_PATH_END = re.compile(r"[\x00-\x20;\x7f-\uffff]")


def ok() -> Response:
    """Answer 200 with the text OK."""
    return Response(b"OK", content_type=PLAIN["Content-Type"])


def json_answer(value: Any) -> Response:
    """Answer 200 with a value as compact JSON, text as it is (not \\u-escaped)."""
    return Response(js_json.compact(value), content_type=JSON)


# ------------------------------------------------------------------------ parts


@dataclass(frozen=True)
class Service:
    """The parts of one app's service, kept in app.extensions["bullmq_http"]."""

    tokens: ApiTokens
    store: JobStore
    event_reader: EventReader
    stream_limits: StreamLimits
    minting: MintingLimit
    job_life: JobLife
    openapi: dict[str, Any]  # openapi.yaml, read once

    def close(self) -> None:
        """End the streams and the event reader, then close the Redis connections; used on
        any number of apps of a process, as tests make them."""
        self.event_reader.stop()
        self.job_life.stop()
        self.event_reader.join(10)  # it closes its own connection on the way out
        self.store.close()


def service() -> Service:
    """Return the current app's service parts."""
    parts: Service = current_app.extensions["bullmq_http"]
    return parts


def request_record() -> RequestRecord:
    """Return the record of the current request, which its access line and its metrics
    are written from once it is answered."""
    record: RequestRecord = request.environ[RECORD]
    return record


# ---------------------------------------------------------------------- errors


def plain_error(error: HTTPException) -> BaseResponse:
    """Render an HTTP error as its plain-text reason, keeping headers such as Allow."""
    response = error.get_response()
    response.set_data(error.description or "")
    response.content_type = PLAIN["Content-Type"]
    if error.code == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def not_active(error: NotActive) -> Response:
    """Answer 409 to a move BullMQ refuses for the job's state; the message says which."""
    return Response(str(error), 409, PLAIN)


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


def not_bullmq_layout(error: NotBullmqLayout) -> Response:
    """Answer 409 where a key holds something BullMQ would not have written there: the
    request cannot be served until the key is mended, and no retry helps."""
    log.warning("%s is not in BullMQ's layout: %s %s answered 409", error.key,
                request.method, loggable(request.path))  # fmt: skip
    message = f"{error.key} holds another type than BullMQ's layout gives it: mend or delete it"
    return Response(message, 409, PLAIN)


# Who holds too many streams, and the setting that says how many it may.
STREAM_CREDENTIALS = {
    "api": ("this API token", "MAX_STREAMS_PER_TOKEN"),
    "watch": ("this watch token", "MAX_STREAMS_PER_WATCH_TOKEN"),
    "claim": ("this API token", "MAX_WAITING_CLAIMS_PER_TOKEN"),
}


def too_many_streams(error: TooManyStreams) -> Response:
    """Answer 429 to a credential at its limit of open streams, 503 when this worker is
    at its own: at once, before the stream costs anything."""
    if error.kind is not None:
        who, setting = STREAM_CREDENTIALS[error.kind]
        if error.kind == "api" and g.get("watch_token") is not None:
            who = "the API token that minted this watch token"
        what = "claims waiting for a job" if error.kind == "claim" else "open streams of events"
        message = (
            f"{who} holds its most {what} here ({setting}={error.limit}): close one, then retry"
        )
        return Response(message, 429, {"Retry-After": "10", **PLAIN})
    what = "streams of events"
    if request.endpoint == "working.claim_job":
        what = "streams of events and waiting claims"
    message = f"this worker holds its most {what} (MAX_STREAMS={error.limit}); retry shortly"
    return Response(message, 503, {"Retry-After": str(RETRY_MS // 1000), **PLAIN})


def redis_unavailable(error: redis.exceptions.RedisError) -> Response:
    """Answer 503 while Redis cannot be reached; the pool reconnects by itself."""
    metrics.REDIS_ERRORS.labels(type(error).__name__).inc()
    log.warning(
        "Redis unavailable for %s %s (API token %s, request %s): %s%s",
        request.method,
        loggable(request.path),
        loggable(request_record().credential),
        request_record().request_id,
        error,
        error_hint(error, current_app.config),
    )
    return Response(
        "Redis is unavailable; retry shortly",
        503,
        {"Retry-After": "1", **PLAIN},
    )


def note_route(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Note the matched route's template in the request's record, for its metrics;
    first of the URL value preprocessors, so that a request one of them refuses is
    labelled with its route too."""
    rule = request.url_rule
    if rule is not None:
        request_record().route = rule.rule


# ------------------------------------------------------------------------- app


class App(Flask):
    """Flask, with its URL map a JobRouteMap (bullmq_http/routes.py)."""

    url_map_class = JobRouteMap


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service: defaults, then environment variables, then `config`."""
    app = App(__name__, static_folder=None)  # the watch page: templates/, static/
    app.config.update(DEFAULTS)
    app.config.update(settings_from_env(os.environ))
    app.config.update(config or {})
    if app.config["MAX_STREAMS"] is None:
        app.config["MAX_STREAMS"] = default_max_streams(app.config)
    read_secret_files(app.config)
    check_settings(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]
    # From AUTH_TOKENS and AUTH_TOKENS_FILE both, say while one is being rotated out.
    tokens = ApiTokens(app.config["AUTH_TOKENS"], app.config["AUTH_TOKENS_FILE"])
    if not len(tokens.current):
        log.warning("no API token configured (AUTH_TOKENS): GET logs will answer 401")
    job_store = JobStore(
        functools.partial(redis_client, dict(app.config)),
        app.config["QUEUE_PREFIX"],
        app.config["MAX_LOGS_PER_JOB"],
        cluster=app.config["REDIS_CLUSTER"],
        max_page_bytes=app.config["MAX_PAGE_BYTES"],
        stamp_lines=app.config["LOG_LINE_TIMESTAMPS"],
    )
    app.extensions["bullmq_http"] = Service(
        tokens=tokens,
        store=job_store,
        event_reader=EventReader(
            functools.partial(event_reader_client, dict(app.config)),
            job_store.key,
            # Its XREAD waits at most 250 ms, and at most half its socket's REDIS_TIMEOUT.
            block_ms=max(1, min(250, int(app.config["REDIS_TIMEOUT"] * 500))),
        ),
        stream_limits=StreamLimits(
            app.config["MAX_STREAMS"],
            per_api_token=app.config["MAX_STREAMS_PER_TOKEN"],
            per_watch_token=app.config["MAX_STREAMS_PER_WATCH_TOKEN"],
            per_claimer=app.config["MAX_WAITING_CLAIMS_PER_TOKEN"],
        ),
        minting=MintingLimit(app.config["WATCH_TOKENS_PER_MINUTE"]),
        job_life=JobLife(
            job_store,
            app.config["LOCK_DURATION_MS"],
            app.config["STALLED_INTERVAL_MS"],
            app.config["MAX_STALLED_COUNT"],
        ),
        openapi=yaml.safe_load(OPENAPI.read_text(encoding="utf-8")),
    )
    if app.config["METRICS"]:
        app.url_value_preprocessor(note_route)
    app.register_blueprint(reporting)
    app.register_blueprint(working)
    app.register_blueprint(watching)
    app.register_blueprint(operations)
    if app.config["METRICS"]:
        metrics.start_at_zero(
            (rule.rule, method)
            for rule in app.url_map.iter_rules()
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
        )
    app.register_error_handler(HTTPException, plain_error)
    app.register_error_handler(NotLockHolder, not_lock_holder)
    app.register_error_handler(NotActive, not_active)
    app.register_error_handler(NoSuchJob, no_such_job)
    app.register_error_handler(CrossSlot, cross_slot)
    app.register_error_handler(NotBullmqLayout, not_bullmq_layout)
    app.register_error_handler(TooManyStreams, too_many_streams)
    for error in UNAVAILABLE:
        app.register_error_handler(error, redis_unavailable)

    hops = app.config["TRUSTED_PROXIES"]
    if hops:
        # Each proxy appends the address it saw to X-Forwarded-For: believe that many
        # entries. The scheme and mount prefix are set (not appended) by the nearest.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=1, x_prefix=1)  # type: ignore[method-assign]
    app.wsgi_app = AccessLog(app.wsgi_app, metrics=app.config["METRICS"])  # type: ignore[method-assign]
    return app
