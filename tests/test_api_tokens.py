"""API tokens scoped to queues, named in the log, stored as hashes, rotated live."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import create_app
from bullmq_http import tokens
from bullmq_http.settings import ConfigError
from harness.servers import Gunicorn, free_port, wait_until
from tests.helpers import NOT_AN_API_TOKEN, bearer, snapshot

DASHBOARD, BILLING, REPORTS = "d4shb0ard-token", "b1ll1ng-s3cret-token", "r3ports-token"
HASHED = "h4shed-token"
FILE = f"""\
# name        token                     queues
dashboard     {DASHBOARD}               *
billing-ui    {BILLING}                 billing-*,invoices
reports       {REPORTS}                 reports
auditor       sha256:{hashlib.sha256(HASHED.encode()).hexdigest()}  audit-?
"""


def read(client, queue: str, token: str):
    return client.get(f"/queues/{queue}/jobs/1/logs", headers=bearer(token))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(FILE)
    return path


@pytest.fixture
def scoped(make_app, token_file):
    """Return a test client of an app whose API tokens come from the file alone."""
    return make_app(AUTH_TOKENS=[], AUTH_TOKENS_FILE=str(token_file)).test_client()


@pytest.mark.parametrize(
    ("token", "queue", "status"),
    [
        (DASHBOARD, "billing-eu", 200),
        (DASHBOARD, "emails", 200),
        (BILLING, "billing-eu", 200),
        (BILLING, "billing-", 200),
        (BILLING, "invoices", 200),
        (BILLING, "invoices-old", 403),
        (BILLING, "emails", 403),
        (BILLING, "xbilling-eu", 403),
        (REPORTS, "reports", 200),
        (REPORTS, "reportsx", 403),
        (HASHED, "audit-1", 200),
        (HASHED, "audit-12", 403),
    ],
)
def test_a_token_reads_the_queues_its_globs_name(scoped, r, job, token, queue, status):
    job(queue=queue)
    assert read(scoped, queue, token).status_code == status


def test_a_403_names_the_queue_only_and_writes_nothing(scoped, r, job):
    job(queue="emails")
    before = snapshot(r)
    response = read(scoped, "emails", BILLING)
    assert response.status_code == 403
    assert response.get_data(as_text=True) == "this token may not read queue 'emails'"
    assert "WWW-Authenticate" not in response.headers
    assert snapshot(r) == before
    # Out of scope says nothing of whether the job exists.
    assert read(scoped, "no-such-queue", BILLING).status_code == 403


@pytest.mark.parametrize(
    "token", ["not-a-token", f"sha256:{hashlib.sha256(HASHED.encode()).hexdigest()}"]
)
def test_an_unknown_token_or_a_hash_sent_as_the_token_is_a_401(scoped, r, job, token):
    job()
    response = read(scoped, "orders", token)
    assert (response.status_code, response.get_data(as_text=True)) == (
        401,
        NOT_AN_API_TOKEN,
    )
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_a_file_of_bare_tokens_reads_every_queue_and_names_them_by_line(
    make_app, tmp_path, r, job, caplog
):
    path = tmp_path / "tokens"
    path.write_text("# old format\nfirst-token\n\n  second-token  \n")
    client = make_app(AUTH_TOKENS=["env-token"], AUTH_TOKENS_FILE=str(path)).test_client()
    job(queue="anything")
    caplog.set_level(logging.INFO, logger="bullmq_http.access")
    for token in ("first-token", "second-token", "env-token"):
        assert read(client, "anything", token).status_code == 200
    names = [record.getMessage().rsplit(" ", 1)[1] for record in caplog.records]
    assert names == ["AUTH_TOKENS_FILE.2", "AUTH_TOKENS_FILE.4", "AUTH_TOKENS.1"]
    assert not any("first-token" in record.getMessage() for record in caplog.records)


def test_the_access_log_names_the_token_never_the_secret(scoped, r, job, caplog):
    job(queue="invoices")
    caplog.set_level(logging.INFO, logger="bullmq_http.access")
    read(scoped, "invoices", BILLING)
    read(scoped, "emails", BILLING)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["billing-ui", "billing-ui"]
    assert [line.split('" ')[1].split()[0] for line in lines] == ["200", "403"]
    assert not any(BILLING in line for line in lines)


def test_hundreds_of_tokens_are_a_normal_file(make_app, tmp_path, r, job):
    path = tmp_path / "tokens"
    path.write_text("".join(f"team-{n} token-{n} queue-{n}\n" for n in range(500)))
    client = make_app(AUTH_TOKENS=[], AUTH_TOKENS_FILE=str(path)).test_client()
    job(queue="queue-499")
    assert read(client, "queue-499", "token-499").status_code == 200
    assert read(client, "queue-499", "token-498").status_code == 403


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("good-token\nname token\n", "line 2: expected a token alone, or three or four"),
        ("a b c d e\n", "line 1: expected a token alone, or three or four fields"),
        ("a b c d\n", "line 1: rights must be read, work or read,work, not 'd'"),
        ("a b c read,\n", "line 1: rights must be read, work or read,work, not 'read,'"),
        ("# c\nname sha256:abc *\n", "line 2: sha256: must be followed by 64 hex digits"),
        ("name token billing,,x\n", "line 1: an empty queue pattern in 'billing,,x'"),
        ("one token-1 *\none token-2 *\n", "the name one is given twice"),
        ("one same-token *\ntwo same-token *\n", "two is the same token as one"),
        (
            f"one {HASHED} *\ntwo sha256:{hashlib.sha256(HASHED.encode()).hexdigest()} *\n",
            "two is the same token as one",
        ),
        ("", "is empty"),
        ("\n \n", "is empty"),
        ("good-token\ncut-short", "does not end with a newline: it may be cut short"),
    ],
)
def test_a_malformed_file_stops_start_up_with_one_line(tmp_path, monkeypatch, text, reason):
    path = tmp_path / "tokens"
    path.write_text(text)
    monkeypatch.setenv("AUTH_TOKENS_FILE", str(path))
    with pytest.raises(ConfigError) as raised:
        create_app()
    message = str(raised.value)
    assert reason in message
    assert "\n" not in message
    if reason.startswith("line "):
        assert message.startswith(f"AUTH_TOKENS_FILE={str(path)!r} line ")


def test_a_byte_order_mark_before_the_first_token_is_dropped(make_app, tmp_path, r, job):
    """Windows editors save UTF-8 with a BOM: the first token must work all the same."""
    job(queue="emails")
    path = tmp_path / "tokens"
    path.write_bytes("\ufefffirst-token\nsecond second-token *\n".encode())
    client = make_app(AUTH_TOKENS=[], AUTH_TOKENS_FILE=str(path)).test_client()
    assert read(client, "emails", "first-token").status_code == 200
    assert read(client, "emails", "second-token").status_code == 200


def test_a_token_written_after_a_hash_is_a_comment_and_is_warned_of(
    make_app, tmp_path, r, job, caplog
):
    job(queue="emails")
    path = tmp_path / "tokens"
    path.write_text("# name token queues\n#c0mm3nted-0ut-t0ken-a8f3\nkept kept-token *\n")
    with caplog.at_level(logging.WARNING, logger="bullmq_http.tokens"):
        client = make_app(AUTH_TOKENS=[], AUTH_TOKENS_FILE=str(path)).test_client()
    assert read(client, "emails", "#c0mm3nted-0ut-t0ken-a8f3").status_code == 401
    assert read(client, "emails", "kept-token").status_code == 200
    assert [
        record.getMessage() for record in caplog.records if record.name == "bullmq_http.tokens"
    ] == [
        f"AUTH_TOKENS_FILE={str(path)!r} line 2 is a comment (it starts with #), not a token: "
        "a token in this file cannot start with #"
    ]


def test_a_token_in_the_file_and_the_environment_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text("shared-token\n")
    monkeypatch.setenv("AUTH_TOKENS", "shared-token")
    monkeypatch.setenv("AUTH_TOKENS_FILE", str(path))
    with pytest.raises(ConfigError, match=r"AUTH_TOKENS_FILE.1 is the same token as AUTH_TOKENS.1"):
        create_app()


def replace(path: Path, text: str) -> None:
    """Replace the file as docs/operations.md says to: write a new one, then rename it over."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


@pytest.fixture
def check_always(monkeypatch):
    """Look at the token file on every request, not once a second."""
    monkeypatch.setattr(tokens, "CHECK_SECONDS", 0)


def test_a_changed_file_is_used_without_a_restart(scoped, r, job, token_file, check_always):
    job(queue="emails")
    assert read(scoped, "emails", BILLING).status_code == 403
    replace(token_file, f"billing-ui {BILLING} billing-*,emails\nnewcomer new-token *\n")
    # Read in a thread of its own: in force once read, while requests go on.
    wait_until(lambda: read(scoped, "emails", BILLING).status_code == 200, 10, "the new file")
    assert read(scoped, "emails", "new-token").status_code == 200
    assert read(scoped, "emails", DASHBOARD).status_code == 401


@pytest.mark.parametrize(
    "bad",
    [
        "a b\n",  # malformed
        None,  # gone
        "",  # empty: the first instant of a rewrite in place
        "steady steady-token *\ncut cut-tok",  # cut short inside its last line
        "fifo",  # a FIFO: opening it would wait for a writer, for ever
    ],
)
def test_a_bad_file_keeps_the_last_good_set_and_says_so_once(
    scoped, r, job, token_file, check_always, caplog, bad
):
    job(queue="emails")
    if bad is None:
        token_file.unlink()
    elif bad == "fifo":
        token_file.unlink()
        os.mkfifo(token_file)
    else:
        replace(token_file, bad)

    def errors() -> list[str]:
        return [
            record.getMessage() for record in caplog.records if record.name == "bullmq_http.tokens"
        ]

    with caplog.at_level(logging.ERROR, logger="bullmq_http.tokens"):
        for _ in range(3):
            assert read(scoped, "emails", DASHBOARD).status_code == 200
            assert read(scoped, "emails", BILLING).status_code == 403
        wait_until(errors, 10, "the error")
        for _ in range(3):
            assert read(scoped, "emails", DASHBOARD).status_code == 200
            assert read(scoped, "emails", "cut-tok").status_code == 401  # no prefix works
    assert len(errors()) == 1
    assert errors()[0].startswith(f"AUTH_TOKENS_FILE={str(token_file)!r} ")
    assert errors()[0].endswith("the last good set of 4 API tokens stays")
    replace(token_file, "fixed fixed-token *\n")
    wait_until(lambda: read(scoped, "emails", "fixed-token").status_code == 200, 10, "the fix")
    assert read(scoped, "emails", DASHBOARD).status_code == 401


def statuses(server: Gunicorn, token: str, count: int) -> list[int]:
    """Read a job's logs `count` times, each on a new connection (any worker)."""
    answers = []
    for _ in range(count):
        conn = server.connect()
        conn.request("GET", "/queues/emails/jobs/1/logs", headers=bearer(token))
        answers.append(conn.getresponse().status)
        conn.close()
    return answers


@pytest.fixture
def served(tmp_path, redis_url, r, job) -> Iterator[tuple[Gunicorn, Path]]:
    """Serve the app under gunicorn, two workers, with API tokens from a file that
    starts with "old-token" and "steady-token"; yield the server and the file."""
    job(queue="emails")
    path = tmp_path / "tokens"
    path.write_text("steady steady-token *\nold old-token *\n")
    env = {"REDIS_URL": redis_url, "AUTH_TOKENS_FILE": str(path), "WEB_CONCURRENCY": "2"}
    with Gunicorn(tmp_path, env, bind=f"127.0.0.1:{free_port()}") as server:
        server.wait_for_workers(2)
        yield server, path


def until_accepted(server: Gunicorn, token: str) -> None:
    """Wait until every worker takes the token."""
    wait_until(lambda: statuses(server, token, 20) == [200] * 20, 10, f"{token} to be taken")


def test_rotation_under_load_fails_no_request_in_any_worker(served):
    server, path = served
    done = threading.Event()
    seen: list[int] = []

    def load() -> None:
        while not done.is_set():
            seen.extend(statuses(server, "steady-token", 10))

    loaders = [threading.Thread(target=load) for _ in range(4)]
    for loader in loaders:
        loader.start()
    time.sleep(0.5)  # under load before the rotation, and after it
    replace(path, "steady steady-token *\nnew new-token *\n")
    until_accepted(server, "new-token")
    old = statuses(server, "old-token", 20)
    time.sleep(0.5)
    done.set()
    for loader in loaders:
        loader.join()

    assert old == [401] * 20
    assert seen and set(seen) == {200}


def test_a_reload_signal_picks_up_a_changed_file(served):
    server, path = served
    assert statuses(server, "old-token", 4) == [200] * 4
    replace(path, "new new-token *\n")
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    until_accepted(server, "new-token")
    assert statuses(server, "old-token", 20) == [401] * 20


def test_a_large_changed_file_holds_up_no_request(serve, tmp_path, job):
    """100,000 lines are read beside the requests, which go on with the set in force."""
    job(queue="emails")
    path = tmp_path / "large-tokens"
    path.write_text("steady steady-token *\n")
    server = serve(AUTH_TOKENS="", AUTH_TOKENS_FILE=str(path))
    lines = "".join(f"team-{n} token-{n} queue-{n % 50}-*,emails\n" for n in range(100_000))
    replace(path, "steady steady-token *\n" + lines)
    slowest = 0.0
    for _ in range(20):  # the first looks at the file: it changed
        started = time.monotonic()
        assert server.send("GET", "/queues/emails/jobs/1/logs", None, "steady-token") == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.1)
    wait_until(
        lambda: server.send("GET", "/queues/emails/jobs/1/logs", None, "token-99999") == 200,
        20,
        "the new file to be in force",
    )
    assert slowest < 3  # generous: reading the file in the request took 7 s
