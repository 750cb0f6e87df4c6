"""nginx in front of gunicorn, as deploy/nginx.conf sets it up, for the tests that go
through it (test_nginx.py, test_watch_page.py)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
from pathlib import Path

from harness.clients import http_call
from harness.servers import answers, dying_with_this_process, wait_until
from tests.helpers import ROOT, unavailable

EXAMPLE = ROOT / "deploy" / "nginx.conf"


def site_config(socket: Path, port: int, directory: Path) -> str:
    """Return the example config, pointed at this test's socket, port and directory."""
    text = EXAMPLE.read_text()
    for old, new in [
        ("server unix:/run/bullmq-http/gunicorn.sock", f"server unix:{socket}"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("/var/log/nginx/bullmq-http.log", str(directory / "access.log")),
        ("/var/log/nginx/bullmq-http.error.log", str(directory / "bullmq-error.log")),
    ]:
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has {old!r}"
        text = text.replace(old, new)
    return text


# What the example says to set in nginx.conf's main context.
MAIN_CONTEXT = re.search(r"^#   (worker_shutdown_timeout \S+;)$", EXAMPLE.read_text(), re.M)


def main_config(directory: Path) -> str:
    """Return an nginx.conf that keeps everything in directory, sets what the example
    says to set in the main context, and includes the site."""
    assert MAIN_CONTEXT, "deploy/nginx.conf no longer says to set worker_shutdown_timeout"
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as nobody, who cannot reach the test's socket.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""{user}
{MAIN_CONTEXT[1]}
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp}
    include {directory / "site.conf"};
}}
"""


def nginx_binary() -> str:
    """Return nginx's path, or skip (fail under CI) where it is not installed."""
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None
    )
    if found:
        return found
    unavailable("nginx is not installed (make test installs it where apt-get can)")


def start_nginx(nginx: str, directory: Path, socket: Path, port: int) -> subprocess.Popen[bytes]:
    """Start nginx with the example config in front of gunicorn's socket, listening on
    loopback at `port`, keeping its files in directory; return once it answers."""
    (directory / "site.conf").write_text(site_config(socket, port, directory))
    (directory / "nginx.conf").write_text(main_config(directory))
    process = subprocess.Popen(
        dying_with_this_process(
            [nginx, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"]
        ),
        stderr=subprocess.PIPE,
    )

    def healthy() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        return http_call(conn, "GET", "/bullmq/healthz").status == 200

    wait_until(
        lambda: process.poll() is not None or answers(healthy, OSError), 10, "nginx to answer"
    )
    if process.poll() is not None:
        assert process.stderr is not None
        raise AssertionError(process.stderr.read().decode())
    return process
