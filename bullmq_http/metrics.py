"""The service's Prometheus metrics, how a request is counted in them, and their text.

They live in prometheus_client's default registry. Under gunicorn each worker writes its
figures to files in PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py), and render() adds them
up. Routes are labelled by their template, never by the path: queue names and job ids
would make a new series each.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram, multiprocess
from prometheus_client.multiprocess import MultiProcessCollector

from .upstream import add_to_metric_file, metric_file_values

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
JOB_OUTCOMES = Counter(
    "bullmq_http_jobs",
    "Jobs worked over HTTP, by what happened: claimed (POST .../claim found one), "
    "completed, failed (for good), delayed or retried (failed with attempts left).",
    ["outcome"],
)
# Named when the event reader was called the watcher; alert rules know it by that name.
READER_ERRORS = Counter(
    "bullmq_http_watcher_errors",
    "Unexpected errors of the event reader, each logged with its traceback; it starts "
    "again after a pause.",
)
# The route of a request no route matched (404, 405).
UNMATCHED = "unmatched"


def counted_stream(events: Iterator[bytes]) -> Iterator[bytes]:
    """Pass a stream's events on, counting it among the open streams while it lasts."""
    OPEN_STREAMS.inc()
    try:
        yield from events
    finally:
        OPEN_STREAMS.dec()


def count_request(
    route: str, method: str, status: str, seconds: float, request_bytes: str, response_bytes: str
) -> None:
    """Count one answered request in the metrics; the sizes as their headers said them."""
    if method not in KNOWN_METHODS:
        method = "other"  # a label per made-up method would be a new series each
    request_count(route, method, status).inc()
    duration, request_size, response_size = route_metrics(route)
    duration.observe(seconds)
    request_size.observe(int(request_bytes) if request_bytes.isdigit() else 0)
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


def render() -> tuple[bytes, str]:
    """Return the metrics in Prometheus's text format, every worker's added up, and
    their content type."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory is None:
        return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
    # Under gunicorn (gunicorn.conf.py): read the workers' files, none being folded.
    registry = prometheus_client.CollectorRegistry()
    MultiProcessCollector(registry)
    with files_locked(directory, fcntl.LOCK_SH):
        text = prometheus_client.generate_latest(registry)
    return text, prometheus_client.CONTENT_TYPE_LATEST


# What the files of dead workers are folded into: "counter_dead.db", "histogram_dead.db".
FOLDED = "dead"


def fold_dead_worker(pid: int) -> None:
    """Fold a dead worker's counters and histograms into the directory's files of dead
    workers, and remove its own, in the master as gunicorn reaps it: the directory and
    the scrape stay bounded over any number of restarts, and every sum stays as it was.
    Its live gauges, which end with it, are dropped."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    multiprocess.mark_process_dead(pid, directory)
    with files_locked(directory, fcntl.LOCK_EX):  # no scrape sees it half done
        for kind in ("counter", "histogram"):
            dead = Path(directory, f"{kind}_{pid}.db")
            if not dead.exists():
                continue
            folded = str(Path(directory, f"{kind}_{FOLDED}.db"))
            add_to_metric_file(folded, metric_file_values(str(dead)))
            dead.unlink()


@contextlib.contextmanager
def files_locked(directory: str, how: int) -> Iterator[None]:
    """Hold the lock on the directory's metric files: shared to read them, exclusive to
    fold a dead worker's in."""
    with open(Path(directory, ".lock"), "a") as lock:
        fcntl.flock(lock, how)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# The kinds of Redis error an outage most often starts with, counted from zero.
COMMON_REDIS_ERRORS = (
    "ConnectionError", "TimeoutError", "ReadOnlyError", "OutOfMemoryError",
    "NoPermissionError", "AuthenticationError", "ClusterDownError",
)  # fmt: skip


def start_at_zero(routes: Iterable[tuple[str, str]]) -> None:
    """Make the series the README's alerts read exist at zero from start-up, so that the
    first error is an increase Prometheus's rate() sees, not a series born counting:
    a 503 and a 500 of each route and method, and the common kinds of Redis error."""
    for route, method in routes:
        for status in ("500", "503"):
            request_count(route, method, status)
    for kind in COMMON_REDIS_ERRORS:
        REDIS_ERRORS.labels(kind)
