"""What bullmq_http/upstream.py relies on in other libraries' internals still holds: each
test names the library whose upgrade broke it, and what to look at."""

from __future__ import annotations

import inspect
import logging
import os
import socket
import subprocess
import sys

import gunicorn.arbiter
import gunicorn.util
import gunicorn.workers.base
import redis
from prometheus_client.multiprocess import MultiProcessCollector
from werkzeug.routing import Rule

from bullmq_http import upstream
from bullmq_http.routes import JOB_ROUTES, JobRouteMap, JobRouteMatcher


def test_werkzeug_matches_with_the_map_s_matcher(monkeypatch):
    url_map = JobRouteMap([Rule(f"{JOB_ROUTES}/progress", methods=["POST"], endpoint="progress")])
    assert isinstance(url_map._matcher, JobRouteMatcher), "werkzeug: Map._matcher is gone"
    asked = []
    match = JobRouteMatcher.match

    def counted(self, *args):
        asked.append(args[1])
        return match(self, *args)

    monkeypatch.setattr(JobRouteMatcher, "match", counted)
    adapter = url_map.bind("bullmq-http")
    path = "/queues/orders/jobs/a/b/progress"
    assert adapter.match(path, "POST") == ("progress", {"queue": "orders", "job_id": "a/b"})
    assert asked == [path], "werkzeug: MapAdapter.match no longer asks Map._matcher"
    # A rule added later reaches the matcher too.
    url_map.add(Rule(f"{JOB_ROUTES}/logs", methods=["GET"], endpoint="logs"))
    assert ("logs", "GET") in url_map._matcher.by_last_segment, "werkzeug: Map.add"


def test_redis_py_connections_hold_their_socket(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        connection = client.connection_pool.get_connection()
        assert isinstance(upstream.connection_socket(connection), socket.socket), (
            "redis-py: a connected Connection no longer holds its socket as _sock"
        )
        connection.disconnect()
        assert upstream.connection_socket(connection) is None
    finally:
        client.close()


def test_gunicorn_answers_what_it_cannot_parse_with_util_write_error():
    handle_error = inspect.getsource(gunicorn.workers.base.Worker.handle_error)
    assert "util.write_error(" in handle_error, "gunicorn: Worker.handle_error"
    parameters = list(inspect.signature(gunicorn.util.write_error).parameters)
    assert len(parameters) == 4, "gunicorn: util.write_error(sock, status, reason, message)"


def test_gunicorn_s_master_queues_its_signals_in_sig_queue():
    source = inspect.getsource(gunicorn.arbiter.Arbiter)
    assert "self.SIG_QUEUE = queue.SimpleQueue()" in source, "gunicorn: Arbiter.SIG_QUEUE"
    assert "self.SIG_QUEUE.put_nowait(sig)" in source


def test_logging_leaves_out_the_caller_without_srcfile(monkeypatch):
    monkeypatch.setattr(logging, "_srcfile", logging._srcfile)  # put back afterwards
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("bullmq_http.test_upstream")
    logger.addHandler(handler)
    try:
        logger.warning("with the caller")
        upstream.skip_caller_lookup()
        logger.warning("without")
    finally:
        logger.removeHandler(handler)
    assert [record.pathname for record in records] == [__file__, "(unknown file)"], (
        "logging: _srcfile = None no longer skips the caller's lookup"
    )


def test_prometheus_client_s_files_fold_into_what_it_reads(tmp_path):
    """A worker's counter file, as prometheus_client writes it, added twice into the
    dead workers' file: the library's own collector reads the sum."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    program = "import prometheus_client as p; p.Counter('jobs', 'Jobs.').inc(3)"
    subprocess.run([sys.executable, "-c", program], env=env, check=True)
    (written,) = tmp_path.glob("counter_*.db")
    values = list(upstream.metric_file_values(str(written)))
    assert [value for _, value, _ in values] == [3.0], "prometheus_client: MmapedDict's format"
    written.unlink()
    for _ in range(2):
        upstream.add_to_metric_file(str(tmp_path / "counter_dead.db"), iter(values))
    samples = [
        (sample.name, sample.value)
        for metric in MultiProcessCollector(None, path=str(tmp_path)).collect()
        for sample in metric.samples
    ]
    assert samples == [("jobs_total", 6.0)], "prometheus_client: MmapedDict's format"
