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
            r.hset(key, "name", "resize-images")
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
                page = browser.new_page(viewport={"width": 960, "height": 640})
                page.goto(link)
                page.wait_for_selector("#connection[data-state=live]")
                page.wait_for_selector(f"#L{len(DEMO_LINES) - 1}")
                page.screenshot(path=str(path))
                browser.close()
    shutil.rmtree(directory, ignore_errors=True)
    print(f"wrote {path}")


DEMO_LINES = [
    "info: fetched 12 images from s3://uploads/2026-12-01/",
    "resizing beach.jpg to 1600x1200",
    "resizing dunes.jpg to 1600x1200",
    "warn: harbour.jpg has no EXIF orientation; assuming landscape",
    "resizing harbour.jpg to 1600x1200",
    "resizing lighthouse.jpg to 1600x1200",
    "resizing market.jpg to 1600x1200",
    "error: pier.jpg is truncated (read 812 KiB of 2.1 MiB); retrying once",
    "resizing pier.jpg to 1600x1200",
    "info: 7 of 12 done",
]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m harness.screenshot FILE.png")
    screenshot(Path(sys.argv[1]))
