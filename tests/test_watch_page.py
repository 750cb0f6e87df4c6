"""The watch page in a real browser: Debian's Chromium, driven by Playwright, against the
service under gunicorn behind nginx with deploy/nginx.conf, on jobs of the real BullMQ
library. Nothing here depends on which Redis server runs: `make test` runs it in its
first pass only (the `once` mark)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from bullmq import Job, Queue, Worker
from playwright.sync_api import sync_playwright

from bullmq_http.tokens import watch_token
from harness.clients import add_active_job, http_call
from harness.screenshot import CHROMIUM_ARGS
from harness.servers import Gunicorn, free_port, wait_until
from tests.helpers import API_TOKEN, readme_snippet, unavailable
from tests.nginx_front import nginx_binary, start_nginx

pytestmark = pytest.mark.once

SECRET = "the page tests' secret, 32 bytes or more"
SECONDS = 15.0  # the longest a page may take to show what happened


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        unavailable("chromium is not installed (make test installs it where apt-get can)")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_binary(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Site:
    """gunicorn on a unix socket with nginx in front, as the README deploys them."""

    def __init__(self, directory: Path, redis_url: str, session_seconds: int = 3600) -> None:
        self.port = 0
        self.redis_url = redis_url
        self.data = redis.Redis.from_url(redis_url, decode_responses=True)
        self.gunicorn = Gunicorn(
            directory,
            {
                "REDIS_URL": redis_url,
                "AUTH_TOKENS": API_TOKEN,
                "WATCH_TOKEN_SECRET": SECRET,
                # Shorter than any link here: the page must outlive a stream's token.
                "WATCH_TOKEN_SECONDS": "1",
                "WATCH_SESSION_SECONDS": str(session_seconds),
                "TRUSTED_PROXIES": "1",
                "WEB_CONCURRENCY": "1",
            },
        )

    def url(self, queue: str, job_id: str, route: str) -> str:
        return f"http://127.0.0.1:{self.port}/bullmq/queues/{queue}/jobs/{job_id}/{route}"

    def link(self, queue: str, job_id: str, seconds: int = 3600) -> str:
        """Return a watch link, signed as a backend signs one."""
        token = watch_token(SECRET, queue, job_id, int(time.time()) + seconds)
        return f"{self.url(queue, job_id, 'watch')}#token={token}"

    def post(self, queue: str, job_id: str, route: str, token: str, body: bytes) -> int:
        """Report on a job through nginx, as a worker does; return the status."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        path = f"/bullmq/queues/{queue}/jobs/{job_id}/{route}"
        return http_call(conn, "POST", path, body, token=token).status


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Site]:
    yield from served_site(tmp_path_factory, redis_url)


def served_site(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, session_seconds: int = 3600
) -> Iterator[Site]:
    """Yield the service under gunicorn behind nginx, until the caller is done."""
    directory = tmp_path_factory.mktemp("page")
    site = Site(directory, redis_url, session_seconds)
    site.port = free_port()
    with site.gunicorn:
        nginx = start_nginx(
            nginx_binary(), directory, Path(site.gunicorn.bind.removeprefix("unix:")), site.port
        )
        try:
            yield site
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
            assert nginx.stderr is not None
            nginx.stderr.close()
            site.data.close()


class BullJob:
    """A job of the real BullMQ library for Python, held by a real Worker until finish()
    or fail(); its calls run on an event loop of its own thread."""

    def __init__(self, redis_url: str, name: str = "resize") -> None:
        self.queue_name = f"page-{uuid.uuid4().hex[:8]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.outcome: tuple[str, Any] | None = None
        self.job: Job
        self.token: str
        self.run(self._start(redis_url, name))

    def run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(30)

    async def _start(self, redis_url: str, name: str) -> None:
        self.done = asyncio.Event()
        held: asyncio.Future[tuple[Job, str]] = self.loop.create_future()

        async def process(job: Job, token: str) -> Any:
            held.set_result((job, token))
            await self.done.wait()
            assert self.outcome is not None
            kind, value = self.outcome
            if kind == "failed":
                raise RuntimeError(value)
            return value

        self.queue = Queue(self.queue_name, {"connection": redis_url})
        await self.queue.add(name, {"n": 1}, {"attempts": 1})
        self.worker = Worker(self.queue_name, process, {"connection": redis_url})
        self.job, self.token = await asyncio.wait_for(held, 20)

    @property
    def id(self) -> str:
        return str(self.job.id)

    def log(self, line: str) -> None:
        """Append a line with the library's own job.log()."""
        self.run(self.job.log(line))

    def end(self, kind: str, value: Any) -> None:
        """Let the worker complete the job with a return value, or fail it."""
        self.outcome = (kind, value)
        self.loop.call_soon_threadsafe(self.done.set)

    def close(self) -> None:
        self.run(self.worker.close(force=True))
        self.run(self.queue.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def bull_job(redis_url: str) -> Iterator[Callable[..., BullJob]]:
    jobs: list[BullJob] = []

    def make(name: str = "resize") -> BullJob:
        jobs.append(BullJob(redis_url, name))
        return jobs[-1]

    yield make
    for job in jobs:
        job.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    # What the page's strict CSP refused (an inline style or script, say), noted
    # before any of the page's own script runs.
    context.add_init_script(
        "window.refused = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (e) => window.refused.push(`${e.violatedDirective} ${e.blockedURI}`));"
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    refused = page.evaluate("window.refused ?? []")
    context.close()
    assert errors == [], "the page's script threw"
    assert refused == [], "the page's CSP refused something of its own"


def shown_lines(page: Any) -> list[tuple[int, str]]:
    """Return the page's log lines as (number, text), in order."""
    rows = page.eval_on_selector_all(
        "#lines li[id]",
        "rows => rows.map(row => [row.querySelector('.number').textContent,"
        " row.querySelector('.text').textContent])",
    )
    return [(int(number), text) for number, text in rows]


def the_jobs_logs(site: Site, job: BullJob) -> list[tuple[int, str]]:
    lines: list[str] = site.data.lrange(f"bull:{job.queue_name}:{job.id}:logs", 0, -1)  # type: ignore[assignment]
    return list(enumerate(lines))


def until_shown(page: Any, expected: Callable[[], Any], actual: Callable[[], Any]) -> None:
    """Wait until the page shows what is expected; fail saying what it showed."""
    deadline = time.monotonic() + SECONDS
    while actual() != expected():
        if time.monotonic() > deadline:
            assert actual() == expected()
        page.wait_for_timeout(50)


def text_of(page: Any, selector: str) -> str:
    return page.locator(selector).text_content()


def test_the_page_shows_a_bullmq_job_live_until_it_completes(site, page, bull_job):
    job = bull_job("resize")
    job.log("info: fetched the image")
    assert site.post(job.queue_name, job.id, "logs", job.token, b"warn: it is large") == 200
    progress = json.dumps({"current": 1, "total": 4, "message": "scaling"}).encode()
    assert site.post(job.queue_name, job.id, "progress", job.token, progress) == 200

    link = site.link(job.queue_name, job.id)
    page.goto(link)
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    # The token left the address bar, for a cookie only the job's routes get: a session
    # of the page's own, not the link's token.
    assert page.url == site.url(job.queue_name, job.id, "watch")
    (cookie,) = page.context.cookies()
    assert link.split("#token=")[1] not in cookie["value"]
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (
        "bullmq_watch",
        True,
        "Strict",
    )
    assert cookie["path"] == f"/bullmq/queues/{job.queue_name}/jobs/{job.id}/"
    assert text_of(page, "h1 .job") == job.id and text_of(page, "#name") == "resize"
    assert text_of(page, "#status") == "active"
    # When it was queued and started, in the reader's time zone, and how long it has
    # run, ticking.
    times = text_of(page, "#times")
    assert times.startswith("queued ") and " · started " in times and " · running for " in times
    until_shown(page, lambda: True, lambda: text_of(page, "#times") != times)
    until_shown(page, lambda: "25% · scaling", lambda: text_of(page, "#progress-text"))
    assert page.get_attribute("#bar", "aria-valuenow") == "25"
    until_shown(page, lambda: the_jobs_logs(site, job), lambda: shown_lines(page))
    assert page.get_attribute("#L0", "class") == "info"
    assert page.get_attribute("#L1", "class") == "warn"

    # Live: lines from the service and from job.log(), and progress, as they come.
    for n in range(5):
        job.log(f"library line {n}")
        assert site.post(job.queue_name, job.id, "logs", job.token, f"service line {n}".encode())
    assert site.post(job.queue_name, job.id, "progress", job.token, b"60") == 200
    until_shown(page, lambda: "60%", lambda: text_of(page, "#progress-text"))
    # The README's own progress example draws as a bar too.
    example = readme_snippet("sh", "jobs/42/progress \\")
    body = example.split("-d '")[1].split("'")[0].encode()
    assert site.post(job.queue_name, job.id, "progress", job.token, body) == 200
    until_shown(page, lambda: "30%", lambda: text_of(page, "#progress-text"))
    assert page.get_attribute("#bar", "aria-valuenow") == "30"
    until_shown(page, lambda: the_jobs_logs(site, job), lambda: shown_lines(page))

    job.end("completed", {"thumbnails": 3})
    page.wait_for_selector("#connection[data-state=ended]", timeout=SECONDS * 1000)
    assert text_of(page, "#status") == "completed"
    until_shown(page, lambda: True, lambda: " · finished " in text_of(page, "#times"))
    ended = text_of(page, "#times")
    assert " · ran " in ended
    page.wait_for_timeout(1500)
    assert text_of(page, "#times") == ended  # it stopped ticking
    assert json.loads(text_of(page, "#outcome-body")) == {"thumbnails": 3}
    assert shown_lines(page) == the_jobs_logs(site, job)
    assert len(shown_lines(page)) == 12


@pytest.fixture
def short_sessions(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Site]:
    """The service with sessions of 4 s, which a page renews every 2."""
    yield from served_site(tmp_path_factory, redis_url, session_seconds=4)


def test_an_open_page_renews_its_session_and_a_reload_uses_it(short_sessions, page, bull_job):
    site = short_sessions
    job = bull_job()
    page.goto(site.link(job.queue_name, job.id))
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    (first,) = page.context.cookies()
    wait_until(
        lambda: page.context.cookies()[0]["value"] != first["value"], SECONDS, "a new session"
    )
    (renewed,) = page.context.cookies()
    assert renewed["expires"] > first["expires"]
    job.log("after the first session")
    # Past the first session's end, a reload (no token in the address now) opens the
    # job by the renewed one.
    wait_until(lambda: time.time() > first["expires"] + 1, SECONDS, "the first session's end")
    page.reload()
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    until_shown(page, lambda: the_jobs_logs(site, job), lambda: shown_lines(page))


def waiting_job(redis_url: str, name: str, **opts: Any) -> tuple[str, str]:
    """Add a job to a queue of its own with BullMQ's Python library; return the queue's
    name and the job's id."""
    queue_name = f"page-{uuid.uuid4().hex[:8]}"

    async def adding() -> str:
        queue = Queue(queue_name, {"connection": redis_url})
        try:
            return str((await queue.add(name, {"n": 1}, opts)).id)
        finally:
            await queue.close()

    # In a thread of its own: Playwright's loop runs in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return queue_name, pool.submit(asyncio.run, adding()).result(30)


def claim_over_http(site: Site, queue_name: str, job_id: str) -> dict[str, Any]:
    """Claim the queue's next job through the proxy, as an HTTP worker does; it must be
    job_id. Return the claim's answer."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=10)
    answer = http_call(conn, "POST", f"/bullmq/queues/{queue_name}/claim", token=API_TOKEN)
    claimed: dict[str, Any] = json.loads(answer.body)
    assert claimed["id"] == job_id
    return claimed


def test_a_job_worked_over_http_shows_from_claim_to_completion(site, page, redis_url):
    queue_name, job_id = waiting_job(redis_url, "resize")
    claimed = claim_over_http(site, queue_name, job_id)
    page.goto(site.link(queue_name, job_id))
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    assert text_of(page, "#status") == "active"
    token = claimed["token"]
    assert site.post(queue_name, job_id, "logs", token, b"resized 3 of 4") == 200
    assert site.post(queue_name, job_id, "progress", token, b"75") == 200
    until_shown(page, lambda: [(0, "resized 3 of 4")], lambda: shown_lines(page))
    until_shown(page, lambda: "75%", lambda: text_of(page, "#progress-text"))
    assert site.post(queue_name, job_id, "complete", token, b'{"thumbnails": 4}') == 200
    page.wait_for_selector("#connection[data-state=ended]", timeout=SECONDS * 1000)
    assert text_of(page, "#status") == "completed"
    assert json.loads(text_of(page, "#outcome-body")) == {"thumbnails": 4}


def test_a_retried_job_shows_its_attempts_and_where_each_began(site, page, redis_url):
    """Attempts of 3: the first fails over HTTP and is retried; the page, open all the
    while, marks where the second began, with why the first failed, and its badge
    counts them."""
    queue_name, job_id = waiting_job(redis_url, "charge", attempts=3)

    def claim() -> str:
        return str(claim_over_http(site, queue_name, job_id)["token"])

    first = claim()
    page.goto(site.link(queue_name, job_id))
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    assert text_of(page, "#attempt") == "attempt 1 of 3"
    assert site.post(queue_name, job_id, "logs", first, b"trying the card") == 200
    until_shown(page, lambda: [(0, "trying the card")], lambda: shown_lines(page))
    assert site.post(queue_name, job_id, "fail", first, b"the card was declined") == 200
    second = claim()
    until_shown(page, lambda: "attempt 2 of 3", lambda: text_of(page, "#attempt"))
    assert site.post(queue_name, job_id, "logs", second, b"trying again") == 200
    rows = "rows => rows.map(r => (r.querySelector('.text') ?? r).textContent)"
    until_shown(
        page,
        lambda: [
            "trying the card",
            "Attempt 2 of 3 began · attempt 1 failed: the card was declined",
            "trying again",
        ],
        lambda: page.eval_on_selector_all("#lines li", rows),
    )
    assert page.get_attribute("#lines li.attempt", "role") == "separator"


def assert_still(page: Any) -> None:
    """Assert that nothing on the page keeps moving: no animation runs (a transition
    may be finishing)."""
    running = page.evaluate(
        "document.getAnimations().filter((a) => a instanceof CSSAnimation"
        " && a.playState === 'running').map((a) => a.animationName)"
    )
    assert running == []


def test_a_failed_job_shows_its_reason(site, page, bull_job):
    job = bull_job()
    page.goto(site.link(job.queue_name, job.id))
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    job.end("failed", "the disk is full")
    page.wait_for_selector("#status[data-state=failed]", timeout=SECONDS * 1000)
    assert text_of(page, "#outcome-title") == "Failed. Reason:"
    assert text_of(page, "#outcome-body") == "the disk is full"
    assert text_of(page, "#connection") == "ended"
    # It reported no progress: the bar stands empty, not busy.
    assert page.get_attribute("#bar", "class") == "bar"
    assert_still(page)


ANSI = [
    "\x1b[31mred\x1b[0m plain \x1b[1mbold\x1b[22m \x1b[38;5;208morange\x1b[39m "
    "\x1b[38;2;1;2;3mrgb\x1b[0m \x1b]0;a title\x07\x1b[2K\x1b[?25lgone \x1b[92;41mbright",
    "[WARN] the disk is 90% full",
    "ERROR the disk is full",
    "info: cleaned up",
    "warning: slow",
    "plain to the end",
]


def test_levels_and_ansi_colours_draw_and_filter(site, page, bull_job):
    job = bull_job()
    for line in ANSI:
        assert site.post(job.queue_name, job.id, "logs", job.token, line.encode()) == 200
    page.goto(site.link(job.queue_name, job.id))
    page.wait_for_selector("#L5", timeout=SECONDS * 1000)
    # SGR draws; every other escape sequence is gone; the text is the line's own.
    assert text_of(page, "#L0 .text") == "red plain bold orange rgb gone bright"
    drawn = page.eval_on_selector_all(
        "#L0 .text *",
        "spans => spans.map(s => [s.tagName, s.textContent, getComputedStyle(s).color,"
        " getComputedStyle(s).backgroundColor, getComputedStyle(s).fontWeight])",
    )
    assert [span[:2] for span in drawn] == [
        ["SPAN", "red"], ["SPAN", "bold"], ["SPAN", "orange"], ["SPAN", "rgb"], ["SPAN", "bright"]
    ]  # fmt: skip
    red, bold, orange, rgb, bright = drawn
    assert red[2] == "rgb(205, 49, 49)" and bold[4] == "700"
    assert orange[2] == "rgb(255, 135, 0)" and rgb[2] == "rgb(1, 2, 3)"
    assert bright[2] == "rgb(35, 209, 139)" and bright[3] == "rgb(205, 49, 49)"
    classes = [page.get_attribute(f"#L{n}", "class") for n in range(6)]
    assert classes == [None, "warn", "error", "info", "warn", None]
    # Warnings and errors only, from the keyboard.
    page.focus("#severe")
    page.keyboard.press("Enter")
    assert page.get_attribute("#severe", "aria-pressed") == "true"
    visible = page.eval_on_selector_all(
        "#lines li", "rows => rows.filter(r => !r.hidden).map(r => r.id)"
    )
    assert visible == ["L1", "L2", "L4"]
    page.keyboard.press("Enter")
    visible = page.eval_on_selector_all(
        "#lines li", "rows => rows.filter(r => !r.hidden).map(r => r.id)"
    )
    assert len(visible) == 6


SECTIONED = [
    "--- fetching",
    "fetched 3 images",
    "::group::resizing",
    "resized 1",
    "resized 2",
    "::endgroup::",
    "~~~ details",
    "a detail",
    "+++ uploading",
    "uploaded",
]


def test_ci_style_sections_fold_and_stay_open_while_the_job_is_on_them(site, page, bull_job):
    job = bull_job()
    for line in SECTIONED:
        assert site.post(job.queue_name, job.id, "logs", job.token, line.encode()) == 200
    page.goto(site.link(job.queue_name, job.id))
    page.wait_for_selector("#L9", timeout=SECONDS * 1000)
    visible = "rows => rows.filter(r => !r.hidden).map(r => r.id)"
    # Each section folded once the job moved on; "details" was written folded; the
    # one the job is on is open.
    assert page.eval_on_selector_all("#lines li", visible) == ["L0", "L2", "L6", "L8", "L9"]
    heads = page.eval_on_selector_all(
        "#lines button.fold", "bs => bs.map(b => [b.textContent, b.getAttribute('aria-expanded')])"
    )
    assert heads == [
        ["fetching", "false"], ["resizing", "false"], ["details", "false"], ["uploading", "true"]
    ]  # fmt: skip
    # Opened by hand, from the keyboard: it stays open as lines come.
    page.focus("#L2 button.fold")
    page.keyboard.press("Enter")
    assert page.eval_on_selector_all("#lines li", visible) == [
        "L0", "L2", "L3", "L4", "L5", "L6", "L8", "L9"
    ]  # fmt: skip
    assert site.post(job.queue_name, job.id, "logs", job.token, b"--- done") == 200
    page.wait_for_selector("#L10", timeout=SECONDS * 1000)
    assert page.eval_on_selector_all("#lines li", visible) == [
        "L0", "L2", "L3", "L4", "L5", "L6", "L8", "L10"
    ]  # fmt: skip


def test_the_whole_of_a_100000_line_log_reads_in_place_and_any_line_is_a_link(site, page, bull_job):
    """The page opens with the newest 1,000 lines of 100,000; scrolled up, it reads the
    earlier ones a page at a time, in place, the reader's line kept where it was; and
    a link to any line (#L<n>), reloaded, reads the page around it, not the 99,000
    between."""
    job = bull_job()
    key = f"bull:{job.queue_name}:{job.id}:logs"
    for start in range(0, 100_000, 10_000):
        site.data.rpush(key, *(f"line {n}" for n in range(start, start + 10_000)))
    page.goto(site.link(job.queue_name, job.id))
    page.wait_for_selector("#L99999", timeout=SECONDS * 1000)
    rows = "rows => rows.map(r => r.id || r.className)"
    shown = page.eval_on_selector_all("#lines li", rows)
    assert shown == ["gap", *(f"L{n}" for n in range(99_000, 100_000))]
    assert text_of(page, "#lines li.gap").startswith("99,000 earlier lines")
    # Scrolled to the top: the page before comes in above, the reader stays on L99000.
    page.evaluate("lines.scrollTop = 0; lines.dispatchEvent(new Event('scroll'))")
    page.wait_for_selector("#L98900", timeout=SECONDS * 1000)
    assert text_of(page, "#L98900 .text") == "line 98900"
    assert text_of(page, "#lines li.gap").startswith("98,900 earlier lines")
    top = page.evaluate("L99000.getBoundingClientRect().top - lines.getBoundingClientRect().top")
    assert 0 <= top < 40  # where the first line shown was
    # A link to line 50,000, reloaded: that page of the log, with what is not read yet
    # above and below it.
    page.evaluate("location.hash = 'L50000'")
    page.reload()
    page.wait_for_selector("#L50000.target", timeout=SECONDS * 1000)
    assert page.evaluate(
        "(r => r.top >= 0 && r.bottom <= innerHeight)(L50000.getBoundingClientRect())"
    )
    shown = page.eval_on_selector_all("#lines li", rows)
    assert shown == ["gap", *(f"L{n}" for n in range(49_950, 50_050)), "gap",
                     *(f"L{n}" for n in range(99_000, 100_000))]  # fmt: skip
    gaps = page.eval_on_selector_all("#lines li.gap", "gs => gs.map(g => g.textContent)")
    assert gaps[0].startswith("49,950 earlier lines") and gaps[1].startswith("48,950 earlier")


def test_a_stamped_line_shows_when_it_came_in_the_readers_time_zone(site, browser, bull_job):
    """LOG_LINE_TIMESTAMPS's lines (docs/operations.md's format) show their time as a
    column, not as text; a line without one shows none, and is not guessed at."""
    job = bull_job()
    site.data.rpush(f"bull:{job.queue_name}:{job.id}:logs",
                    "2026-12-05T11:45:56.123Z charged card", "written by job.log()")  # fmt: skip
    context = browser.new_context(timezone_id="Asia/Tokyo", locale="en-GB")
    try:
        page = context.new_page()
        page.goto(site.link(job.queue_name, job.id))
        page.wait_for_selector("#L1", timeout=SECONDS * 1000)
        assert shown_lines(page) == [(0, "charged card"), (1, "written by job.log()")]
        assert text_of(page, "#L0 .at") == "20:45:56.123"
        assert page.get_attribute("#L0 .at", "datetime") == "2026-12-05T11:45:56.123Z"
        assert text_of(page, "#L1 .at") == ""
    finally:
        context.close()


HOSTILE = [
    '<img src=x onerror="window.ran = 1">',
    "</script><script>window.ran = 2</script>",
    '"><svg onload="window.ran = 3">',
]


def test_log_lines_are_text_and_run_nothing(site, page, bull_job):
    job = bull_job('<b onmouseover="window.ran = 4">name</b>')
    for line in HOSTILE:
        assert site.post(job.queue_name, job.id, "logs", job.token, line.encode()) == 200
    page.goto(site.link(job.queue_name, job.id))
    until_shown(page, lambda: list(enumerate(HOSTILE)), lambda: shown_lines(page))
    assert text_of(page, "#name") == '<b onmouseover="window.ran = 4">name</b>'
    assert page.locator("#lines img, #lines svg, #lines script, #name b").count() == 0
    assert page.evaluate("window.ran") is None


def test_it_reconnects_through_a_reload_and_an_outage_missing_nothing(site, page, bull_job):
    job = bull_job()
    page.goto(site.link(job.queue_name, job.id))
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    written = 0

    def write(count: int) -> None:
        nonlocal written
        for _ in range(count):
            job.log(f"line {written}")
            written += 1

    write(3)
    # The stream's own token (WATCH_TOKEN_SECONDS=1) is long past by the reload.
    time.sleep(1.5)
    # A reload: gunicorn's old worker cuts its streams; the browser reconnects itself.
    os.kill(site.gunicorn.process.pid, signal.SIGHUP)
    write(3)
    until_shown(page, lambda: the_jobs_logs(site, job), lambda: shown_lines(page))

    # The service down for seconds: nginx answers 502, and the browser gives up its
    # EventSource; the page reconnects itself, with backoff, from where it was.
    site.gunicorn.stop()
    write(4)
    wait_until(
        lambda: page.get_attribute("#connection", "data-state") == "reconnecting",
        SECONDS,
        "the page to see the outage",
    )
    time.sleep(2)
    site.gunicorn.start()
    write(2)
    until_shown(page, lambda: the_jobs_logs(site, job), lambda: shown_lines(page))
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    assert [number for number, _ in shown_lines(page)] == list(range(12))


def test_a_hidden_tab_closes_its_stream_and_resumes_exactly(site, page, bull_job):
    job = bull_job()
    job.log("before")
    page.goto(site.link(job.queue_name, job.id))
    until_shown(page, lambda: the_jobs_logs(site, job), lambda: shown_lines(page))
    set_hidden(page, True)
    assert text_of(page, "#connection") == "paused"
    for n in range(20):
        job.log(f"while hidden {n}")
    job.run(job.job.updateProgress(70))
    page.wait_for_timeout(500)
    assert len(shown_lines(page)) == 1  # nothing came while hidden: the stream was closed
    set_hidden(page, False)
    until_shown(page, lambda: the_jobs_logs(site, job), lambda: shown_lines(page))
    until_shown(page, lambda: "70%", lambda: text_of(page, "#progress-text"))


def set_hidden(page: Any, hidden: bool) -> None:
    """Make the page see its tab hidden or shown, as a browser tells it."""
    page.evaluate(
        """hidden => {
            Object.defineProperty(document, "hidden", {value: hidden, configurable: true});
            Object.defineProperty(document, "visibilityState",
                {value: hidden ? "hidden" : "visible", configurable: true});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )


@pytest.mark.parametrize("which", ["expired", "foreign"])
def test_a_link_that_does_not_open_the_job_says_so(site, page, bull_job, which):
    job = bull_job()
    if which == "expired":
        token = watch_token(SECRET, job.queue_name, job.id, int(time.time()) - 1)
    else:
        token = watch_token(SECRET, job.queue_name, "another job", int(time.time()) + 60)
    page.goto(f"{site.url(job.queue_name, job.id, 'watch')}#token={token}")
    page.wait_for_selector("#problem:not([hidden])", timeout=SECONDS * 1000)
    assert text_of(page, "#problem") == "This link is not valid, or has expired: ask for a new one."
    assert text_of(page, "#connection") == "ended"
    assert page.context.cookies() == []
    # Its message alone: no empty controls, and nothing moving.
    assert not page.is_visible(".progress") and not page.is_visible(".logs")
    assert_still(page)


@pytest.mark.parametrize(
    "job_id",
    ["repeat:8f2a1c:1732870000000", "user@example.com", "a(1)", "a/b", "x;y", "[z]", "ünï 1"],
)
def test_a_link_works_for_every_job_id_bullmq_makes_behind_the_proxy(site, page, job_id):
    """nginx re-encodes the path it passes on: the cookie must be scoped to the path as
    the browser writes it, or the browser never sends it back."""
    add_active_job(site.data, "links", job_id, "a-job-token")
    site.data.rpush(f"bull:links:{job_id}:logs", f"info: the line of {job_id}")
    token = watch_token(SECRET, "links", job_id, int(time.time()) + 3600)
    watch = site.url("links", quote(job_id, safe=""), "watch")
    page.goto(f"{watch}#token={token}")
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    until_shown(page, lambda: [(0, f"info: the line of {job_id}")], lambda: shown_lines(page))
    # Reloaded, the page has its cookie alone: the link's token left the address bar.
    page.reload()
    page.wait_for_selector("#connection[data-state=live]", timeout=SECONDS * 1000)
    until_shown(page, lambda: [(0, f"info: the line of {job_id}")], lambda: shown_lines(page))
    assert text_of(page, "#problem") == ""


def test_reading_tools_filter_follow_copy_anchor_and_download(site, page, bull_job):
    job = bull_job()
    # More lines than the page opens with (1,000): it shows the newest, and says so.
    job.run(job.job.log("info: step 0"))
    lines = [f"{'error' if n % 100 == 7 else 'info'}: step {n}" for n in range(1, 1500)]
    site.data.rpush(f"bull:{job.queue_name}:{job.id}:logs", *lines)
    newest = lambda: the_jobs_logs(site, job)[-1000:]  # noqa: E731
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(site.link(job.queue_name, job.id))
    until_shown(page, newest, lambda: shown_lines(page))
    assert text_of(page, "#lines li.gap").startswith("500 earlier lines: scroll up")
    # Following: the newest line is in view.
    assert page.evaluate("(l => l.scrollHeight - l.scrollTop - l.clientHeight)(lines)") < 8
    # Scrolled up, it stops following; new lines do not move the reader.
    page.evaluate("lines.scrollTop = 400; lines.dispatchEvent(new Event('scroll'))")
    assert text_of(page, "#follow") == "Follow"
    job.log("info: newest")
    until_shown(page, lambda: the_jobs_logs(site, job)[500:], lambda: shown_lines(page))
    assert page.evaluate("lines.scrollTop") == 400
    page.click("#follow")
    assert text_of(page, "#follow") == "Following"

    page.fill("#filter", "ERROR:")
    visible = page.eval_on_selector_all(
        "#lines li:not([hidden]) .text", "rows => rows.map(row => row.textContent)"
    )
    assert visible == [f"error: step {n}" for n in range(507, 1500, 100)]
    assert len(visible) == 10
    page.fill("#filter", "")

    page.hover("#L1107")
    page.click("#L1107 .copy")
    assert page.evaluate("navigator.clipboard.readText()") == "error: step 1107"

    # A line's anchor survives a reload (by the cookie: the link's token is gone).
    page.click("#L1107 .number")
    page.reload()
    until_shown(page, newest, lambda: shown_lines(page))
    assert page.url.endswith("/watch#L1107")
    assert "target" in page.get_attribute("#L1107", "class")

    with page.expect_download() as download:
        page.click("#download")
    text = Path(download.value.path()).read_text()
    assert text == "".join(f"{line}\n" for _, line in the_jobs_logs(site, job))


def test_it_reads_on_a_phone_in_the_dark(site, browser, bull_job):
    job = bull_job()
    job.log("a line long enough to wrap on a narrow screen " * 4)
    backgrounds = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(
            viewport={"width": 375, "height": 700}, color_scheme=scheme, is_mobile=True
        )
        page = context.new_page()
        page.goto(site.link(job.queue_name, job.id))
        page.wait_for_selector("#L0", timeout=SECONDS * 1000)
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        # Nothing wider than the screen: no sideways scrolling.
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        context.close()
    assert backgrounds == {"light": "rgb(255, 255, 255)", "dark": "rgb(13, 17, 23)"}
