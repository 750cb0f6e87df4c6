"""`make screenshot`: draw the watch page of a demo job, part way through, into a PNG file
(the README's picture), in Debian's Chromium driven by Playwright.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import redis

from harness.run import seed_demo_job, watch_link_token
from harness.servers import Gunicorn, RedisServer, free_port

# What Chromium needs to run headless here, as root, on a machine with no network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def screenshot(path: Path) -> None:
    """Draw the watch page of a demo job, part way through, into a PNG file: the
    README's picture. Chromium is Debian's, driven by Playwright."""
    from playwright.sync_api import sync_playwright  # a development dependency

    directory = Path(tempfile.mkdtemp(prefix="bullmq-http-screenshot-"))
    secret = secrets.token_urlsafe(32)
    with RedisServer(directory / "redis") as redis_server:
        queue, job_id, _ = seed_demo_job(redis_server.url)
        with redis.Redis.from_url(redis_server.url) as r:
            key = f"bull:{queue}:{job_id}"
            # Its second attempt of three, the first having failed.
            r.hset(key, mapping={"name": "resize-images", "ats": 2, "atm": 1,
                                 "opts": json.dumps({"attempts": 3}),
                                 "failedReason": "the bucket was unreachable"})  # fmt: skip
            r.hset(key, "progress", json.dumps({"current": 7, "total": 12, "message": "resizing"}))
            r.rpush(f"{key}:logs", *DEMO_LINES)
        env = {"REDIS_URL": redis_server.url, "WATCH_TOKEN_SECRET": secret, "WEB_CONCURRENCY": "1"}
        with Gunicorn(directory, env, bind=f"127.0.0.1:{free_port()}") as server:
            link = f"http://{server.bind}/queues/{queue}/jobs/{job_id}/watch#token="
            link += watch_link_token(env, queue, job_id)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=shutil.which("chromium") or "chromium", args=CHROMIUM_ARGS
                )
                page = browser.new_page(
                    viewport={"width": 960, "height": 640}, timezone_id="UTC", locale="en-GB"
                )
                page.goto(link)
                page.wait_for_selector("#connection[data-state=live]")
                page.wait_for_selector(f"#L{len(DEMO_LINES) - 1}")
                page.screenshot(path=str(path))
                browser.close()
    shutil.rmtree(directory, ignore_errors=True)
    print(f"wrote {path}")


# Stamped as LOG_LINE_TIMESTAMPS stamps them, with a section, levels and ANSI colours.
DEMO_LINES = [
    "2026-12-01T09:14:02.118Z --- fetching",
    "2026-12-01T09:14:02.120Z info: fetched 12 images from s3://uploads/2026-12-01/",
    "2026-12-01T09:14:02.311Z --- resizing",
    "2026-12-01T09:14:02.402Z resizing beach.jpg to 1600x1200 \x1b[32m✓\x1b[0m",
    "2026-12-01T09:14:02.688Z resizing dunes.jpg to 1600x1200 \x1b[32m✓\x1b[0m",
    "2026-12-01T09:14:02.690Z warn: harbour.jpg has no EXIF orientation; assuming landscape",
    "2026-12-01T09:14:02.951Z resizing harbour.jpg to 1600x1200 \x1b[32m✓\x1b[0m",
    "2026-12-01T09:14:03.204Z resizing lighthouse.jpg to 1600x1200 \x1b[32m✓\x1b[0m",
    "2026-12-01T09:14:03.477Z resizing market.jpg to 1600x1200 \x1b[32m✓\x1b[0m",
    "2026-12-01T09:14:03.480Z error: pier.jpg is truncated (read 812 KiB of 2.1 MiB); "
    "retrying once",
    "2026-12-01T09:14:03.912Z resizing pier.jpg to 1600x1200 \x1b[32m✓\x1b[0m",
    "2026-12-01T09:14:03.913Z info: \x1b[1m7 of 12\x1b[22m done",
]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m harness.screenshot FILE.png")
    screenshot(Path(sys.argv[1]))
