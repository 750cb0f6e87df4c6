"""`python3 -m bullmq_http.healthcheck`: ask the service's /healthz where BIND (its first
address, a unix socket included) or PORT says gunicorn listens, as gunicorn.conf.py
reads them; exit 0 when it answers 200, else 1, saying why. The image's HEALTHCHECK.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys

from .settings import ConfigError, binds, server_settings

# Where a server listening on every address is reached from inside its own container.
EVERY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 keep-alive connection over a unix socket."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def connection(bind: str, timeout: float) -> http.client.HTTPConnection:
    """Return a connection to where gunicorn binds: `unix:path` or `host:port`."""
    if bind.startswith("unix:"):
        return UnixHTTPConnection(bind.removeprefix("unix:"), timeout)
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    return http.client.HTTPConnection(EVERY_ADDRESS.get(host, host), int(port), timeout=timeout)


def main() -> int:
    """Ask /healthz once, within 2 s; return the exit status."""
    try:
        settings = server_settings(os.environ)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    bind = binds(settings)[0]
    conn = connection(bind, 2.0)
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    except OSError as error:
        print(f"{bind}: {error}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"{bind}: /healthz answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
