"""The watch page's session: a link traded for a cookie, what the cookie opens and for
how long; the page's files; and every line of a job as text."""

from __future__ import annotations

import re
import time

import pytest

from bullmq_http.tokens import watch_token
from harness.clients import add_active_job
from harness.servers import wait_until
from tests.helpers import (
    API_TOKEN,
    JOB_TOKEN,
    ROOT,
    WATCH_SECRET,
    bearer,
)


def test_a_page_exchanges_its_link_for_a_cookie_that_opens_its_job_only(make_app, job, r):
    job()
    job(job_id="2")
    r.rpush("bull:orders:1:logs", "first", "second <b>")
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET, WATCH_SESSION_SECONDS=120).test_client()
    expires = int(time.time()) + 600
    token = watch_token(WATCH_SECRET, "orders", "1", expires)
    response = client.post("/queues/orders/jobs/1/watch/session", data=token)
    summary = {"queue": "orders", "id": "1", "name": "job", "state": "active"}
    # The job's times and attempts as BullMQ holds them: added and started, not finished;
    # its first attempt of one.
    held = r.hmget("bull:orders:1", "timestamp", "processedOn")
    times = {
        "timestamp": int(held[0]), "processedOn": int(held[1]), "finishedOn": None,
        "attemptsMade": 0, "attemptsStarted": 1, "attempts": 1, "failedReason": None,
    }  # fmt: skip
    assert (response.status_code, response.json) == (
        200, {**summary, **times, "expires": expires, "session_seconds": 120}
    )  # fmt: skip
    cookie = response.headers["Set-Cookie"]
    session = cookie.removeprefix("bullmq_watch=").split(";")[0]
    # What the page keeps is a session of its own, not the link's token, and it ends
    # before the link does.
    assert cookie.startswith("bullmq_watch=") and token not in cookie
    assert token.split(".")[-1] not in session
    attributes = {part.strip().split("=")[0] for part in cookie.split(";")[1:]}
    assert {"Max-Age", "Path", "HttpOnly", "SameSite"} <= attributes
    assert "Path=/queues/orders/jobs/1/" in cookie and "SameSite=Strict" in cookie
    assert "; Max-Age=120;" in cookie
    # The cookie opens this job's events and its lines as text, with no token in the URL.
    stream = client.get("/queues/orders/jobs/1/events", buffered=False)
    assert stream.status_code == 200
    stream.close()
    text = client.get("/queues/orders/jobs/1/logs.txt")
    assert (text.status_code, text.mimetype, text.data) == (
        200, "text/plain", b"first\nsecond <b>\n"
    )  # fmt: skip
    assert text.headers["Content-Disposition"] == "attachment; filename*=UTF-8''orders-1.log"
    # Another job's routes: the browser does not send it there, and it opens nothing.
    assert client.get("/queues/orders/jobs/2/events").status_code == 401
    client.set_cookie("bullmq_watch", session, path="/queues/orders/jobs/2/")
    refused = client.get("/queues/orders/jobs/2/logs.txt")
    assert (refused.status_code, refused.text) == (401, "the watch token is not valid for this job")
    # A page of its job's lines, as the page reads earlier ones; but no other API route:
    # reading the progress takes an API token.
    page = client.get("/queues/orders/jobs/1/logs?start=1&length=1")
    assert (page.status_code, page.json) == (200, {"count": 2, "logs": ["second <b>"]})
    assert client.get("/queues/orders/jobs/1/progress").status_code == 401
    # A session is no link (?token=), and a link's token is no session (the cookie).
    assert client.get(f"/queues/orders/jobs/1/logs.txt?token={session}").status_code == 401
    fresh = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    fresh.set_cookie("bullmq_watch", token, path="/queues/orders/jobs/1/")
    assert fresh.get("/queues/orders/jobs/1/logs.txt").status_code == 401


def session_of(response) -> tuple[str, int]:
    """Return the session cookie a response set, and its Max-Age."""
    cookie = response.headers["Set-Cookie"]
    found = re.fullmatch(r"bullmq_watch=([^;]+);.* Max-Age=(\d+);.*", cookie)
    assert found, cookie
    return found[1], int(found[2])


def test_a_pages_session_ends_on_its_own_and_is_renewed_never_past_its_link(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET, WATCH_SESSION_SECONDS=2).test_client()
    link = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) + 3600)
    first, lasts = session_of(client.post("/queues/orders/jobs/1/watch/session", data=link))
    ends = int(first.split(".")[0])
    assert lasts == 2 and link not in first
    # Read before it ends, the session is renewed: a new cookie that ends later.
    wait_until(lambda: int(time.time()) >= ends - 1, 3, "a second to pass")
    renewed = client.get("/queues/orders/jobs/1/watch/session")
    assert (renewed.status_code, renewed.json["session_seconds"]) == (200, 2)
    second, _ = session_of(renewed)
    assert int(second.split(".")[0]) > ends
    # Past its end, the session opens nothing, though the link is good for an hour.
    wait_until(lambda: time.time() > int(second.split(".")[0]), 3, "the session's end")
    client.set_cookie("bullmq_watch", second, path="/queues/orders/jobs/1/")
    refused = client.get("/queues/orders/jobs/1/events")
    assert (refused.status_code, refused.text) == (
        401, "the page's session has ended: open its link again"
    )  # fmt: skip
    # Renewed, a session never outlives its link.
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET, WATCH_SESSION_SECONDS=3600).test_client()
    link = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) + 30)
    assert session_of(client.post("/queues/orders/jobs/1/watch/session", data=link))[1] <= 30
    renewed = client.get("/queues/orders/jobs/1/watch/session")
    assert 0 < session_of(renewed)[1] <= 30 and renewed.json["session_seconds"] <= 30


def test_a_session_altered_by_hand_opens_nothing(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET, WATCH_SESSION_SECONDS=60).test_client()
    link = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) + 120)
    session, _ = session_of(client.post("/queues/orders/jobs/1/watch/session", data=link))
    ends, expires, share, minter, signature = session.split(".")
    later = str(int(ends) + 86_400)
    for forged in (
        f"{later}.{expires}.{share}.{minter}.{signature}",  # a longer session
        f"{ends}.{int(expires) + 86_400}.{share}.{minter}.{signature}",  # a longer link
        f"{ends}.{expires}.{'0' * 32}.{minter}.{signature}",  # another share
        f"{ends}.{expires}.{share}.{'1' * 32}.{signature}",  # another minter
        session[:-1],
    ):
        client.set_cookie("bullmq_watch", forged, path="/queues/orders/jobs/1/")
        refused = client.get("/queues/orders/jobs/1/watch/session")
        assert (refused.status_code, refused.text) == (
            401, "the watch token is not valid for this job"
        )  # fmt: skip


def test_a_page_reads_its_jobs_name_and_state_by_its_cookie(make_app, job, r):
    job(job_id="1", name="resize")
    r.hset("bull:orders:2", "name", "queued")
    job(job_id="3", name="done")
    r.zadd("bull:orders:completed", {"3": 1})
    r.hset("bull:orders:3", "returnvalue", "7")
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    expires = int(time.time()) + 600
    answers = {}
    for job_id in ("1", "2", "3"):
        token = watch_token(WATCH_SECRET, "orders", job_id, expires)
        assert (
            client.post(f"/queues/orders/jobs/{job_id}/watch/session", data=token).status_code
            == 200
        )
        response = client.get(f"/queues/orders/jobs/{job_id}/watch/session")
        assert response.status_code == 200
        answers[job_id] = (response.json["name"], response.json["state"], response.json["expires"])
    # A worker holds 1 (its lock); 2 waits; 3 completed.
    assert answers == {
        "1": ("resize", "active", expires),
        "2": ("queued", "waiting", expires),
        "3": ("done", "completed", expires),
    }
    # An API token reads it too; no watch token, no expiry.
    response = client.get("/queues/orders/jobs/1/watch/session", headers=bearer(API_TOKEN))
    assert (response.status_code, response.json["expires"]) == (200, None)
    # No credential: 401; a job that is not there: 404.
    fresh = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    assert fresh.get("/queues/orders/jobs/1/watch/session").status_code == 401
    token = watch_token(WATCH_SECRET, "orders", "9", expires)
    missing = fresh.post("/queues/orders/jobs/9/watch/session", data=token)
    assert (missing.status_code, missing.text) == (404, "job '9' not found in queue 'orders'")
    assert "Set-Cookie" not in missing.headers


def test_the_watch_page_is_served_with_strict_headers(make_app):
    client = make_app().test_client()
    response = client.get("/queues/orders/jobs/a%3Cb%3E%22x/watch")
    assert (response.status_code, response.mimetype) == (200, "text/html")
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "'unsafe-inline'" not in policy
    assert "connect-src 'self';" in policy and policy.endswith("frame-ancestors 'none'")
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"
    # The job id is text in the page, escaped; the page holds no job data.
    assert "<title>orders / a&lt;b&gt;&#34;x</title>" in response.text
    assert '<script src="watch.js" defer></script>' in response.text
    for name, mimetype in (("watch.js", "text/javascript"), ("watch.css", "text/css")):
        with client.get(f"/queues/orders/jobs/a%3Cb%3E%22x/{name}") as asset:
            assert (asset.status_code, asset.mimetype) == (200, mimetype)
            assert asset.data == (ROOT / "static" / name).read_bytes()
            assert asset.headers["X-Content-Type-Options"] == "nosniff"
    refused = client.get("/queues/orders/jobs/1/watch?token=1.x")
    assert (refused.status_code, refused.text) == (
        400,
        "unknown query parameter 'token': this route takes none",
    )
    framed = make_app(
        WATCH_FRAME_ANCESTORS=frozenset({"https://b.example", "https://a.example"})
    ).test_client()
    policy = framed.get("/queues/orders/jobs/1/watch").headers["Content-Security-Policy"]
    assert policy.endswith("frame-ancestors https://a.example https://b.example")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "the watch token is not valid for this job"),
        (b"12.abc", "the watch token is not valid for this job"),
    ],
)
def test_a_page_with_a_bad_link_gets_no_cookie(make_app, job, body, message):
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    response = client.post("/queues/orders/jobs/1/watch/session", data=body)
    assert (response.status_code, response.text) == (401, message)
    assert "Set-Cookie" not in response.headers


def test_logs_as_text_pages_through_every_line(make_app, job, r):
    job()
    lines = [f"line {n} " + "x" * 1000 for n in range(1000)]
    r.rpush("bull:orders:1:logs", *lines)
    client = make_app(MAX_PAGE_BYTES=50_000).test_client()
    response = client.get("/queues/orders/jobs/1/logs.txt", headers=bearer(API_TOKEN))
    assert response.status_code == 200
    assert response.text == "".join(f"{line}\n" for line in lines)
    # A page on another origin must not run a job's line as a script, or read it.
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cross-Origin-Resource-Policy"] == "same-origin"
    missing = client.get("/queues/orders/jobs/9/logs.txt", headers=bearer(API_TOKEN))
    assert (missing.status_code, missing.text) == (404, "job '9' not found in queue 'orders'")


@pytest.mark.parametrize(
    ("said", "path"),
    [
        ("/bullmq/queues/orders/jobs/a%3Bb/", "/bullmq/queues/orders/jobs/a%3Bb/"),
        ("/bullmq/queues/orders/jobs/a;b/", "/bullmq/queues/orders/jobs/"),
        (";/queues/orders/jobs/a;b/", "/queues/orders/jobs/a%3Bb/"),  # not a path: unused
        ("/elsewhere/", "/queues/orders/jobs/a%3Bb/"),  # not this job's: unused
        ("/queues/orders/jobs/a;b/\x01x", "/queues/orders/jobs/a%3Bb/"),
    ],
)
def test_the_cookie_path_is_the_one_the_page_says_when_it_names_the_job(make_app, job, said, path):
    job(job_id="a;b")
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    token = watch_token(WATCH_SECRET, "orders", "a;b", int(time.time()) + 60)
    response = client.post(
        "/queues/orders/jobs/a%3Bb/watch/session", data=token, headers={"X-Watch-Path": said}
    )
    assert response.status_code == 200
    assert f"; Path={path}" in response.headers["Set-Cookie"]


def test_the_cookie_path_is_the_jobs_path_as_the_client_wrote_it(service, job_id):
    """Under gunicorn the path is the one the browser asked for, which it matches the
    cookie against: escapes as it wrote them."""
    add_active_job(service.data, "orders", f"{job_id}/a b", JOB_TOKEN)
    token = watch_token(WATCH_SECRET, "orders", f"{job_id}/a b", int(time.time()) + 60)
    conn = service.server.connect()
    try:
        conn.request("POST", f"/queues/orders/jobs/{job_id}%2Fa%20b/watch/session", token)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert f"Path=/queues/orders/jobs/{job_id}%2Fa%20b/;" in response.getheader("Set-Cookie")
