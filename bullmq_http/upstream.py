"""Where the service leans on other libraries' private internals: every such use is
here, and nowhere else.

Each was measured to pay for itself, and each was proved on the version named beside
it, which requirements.txt bounds the library to; tests/test_upstream.py fails, naming
the library, when an upgrade changes what a use relies on.

A library is imported where it is used, not here at the top: gunicorn.conf.py imports
this module before gevent patches the standard library and before prometheus_client
may be imported (it must first know its multiprocess directory).
"""

from __future__ import annotations

import logging
import queue
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.connection import ConnectionInterface
    from werkzeug.routing import Map
    from werkzeug.routing.matcher import StateMachineMatcher


def use_matcher(url_map: Map, matcher: StateMachineMatcher) -> None:
    """Have a werkzeug URL map match with `matcher`, a StateMachineMatcher of our own,
    given the rules the map holds so far (and, through Map.add, those added later).

    Werkzeug 3.1: `Map._matcher` is the matcher every MapAdapter.match asks, and
    `werkzeug.routing.matcher` is not public API. Matching a job route by its last
    segment (bullmq_http/routes.py) took a fifth of a job request's cost off.
    """
    for rule in url_map.iter_rules():
        matcher.add(rule)
    url_map._matcher = matcher


def connection_socket(connection: ConnectionInterface) -> socket.socket | None:
    """Return a redis-py connection's socket, None while it is not connected.

    redis-py 8.2: `AbstractConnection._sock`, of its Connection and SSLConnection.
    Looking at an idle connection's socket, with no round trip, is how the pool finds
    one Redis closed before handing it out (bullmq_http/redis_link.py); redis-py
    itself finds out only on the next command.
    """
    sock: socket.socket | None = getattr(connection, "_sock", None)
    return sock


def write_error(writer: Callable[[socket.socket, int, str, str], None]) -> None:
    """Have gunicorn answer requests it cannot parse with `writer` (in the worker
    process, where gunicorn's worker is ours).

    gunicorn 27: `gunicorn.util.write_error(sock, status, reason, message)`, which
    Worker.handle_error calls, answers such requests with an HTML page; it offers no
    setting for another. Ours answers in plain text, as every other error here is.
    """
    from gunicorn import util

    util.write_error = writer


def master_signals(arbiter: Any) -> queue.SimpleQueue[int]:
    """Return the queue of signals gunicorn's master has received and not yet handled.

    gunicorn 24 to 27: `Arbiter.SIG_QUEUE`. A worker forked while the master holds a
    stop signal there would never hear of it (gunicorn.conf.py, post_fork): the worker
    takes its copy and sends itself what it missed.
    """
    signals: queue.SimpleQueue[int] = arbiter.SIG_QUEUE
    return signals


def skip_caller_lookup() -> None:
    """Have logging leave out the caller's file and line, which no line here shows.

    Python 3.11: `logging._srcfile = None`, as the logging HOWTO's Optimization section
    has it; without it every log line, an access line a request, looks up its caller.
    """
    logging._srcfile = None


def metric_file_values(path: str) -> Iterator[tuple[str, float, float]]:
    """Yield each (key, value, timestamp) a metric file of prometheus_client's
    multiprocess mode holds.

    prometheus_client 0.26: `prometheus_client.mmap_dict.MmapedDict`, the format of
    those files, is not public API. The master folds a dead worker's counters into one
    file with it (bullmq_http/metrics.py), so that the files and the scrape stay bounded
    over any number of worker restarts, where the library keeps every dead worker's.
    """
    from prometheus_client.mmap_dict import MmapedDict

    for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
        yield key, value, timestamp


def add_to_metric_file(path: str, values: Iterator[tuple[str, float, float]]) -> None:
    """Add each (key, value, timestamp) to what a metric file holds (as above)."""
    from prometheus_client.mmap_dict import MmapedDict

    folded = MmapedDict(path)
    try:
        for key, value, timestamp in values:
            total, _ = folded.read_value(key)
            folded.write_value(key, total + value, timestamp)
    finally:
        folded.close()


# bullmq 3.4.4 (BullMQ's official Python package): its Lua scripts are files of the
# package (commands/, includes inlined), and the code that packs their keys and
# arguments is its Scripts class, whose ...Args methods run without a Redis client; none
# of this is its documented API. A job's life over HTTP (bullmq_http/lifecycle.py) runs
# those scripts unchanged, so that a job ends exactly as BullMQ's own worker ends it.


def bullmq_script(name: str) -> str:
    """Return one of BullMQ's Lua scripts, by its file name less `.lua`."""
    from importlib import resources

    return resources.files("bullmq").joinpath("commands", f"{name}.lua").read_text()


def bullmq_scripts(prefix: str, queue: str) -> Any:
    """Return bullmq's Scripts of a queue, for its methods that pack a script's keys and
    arguments (getKeys, moveToFinishedArgs, moveToDelayedArgs, retryJobArgs): it is
    made with a stand-in for the Redis connection, which those methods never touch."""
    from types import SimpleNamespace

    from bullmq.scripts import Scripts

    return Scripts(prefix, queue, SimpleNamespace(conn=None, commands={}))


def bullmq_job(prefix: str, queue: str, job_id: str, fields: dict[str, str], opts: Any) -> Any:
    """Return bullmq's Job of a job hash as read, as a worker with options `opts` holds
    it: Job.fromJSON reads a queue's `opts` (the worker's), `backend` and
    `qualifiedName`, which a stand-in gives."""
    from types import SimpleNamespace

    from bullmq.job import Job

    holder = SimpleNamespace(opts=opts, backend=None, qualifiedName=f"{prefix}:{queue}")
    return Job.fromJSON(holder, fields, job_id)


def bullmq_next_job(reply: Any) -> tuple[dict[str, Any] | None, Any, Any, Any]:
    """Return what BullMQ's moveToActive answered: the job's fields (None for no job),
    its id, and until when the queue is rate limited, and when its next delayed job is
    due (0 or None for neither)."""
    from bullmq.scripts import raw2NextJobData

    fields, job_id, limit_until, delay_until = raw2NextJobData(reply)
    return fields, job_id, limit_until, delay_until
