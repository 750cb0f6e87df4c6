"""gunicorn settings for the service: `gunicorn -c gunicorn.conf.py` and nothing else,
which `python serve.py` runs once it has checked the settings below.

Its settings come from the environment (BIND, PORT, WEB_CONCURRENCY, WORKER_CLASS and
the rest of bullmq_http/settings.py's SERVER_SETTINGS, listed with their defaults in the
README's Configuration table), parsed as the service's own are.

gunicorn reads this file again on every reload (SIGHUP): what it does must be safe to
do twice.
"""

import atexit
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from gunicorn import glogging

from bullmq_http.settings import ConfigError, binds, server_settings
from bullmq_http.upstream import master_signals, skip_caller_lookup

try:
    SETTINGS = server_settings(os.environ)
except ConfigError as error:
    sys.exit(str(error))

# Every request is short and spends its time waiting on one Redis round trip, and
# workers and dashboards call again and again over keep-alive connections. Greenlets
# overlap those waits and hold idle connections for next to nothing. Measured by
# `make bench` (bench/results.md): against gthread, gevent serves more requests per
# second at 32 connections, at a lower p99, and evenly: gthread's workers race to
# accept, and one can end up with most keep-alive connections while the other idles.
# (The sync worker closes every connection after one request.)
worker_class: str | type = SETTINGS["WORKER_CLASS"]
if worker_class == "gevent":
    # The app is loaded here in the master, before the workers fork: patch first, so
    # that its sockets, locks and ssl are gevent's from the start rather than swapped
    # under it in each worker. (settings.py, above, patches nothing and needs nothing.)
    from gevent import monkey

    monkey.patch_all()

# Metrics: each worker writes its figures to files in one directory and /metrics adds
# them up (prometheus_client's multiprocess mode). The directory is named before the
# app imports prometheus_client, and starts empty: figures left by an earlier run would
# be added to this one's. A reload keeps the directory and its figures: the metrics
# module is loaded by then.
if "bullmq_http.metrics" not in sys.modules:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _made = tempfile.mkdtemp(prefix="bullmq-http-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _made

        def _remove(master: int = os.getpid(), directory: str = _made) -> None:
            """Remove the directory when the master exits, however it exits; workers,
            forked with this hook, leave it."""
            if os.getpid() == master:
                shutil.rmtree(directory, ignore_errors=True)

        atexit.register(_remove)
    _metrics = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    _metrics.mkdir(parents=True, exist_ok=True)
    for _stale in _metrics.glob("*.db"):
        _stale.unlink()

wsgi_app = "app:create_app()"
bind = binds(SETTINGS)
workers = SETTINGS["WEB_CONCURRENCY"] or os.cpu_count() or 1

worker_connections = SETTINGS["WORKER_CONNECTIONS"]
if worker_class == "gevent":
    # gevent's worker with deadlines: a request must arrive whole within
    # REQUEST_TIMEOUT of its first byte, a client must read what it is sent within
    # SEND_TIMEOUT, and idle clients give way to new ones when a worker is nearly full
    # (bullmq_http/gunicorn_worker.py), so slow clients cannot hold every connection.
    from bullmq_http import event_reader, lifecycle
    from bullmq_http.gunicorn_worker import DeadlineWorker, write_plain_error
    from bullmq_http.upstream import write_error

    def _end_long_requests() -> None:
        """End the streams of events, and the claims waiting for a job, within a second."""
        event_reader.stop_all()
        lifecycle.stop_all()

    class Worker(DeadlineWorker):
        request_timeout = SETTINGS["REQUEST_TIMEOUT"]
        send_timeout = SETTINGS["SEND_TIMEOUT"]
        end_streams = staticmethod(_end_long_requests)

        def init_process(self) -> None:
            write_error(write_plain_error)  # what gunicorn cannot parse: plain text
            super().init_process()

    worker_class = Worker
else:
    from bullmq_http.gunicorn_worker import read_body_safely

    def pre_request(worker: Any, req: Any) -> None:
        """Let the app read each body through worker.BodyReader, as the project's gevent
        worker has it do."""
        read_body_safely(req)


threads = SETTINGS["THREADS"]
# Idle keep-alive connections are closed after this many seconds: long enough for a
# worker's next report on the same connection, short enough that a graceful stop,
# which waits for idle connections too, takes seconds. A proxy in front must close
# its idle upstream connections sooner (deploy/nginx.conf: keepalive_timeout 10s).
keepalive = 15

# Load the app once in the master: a bad setting stops start-up with one line, before
# any worker forks, and the workers share the loaded code.
preload_app = True

# Proxies are the app's business (TRUSTED_PROXIES): gunicorn takes no scheme and no
# environment variables from any peer's headers, so it trusts every peer with nothing
# rather than parse each peer's address to decide (about 5% of a request's CPU).
forwarded_allow_ips = "*"
secure_scheme_headers: dict[str, str] = {}
forwarder_headers = ""

# No runtime control socket: nothing here uses it, and instances sharing a host would
# contend for its one default path.
control_socket_disable = True

# The app writes the access log itself (one line per request, with the request id and,
# behind trusted proxies, the forwarded client address), to stdout; its warnings and
# gunicorn's own log go to stderr, in gunicorn's format. LOG_FORMAT=json writes every
# line, the access log's, the app's and gunicorn's own, as one JSON object, for log
# shippers; plain is for people. Configured whole, so a reload replaces the handlers
# rather than adding to them.
accesslog = None
errorlog = "-"


# What no line here shows, and each line would otherwise look up: the caller's file
# and line, and the thread's and process's names (the logging HOWTO's Optimization).
skip_caller_lookup()
logging.logThreads = False
logging.logMultiprocessing = False


class _Logger(glogging.Logger):
    """gunicorn's logger, less its access log: with logconfig_dict set it would build
    every request's log fields (a tenth of a request's time) for a logger that writes
    nowhere, beside the app's own line."""

    access_log_enabled = False


logger_class = _Logger
_DATES = "[%Y-%m-%d %H:%M:%S %z]"


def _formatter(plain: str) -> dict[str, str]:
    """Return the formatter LOG_FORMAT asks for: JSON, or lines in the format given."""
    if SETTINGS["LOG_FORMAT"] == "json":
        return {"()": "bullmq_http.access_log.JsonLogFormatter"}
    return {"()": "bullmq_http.access_log.PlainLogFormatter", "fmt": plain, "datefmt": _DATES}


def _to(stream: str, formatter: str) -> dict[str, str]:
    return {"class": "logging.StreamHandler", "stream": stream, "formatter": formatter}


logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "app": _formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"),
        "access": _formatter("%(asctime)s [%(process)d] %(message)s"),
        "gunicorn": _formatter("%(asctime)s [%(process)d] [%(levelname)s] %(message)s"),
    },
    "handlers": {
        "app": _to("ext://sys.stderr", "app"),
        "access": _to("ext://sys.stdout", "access"),
        "gunicorn": _to("ext://sys.stderr", "gunicorn"),
    },
    "root": {"level": "INFO", "handlers": ["app"]},
    "loggers": {
        "bullmq_http.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        "gunicorn.error": {"level": "INFO", "handlers": ["gunicorn"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": False},
    },
}


def child_exit(server: Any, worker: Any) -> None:
    """Count a worker that exited while the server runs on (it is replaced), and fold
    its metric files into the dead workers' (metrics.py): its counts stay in the sums,
    its live gauges go."""
    from bullmq_http.metrics import WORKER_RESTARTS, fold_dead_worker  # loaded with the app, by now

    if server.LISTENERS:  # emptied when the whole server stops
        WORKER_RESTARTS.inc()
    try:
        fold_dead_worker(worker.pid)
    except Exception:  # an error here would stop the master, and every worker with it
        server.log.exception("the metrics of worker %s could not be folded", worker.pid)


# A stop signal that reaches a worker after it forks, but before it sets up its own
# handlers, runs the master's handler, inherited: that puts it on the worker's copy of
# the master's queue of signals, which nothing reads. The worker would then serve on
# until the master's graceful timeout killed it, holding up the stop for 30 seconds; a
# deploy that stops the server just after a worker restarts does exactly that. So each
# worker, once its own handlers are in place, sends itself any stop signal it missed.
_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: keep its copy of the master's queue, for post_worker_init."""
    worker.master_signals = master_signals(server)


def post_worker_init(worker: Any) -> None:
    """In the worker, with its handlers set up: take the stop signals it missed."""
    while True:
        try:
            missed = worker.master_signals.get_nowait()
        except queue.Empty:
            return
        if missed in _STOPS:
            signal.raise_signal(missed)
