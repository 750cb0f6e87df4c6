"""One access-log line per request, a request id on every answer, trusted proxy hops."""

import logging
import re
import signal

import pytest

from harness.servers import wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, bearer

LINE = re.compile(r'(\S+) "(\S+) (\S+)" (\d{3}) (\d+\.\d\d)ms (\S+) (\S+)')


@pytest.fixture
def access(caplog):
    """Return the access-log lines written so far, parsed."""
    caplog.set_level(logging.INFO, logger="bullmq_http.access")

    def lines():
        records = [r for r in caplog.records if r.name == "bullmq_http.access"]
        return [LINE.fullmatch(record.getMessage()).groups() for record in records]

    return lines


def test_every_request_logs_one_line(client, job, access):
    job()
    client.post("/queues/orders/jobs/1/progress", data=b"5", headers=bearer(JOB_TOKEN))
    client.get("/queues/orders/jobs/1/logs?start=0&length=2", headers=bearer(API_TOKEN))
    client.post("/queues/orders/jobs/1/logs", data=b"", headers=bearer(JOB_TOKEN))
    client.get("/nowhere")
    logged = access()
    assert [(method, path, status) for _, method, path, status, *_ in logged] == [
        ("POST", "/queues/orders/jobs/1/progress", "200"),
        ("GET", "/queues/orders/jobs/1/logs?start=0&length=2", "200"),
        ("POST", "/queues/orders/jobs/1/logs", "400"),
        ("GET", "/nowhere", "404"),
    ]
    assert all(address == "127.0.0.1" for address, *_ in logged)
    assert all(float(duration) > 0 for *_, duration, _, _ in logged)
    # The API token's name where one was used; never a token itself.
    assert [name for *_, name in logged] == ["-", "AUTH_TOKENS.1", "-", "-"]


def test_request_id_is_passed_through_and_echoed(client, job, access):
    job()
    response = client.get("/healthz", headers={"X-Request-ID": "req-42:a/b"})
    assert response.headers["X-Request-ID"] == "req-42:a/b"
    assert access()[-1][5] == "req-42:a/b"


@pytest.mark.parametrize("sent", [None, "", "has space", "x" * 129, 'quote"', "é"])
def test_missing_or_unsafe_request_id_is_generated(client, access, sent):
    headers = {} if sent is None else {"X-Request-ID": sent.encode().decode("latin-1")}
    response = client.get("/healthz", headers=headers)
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert access()[-1][5] == request_id


def test_errors_carry_the_request_id_too(client, access):
    response = client.post("/queues/orders/jobs/1/progress", data=b"5")
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == access()[-1][5]


FORWARDED = {
    "X-Forwarded-For": "203.0.113.9, 10.0.0.2",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Prefix": "/bullmq",
}


def test_forwarded_headers_are_ignored_by_default(client, access):
    client.get("/healthz", headers=FORWARDED)
    address, _, path, *_ = access()[-1]
    assert (address, path) == ("127.0.0.1", "/healthz")


@pytest.mark.parametrize(("hops", "address"), [(1, "10.0.0.2"), (2, "203.0.113.9")])
def test_forwarded_headers_are_used_from_trusted_hops(make_app, access, hops, address):
    client = make_app(TRUSTED_PROXIES=hops).test_client()
    client.get("/healthz", headers=FORWARDED)
    logged_address, _, path, *_ = access()[-1]
    assert (logged_address, path) == (address, "/bullmq/healthz")


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        # A forged second line, as an attacker would try it.
        (
            "/x%0D%0A1.2.3.4%20%22POST%20/queues/orders/jobs/42/progress%22%20200%200.5ms%20f",
            r"/x\x0d\x0a1.2.3.4\x20\x22POST\x20/queues/orders/jobs/42/progress\x22\x20200"
            r"\x200.5ms\x20f",
        ),
        ("/a%1B[31mred%00%7F", r"/a\x1b[31mred\x00\x7f"),  # ANSI escape, NUL, DEL
        ("/back%5Cslash", r"/back\x5cslash"),
        ("/caf%C3%A9", "/café"),  # UTF-8 is text
        ("/%E2%80%A8", r"/\u2028"),  # a Unicode line separator
    ],
)
def test_what_a_client_sends_is_escaped_so_a_request_is_one_line(
    client, access, caplog, path, logged
):
    client.get(path)
    message = caplog.records[-1].getMessage()
    assert "\n" not in message and "\r" not in message
    assert access()[-1][1:4] == ("GET", logged, "404")


def test_a_forwarded_address_is_escaped_too(make_app, access):
    client = make_app(TRUSTED_PROXIES=1).test_client()
    client.get("/healthz", headers={"X-Forwarded-For": "10.0.0.2\x1b[2J\x00"})
    assert access()[-1][0] == r"10.0.0.2\x1b[2J\x00"


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_after_any_number_of_reloads_one_request_is_one_line(serve, log_format):
    server = serve(LOG_FORMAT=log_format, WEB_CONCURRENCY="2")
    for _ in range(2):  # two reloads
        old = set(server.wait_for_workers(2))
        server.process.send_signal(signal.SIGHUP)  # gunicorn reads its config again
        wait_until(
            lambda old=old: not old & set(pids := server.worker_pids()) and len(pids) == 2,
            30,
            "the workers to be replaced",
        )
    for n in range(4):  # whichever worker answers
        conn = server.connect()
        conn.request("GET", "/healthz", headers={"X-Request-ID": f"after-reloads-{n}"})
        assert conn.getresponse().status == 200
        conn.close()
    wait_until(lambda: "after-reloads-3" in server.log.read_text(), 10, "the last line")
    lines = server.log.read_text().splitlines()
    assert [sum(f"after-reloads-{n}" in line for line in lines) for n in range(4)] == [1] * 4


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("token=1.SECRET", "token=-"),
        ("tok%65n=1.SECRET", "tok%65n=-"),  # the route reads this as token too
        ("%74oken=1.SECRET&tail=3", "%74oken=-&tail=3"),
        ("tail=0&token=1.SECRET&token=1.SECRET", "tail=0&token=-&token=-"),
    ],
)
def test_a_watch_token_never_reaches_the_access_log_however_it_is_spelt(
    make_app, job, access, query, logged
):
    job()
    client = make_app(WATCH_TOKEN_SECRET="a secret of thirty-two bytes or more").test_client()
    response = client.get(f"/queues/orders/jobs/1/events?{query}")
    assert (response.status_code, response.text) == (
        401,
        "the watch token is not valid for this job",
    )
    [(_, method, path, status, *_)] = access()
    assert (method, path, status) == ("GET", f"/queues/orders/jobs/1/events?{logged}", "401")
