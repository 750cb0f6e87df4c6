"""Watch tokens: minted or signed by a backend, what they open, for how long, and from
which origins."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any
from urllib.parse import quote

import pytest

from app import WATCH_COOKIE, create_app
from bullmq_http.settings import ConfigError
from bullmq_http.tokens import WatchToken, session_token, watch_token
from harness.clients import EventStream, add_active_job
from tests.helpers import (
    API_TOKEN,
    JOB_TOKEN,
    WATCH_SECRET,
    StreamedBody,
    bearer,
    kinds,
    readme_snippet,
    take,
    unavailable,
)

# ------------------------------------------------------------------- watch tokens


def mint(service, queue: str, job_id: str, token: str = API_TOKEN) -> tuple[int, dict]:
    conn = service.server.connect()
    try:
        conn.request("POST", f"/queues/{queue}/jobs/{job_id}/events/token", None, bearer(token))
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if response.status == 200 else body.decode()
    finally:
        conn.close()


def test_a_watch_token_opens_its_jobs_stream_and_nothing_else(service, job_id):
    status, minted = mint(service, "orders", job_id)
    assert status == 200
    assert 290 <= minted["expires"] - time.time() <= 300
    token = minted["token"]
    path = f"/queues/orders/jobs/{job_id}"
    service.post(f"{path}/progress", b"7")
    with service.events(f"{path}/events?token={token}", headers={}) as stream:
        assert kinds(take(stream, 1)) == [("progress", "7")]
    # Not another job's stream, not a read of its logs, not an API token.
    add_active_job(service.data, "orders", "other", JOB_TOKEN)
    assert service.refusal(f"/queues/orders/jobs/other/events?token={token}", {}) == (
        401, "the watch token is not valid for this job"
    )  # fmt: skip
    assert service.refusal(f"{path}/logs", bearer(token))[0] == 401
    assert service.refusal(f"{path}/events?token=1.abc", {}) == (
        401, "the watch token is not valid for this job"
    )  # fmt: skip
    # Scoped API tokens mint only for their queues.
    assert mint(service, "orders", job_id, "narrow-token")[0] == 403
    # The access log never holds a watch token.
    assert token not in service.server.log.read_text()
    assert f"{path}/events?token=-" in service.server.log.read_text()


def test_a_watch_token_works_on_every_instance_sharing_the_secret(make_app, job, r):
    job()
    minting = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    response = minting.post("/queues/orders/jobs/1/events/token", headers=bearer(API_TOKEN))
    token = response.get_json()["token"]
    r.hset("bull:orders:1", "progress", "3")
    other = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    response = other.get(f"/queues/orders/jobs/1/events?token={token}", buffered=False)
    assert response.status_code == 200
    event = next(iter(EventStream(StreamedBody(response))))  # the job's state comes at once
    assert (event.event, event.data) == ("progress", "3")
    response.close()
    stranger = make_app(WATCH_TOKEN_SECRET="another secret, also 32 bytes or more").test_client()
    response = stranger.get(f"/queues/orders/jobs/1/events?token={token}")
    assert (response.status_code, response.text) == (
        401, "the watch token is not valid for this job"
    )  # fmt: skip


def test_an_expired_watch_token_is_refused(make_app, job):
    job()
    app = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET)
    token = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) - 1)
    response = app.test_client().get(f"/queues/orders/jobs/1/events?token={token}")
    assert (response.status_code, response.text) == (
        401, "the watch token has expired: ask for a new one"
    )  # fmt: skip


@pytest.mark.parametrize("minter", [None, "0123456789abcdef" * 2], ids=["signed offline", "minted"])
@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("GET", "events"),
        ("GET", "logs.txt"),
        ("GET", "logs"),
        ("GET", "watch/session"),
        ("POST", "watch/session"),
    ],
)
def test_an_expired_watch_token_opens_no_route_that_takes_one(make_app, job, minter, method, route):
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    token = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) - 1, minter)
    path = f"/queues/orders/jobs/1/{route}"
    if method == "POST":
        response = client.post(path, data=token)
    else:
        response = client.get(f"{path}?token={token}")
    assert (response.status_code, response.text) == (
        401, "the watch token has expired: ask for a new one"
    )  # fmt: skip
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("route", ["events", "logs.txt", "logs", "watch/session"])
def test_a_page_session_whose_link_expired_opens_nothing(make_app, job, route):
    """The page's cookie ends with its link: signed for a link that has expired, it is
    refused on every route the cookie goes to."""
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    lapsed = WatchToken(int(time.time()) - 1, None, "a-share")
    cookie, _ = session_token(WATCH_SECRET, "orders", "1", lapsed, 3600)
    client.set_cookie(WATCH_COOKIE, cookie, path="/queues/orders/jobs/1/")
    response = client.get(f"/queues/orders/jobs/1/{route}")
    assert response.status_code == 401, response.text


def test_without_a_secret_watch_tokens_are_off(client, job):
    job()
    response = client.post("/queues/orders/jobs/1/events/token", headers=bearer(API_TOKEN))
    assert (response.status_code, response.text) == (
        404, "watch tokens are off: set WATCH_TOKEN_SECRET, the same on every instance"
    )  # fmt: skip
    response = client.get("/queues/orders/jobs/1/events?token=123.abc")
    assert (response.status_code, response.text) == (
        401, "watch tokens are off on this server (WATCH_TOKEN_SECRET)"
    )  # fmt: skip


# Queue names and job ids the routes take, plain and less so.
TRICKY = [("orders", "1"), ("orders\na", "b"), ("q-é", 'x"y/z:1'), ("que\\", "[1]")]


def test_the_readmes_signers_sign_what_the_service_accepts(make_app, r):
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed")
    js = readme_snippet("js", "function watchToken")
    namespace: dict[str, Any] = {}
    exec(readme_snippet("python", "def watch_token"), namespace)  # noqa: S102
    expires = int(time.time()) + 60
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    signed = set()
    for queue, job_id in TRICKY:
        add_active_job(r, queue, job_id, JOB_TOKEN)
        run = subprocess.run(
            [node, "-e", js + "process.stdout.write(watchToken(...process.argv.slice(1, 4), "
             "Number(process.argv[4])));", WATCH_SECRET, queue, job_id, str(expires)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        token = run.stdout
        assert token == namespace["watch_token"](WATCH_SECRET, queue, job_id, expires)
        assert token == watch_token(WATCH_SECRET, queue, job_id, expires)
        signed.add(token)
        path = f"/queues/{quote(queue)}/jobs/{quote(job_id, safe='')}/events?token={token}"
        response = client.get(path, buffered=False)
        assert response.status_code == 200
        response.close()
    assert len(signed) == len(TRICKY)  # no two jobs share a token
    # Fields joined by newlines would sign these two alike.
    assert watch_token(WATCH_SECRET, "orders\na", "b", expires) != watch_token(
        WATCH_SECRET, "orders", "a\nb", expires
    )


PAGE = "https://app.example.com"


@pytest.mark.parametrize(
    ("origin", "credential", "allowed"),
    [
        (PAGE, "watch", True),
        ("https://evil.example.com", "watch", False),
        (PAGE, "api", False),  # a browser must never hold an API token
    ],
)
def test_pages_on_allowed_origins_may_read_streams_opened_with_a_watch_token(
    make_app, job, origin, credential, allowed
):
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET, WATCH_ALLOWED_ORIGINS=frozenset({PAGE}))
    token = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) + 60)
    path = "/queues/orders/jobs/1/events" + (f"?token={token}" if credential == "watch" else "")
    headers = {"Origin": origin, **(bearer(API_TOKEN) if credential == "api" else {})}
    response = client.test_client().get(path, headers=headers, buffered=False)
    assert response.status_code == 200
    assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
    assert response.headers["Vary"] == "Origin"
    response.close()
    # The preflight of a reconnect, which sends Last-Event-ID.
    preflight = client.test_client().options(path, headers={
        "Origin": origin, "Access-Control-Request-Headers": "last-event-id"})  # fmt: skip
    assert preflight.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
    if allowed:
        assert preflight.headers["Access-Control-Allow-Headers"] == "Last-Event-ID"


def test_without_allowed_origins_no_answer_carries_cors_headers(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET).test_client()
    token = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) + 60)
    path = f"/queues/orders/jobs/1/events?token={token}"
    response = client.get(path, headers={"Origin": PAGE}, buffered=False)
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    response.close()


@pytest.mark.parametrize("value", ["app.example.com", "https://app.example.com/", "ftp://x.y"])
def test_an_allowed_origin_must_be_an_origin(monkeypatch, value):
    monkeypatch.setenv("WATCH_ALLOWED_ORIGINS", value)
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value) == (
        f"WATCH_ALLOWED_ORIGINS={value!r} must be origins like https://app.example.com, "
        "comma separated"
    )


def test_a_link_lives_as_long_as_its_backend_chose_up_to_the_maximum(make_app, job):
    job()
    client = make_app(WATCH_TOKEN_SECRET=WATCH_SECRET, WATCH_TOKEN_MAX_SECONDS=7200).test_client()
    path = "/queues/orders/jobs/1/events"
    minted = client.post(f"{path}/token?seconds=7200", headers=bearer(API_TOKEN))
    assert minted.status_code == 200
    assert 7190 <= minted.json["expires"] - time.time() <= 7200
    too_long = client.post(f"{path}/token?seconds=7201", headers=bearer(API_TOKEN))
    assert (too_long.status_code, too_long.text) == (
        400,
        "seconds must be a whole number from 1 to 7200",
    )
    # Signed elsewhere: the same bound.
    far = watch_token(WATCH_SECRET, "orders", "1", int(time.time()) + 7300)
    response = client.get(f"{path}?token={far}")
    assert (response.status_code, response.text) == (
        401,
        "the watch token lives longer than WATCH_TOKEN_MAX_SECONDS=7200 allows",
    )
    response = client.get(f"{path}?token={minted.json['token']}", buffered=False)
    assert response.status_code == 200
    response.close()
