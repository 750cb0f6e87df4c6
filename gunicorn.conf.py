"""gunicorn settings for the service: `gunicorn -c gunicorn.conf.py` and nothing else.

Environment: BIND (a host:port or unix:/path; overrides PORT), PORT (default 8080, on
127.0.0.1), WEB_CONCURRENCY (worker processes, default: one per core), THREADS
(threads per worker, default 8). The service's own settings are read by the app.
"""

import logging
import os
import sys


def _whole(name: str, default: int, low: int, high: int) -> int:
    value = os.environ.get(name) or str(default)
    if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
        sys.exit(f"{name}={value!r} must be a whole number from {low} to {high}")
    return int(value)


wsgi_app = "app:create_app()"
bind = [os.environ.get("BIND") or f"127.0.0.1:{_whole('PORT', 8080, 1, 65535)}"]
workers = _whole("WEB_CONCURRENCY", os.cpu_count() or 1, 1, 256)

# Every request is short and spends its time waiting on one Redis round trip, and
# workers and dashboards call again and again over keep-alive connections: threads
# overlap those waits and keep idle connections open without tying up a process,
# with no monkey-patching. (The sync worker closes every connection after one request.)
worker_class = "gthread"
threads = _whole("THREADS", 8, 1, 1024)
# Longer than a client's pause between two reports on the same connection.
keepalive = 30

# Load the app once in the master: a bad setting stops start-up with one line, before
# any worker forks, and the workers share the loaded code.
preload_app = True

# No runtime control socket: nothing here uses it, and instances sharing a host would
# contend for its one default path.
control_socket_disable = True

accesslog = "-"
errorlog = "-"

# The app's own warnings (no API token configured, Redis unavailable) beside
# gunicorn's, on stderr, in gunicorn's format.
logging.basicConfig(
    level=logging.INFO,
    stream=sys.stderr,
    format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    datefmt="[%Y-%m-%d %H:%M:%S %z]",
)
