"""`make run`: serve the app under gunicorn. Without REDIS_URL, with a throwaway Redis
server holding a demo job, and print curl lines and a watch link that work as printed;
with it, against that Redis, writing nothing to it. Either way with an API token and a
watch secret made up when unset, and their exports printed.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

import redis

from bullmq_http.healthcheck import EVERY_ADDRESS
from bullmq_http.settings import ConfigError, binds, server_settings
from bullmq_http.tokens import watch_token
from harness.clients import add_active_job
from harness.servers import GUNICORN, ROOT, RedisServer, dying_with_this_process


def taken_port(binds: list[str]) -> str | None:
    """Return why gunicorn cannot listen where it binds, in one line naming the setting
    to change; None when it can."""
    setting, example = (
        ("BIND", "BIND=127.0.0.1:8081") if os.environ.get("BIND") else ("PORT", "PORT=8081")
    )
    for bind in binds:
        host, _, port = bind.rpartition(":")
        if bind.startswith("unix:") or not port.isdigit():
            continue
        host = host.strip("[]")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does
            try:
                probe.bind((host, int(port)))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                return f"{bind} is in use: set {setting} to a free one, e.g. {example} make run"
    return None


def address(binds: list[str]) -> tuple[str, str]:
    """Return (base URL, extra curl options) for where gunicorn binds first."""
    bind = binds[0]
    if bind.startswith("unix:"):
        return "http://localhost", f"--unix-socket {bind.removeprefix('unix:')} "
    # A server listening on every address is reached on loopback.
    host, _, port = bind.rpartition(":")
    host = EVERY_ADDRESS.get(host.strip("[]"), host.strip("[]"))
    return f"http://{f'[{host}]' if ':' in host else host}:{port}", ""


def seed_demo_job(url: str) -> tuple[str, str, str]:
    """Lay out one active BullMQ job, the README's orders/42, as a worker would hold it;
    return its queue, id and job token."""
    queue, job_id, token = "orders", "42", f"{secrets.token_hex(16)}:1"
    with redis.Redis.from_url(url) as client:
        add_active_job(client, queue, job_id, token, name="demo", lock_ms=None)
    return queue, job_id, token


def watch_link_token(env: Mapping[str, str], queue: str, job_id: str) -> str:
    """Return a watch token of the job for an hour, signed as a backend signs one."""
    return watch_token(env["WATCH_TOKEN_SECRET"], queue, job_id, int(time.time()) + 3600)


class Stop(Exception):
    """A signal that stops `make run`: SIGTERM or SIGHUP (SIGINT is KeyboardInterrupt)."""


def stop(signum: int, frame: object) -> None:
    raise Stop(signum)


def made_up_secrets(env: dict[str, str]) -> str | None:
    """Make up an API token and a watch secret where none is set; return the API token
    to print (None when API tokens come from a file)."""
    env.setdefault("WATCH_TOKEN_SECRET", secrets.token_urlsafe(32))
    if env.get("AUTH_TOKENS_FILE"):
        return None
    env.setdefault("AUTH_TOKENS", secrets.token_urlsafe(24))
    return env["AUTH_TOKENS"].split(",")[0]


def your_redis(env: dict[str, str], where: list[str]) -> None:
    """Print, for the Redis of REDIS_URL, what to paste, and how to watch any of its
    jobs; write nothing to it."""
    api = made_up_secrets(env)
    base, curl = address(where)
    api_auth = f"-H 'Authorization: Bearer {api if api else '<an API token of the file>'}'"
    exports = f"  export API_TOKEN='{api}'\n" if api else ""
    secret = f"  export WATCH_TOKEN_SECRET='{env['WATCH_TOKEN_SECRET']}'\n"
    print(
        f"Serving the jobs of REDIS_URL; nothing is written to it but what you send.\n"
        f"For the README's examples, in another shell:\n{exports}{secret}"
        f"A job's worker reports with the job's own lock token (JOB_TOKEN).\n"
        f"Watch any job in a browser: mint a link for it, then open\n"
        f"  {base}/queues/<queue>/jobs/<id>/watch#token=<the token minted>\n"
        f"  curl {curl}-X POST {api_auth} \\\n"
        f"    '{base}/queues/<queue>/jobs/<id>/events/token?seconds=3600'\n"
        f"Ctrl-C stops the service.",
        flush=True,
    )


def throwaway_redis(env: dict[str, str], where: list[str]) -> RedisServer:
    """Start a Redis server holding the README's job, point env at it, and print what
    to paste for the README's examples, and curl lines that work as printed."""
    server = RedisServer().start()
    env["REDIS_URL"] = server.url
    api = made_up_secrets(env) or "<an API token of the file>"
    queue, job_id, job_token = seed_demo_job(server.url)
    base, curl = address(where)
    job_url = f"{base}/queues/{queue}/jobs/{job_id}"
    job_auth, api_auth = (
        f"-H 'Authorization: Bearer {job_token}'",
        f"-H 'Authorization: Bearer {api}'",
    )
    print(
        f"Throwaway Redis at {server.url}, with an active job, {queue}/{job_id}.\n"
        f"For the README's examples, in another shell:\n"
        f"  export JOB_TOKEN='{job_token}'\n"
        f"  export API_TOKEN='{api}'\n"
        f"Or try:\n"
        f"  curl {curl}{job_auth} -d 42 {job_url}/progress\n"
        f"  curl {curl}{job_auth} -d 'hello' {job_url}/logs\n"
        f"  curl {curl}{api_auth} '{job_url}/logs?start=0&length=10'\n"
        f"And watch the job in a browser, for an hour:\n"
        f"  {job_url}/watch#token={watch_link_token(env, queue, job_id)}\n"
        f"Ctrl-C stops both.",
        flush=True,
    )
    return server


def main() -> int:
    """Serve the app under gunicorn; without REDIS_URL, with a throwaway Redis too; not
    at all, in one line saying which setting to change, when a server setting is bad or
    the port is taken.
    Stop both, leaving nothing behind, on SIGINT, SIGTERM or SIGHUP."""
    env = dict(os.environ)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        where = binds(server_settings(env))  # as gunicorn.conf.py reads them
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if taken := taken_port(where):
        print(taken, file=sys.stderr)
        return 1
    server = None
    try:
        if env.get("REDIS_URL"):
            your_redis(env, where)
        else:
            server = throwaway_redis(env, where)
        # In a session of its own: Ctrl-C reaches gunicorn's master once, from here, and
        # it stops its workers; they are not signalled twice. It dies with this process.
        command = dying_with_this_process(GUNICORN)
        gunicorn = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
        try:
            return gunicorn.wait()
        except (KeyboardInterrupt, Stop):
            gunicorn.send_signal(signal.SIGINT)
            return gunicorn.wait()
    finally:
        if server:
            server.stop()
            shutil.rmtree(server.directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
