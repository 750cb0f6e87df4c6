"""Who may call which route: job tokens (the job's lock) and API tokens."""

import time

import pytest

from harness.servers import wait_until
from tests.helpers import API_TOKEN, JOB_TOKEN, bearer, snapshot

WRITES = ["/queues/orders/jobs/1/progress", "/queues/orders/jobs/1/logs"]
READ = "/queues/orders/jobs/1/logs"
ALL = [("POST", url) for url in WRITES] + [("GET", READ)]


def call(client, method, url, headers):
    return client.open(url, method=method, data=b"7", headers=headers)


@pytest.mark.parametrize(("method", "url"), ALL)
@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "send the token as 'Authorization: Bearer <token>'"),
        ({"Authorization": ""}, "the Authorization header must be exactly 'Bearer <token>'"),
        ({"Authorization": "Bearer"}, "the Authorization header must be exactly 'Bearer <token>'"),
        ({"Authorization": "Bearer "}, "the Authorization header must be exactly 'Bearer <token>'"),
        ({"Authorization": "Basic dTpw"}, "the Authorization header must be exactly 'Bearer <tok"),
        ({"Authorization": "Bearer a b"}, "the Authorization header must be exactly 'Bearer <tok"),
        ({"Authorization": "Bearer\xa0a"}, "the Authorization header must be exactly 'Bearer <"),
        ({"Authorization": "Token a"}, "the Authorization header must be exactly 'Bearer <token>'"),
    ],
)
def test_malformed_authorization_is_a_401(client, r, job, method, url, headers, reason):
    job()
    before = snapshot(r)
    response = call(client, method, url, headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_data(as_text=True).startswith(reason)
    assert snapshot(r) == before


@pytest.mark.parametrize("scheme", ["bearer ", "BEARER ", "BeArEr ", "Bearer  ", "Bearer \t "])
def test_scheme_is_case_insensitive_and_spaces_may_be_many(client, r, job, scheme):
    key = job()
    response = client.post(WRITES[0], data=b"9", headers={"Authorization": f"{scheme}{JOB_TOKEN}"})
    assert response.status_code == 200
    assert r.hget(key, "progress") == "9"
    response = client.get(READ, headers={"Authorization": f"{scheme}{API_TOKEN}"})
    assert response.status_code == 200


def test_a_token_is_its_bytes_as_sent_whatever_they_are(make_app, r, job):
    # Bytes beyond ASCII, such as 0xA0 (a no-break space in latin-1), are part of it.
    token = "tok\xa0én"
    key = job(token=token)
    client = make_app(AUTH_TOKENS=[token]).test_client()
    sent = {"Authorization": f"Bearer {token}".encode().decode("latin-1")}
    response = client.post(WRITES[0], data=b"3", headers=sent)
    assert response.status_code == 200
    assert r.hget(key, "progress") == "3"
    assert client.get(READ, headers=sent).status_code == 200


NOT_THE_LOCK = (
    "the token is not this job's lock token: the lock expired or moved, "
    "the job finished, or the token is wrong"
)


@pytest.mark.parametrize("url", WRITES)
def test_wrong_job_token_is_a_401_and_writes_nothing(client, r, job, url):
    job()
    job(job_id="2", token="token-of-job-2")
    before = snapshot(r)
    for token in ("token-of-job-2", JOB_TOKEN + "x", JOB_TOKEN[:-1], API_TOKEN):
        response = client.post(url, data=b"7", headers=bearer(token))
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.get_data(as_text=True) == NOT_THE_LOCK
    assert snapshot(r) == before
    assert not r.exists("bull:orders:meta")  # not even the events cap is set


@pytest.mark.parametrize("url", WRITES)
def test_finished_job_is_a_401(client, r, job, url):
    job()
    r.delete("bull:orders:1:lock")  # a worker releases the lock when the job ends
    before = snapshot(r)
    response = client.post(url, data=b"7", headers=bearer(JOB_TOKEN))
    assert (response.status_code, response.get_data(as_text=True)) == (401, NOT_THE_LOCK)
    assert snapshot(r) == before


@pytest.mark.parametrize("url", WRITES)
def test_unknown_job_is_a_401_not_a_404(client, r, url):
    response = client.post(url, data=b"7", headers=bearer(JOB_TOKEN))
    assert response.status_code == 401  # without the lock, nothing is told about the job
    assert snapshot(r) == {}


def test_a_lock_that_expires_stops_the_token(client, r, job):
    key = job(lock_ms=300)
    assert client.post(WRITES[0], data=b"1", headers=bearer(JOB_TOKEN)).status_code == 200
    assert client.post(WRITES[1], data=b"one", headers=bearer(JOB_TOKEN)).status_code == 200
    wait_until(lambda: not r.exists(f"{key}:lock"), 5, "the lock to expire")
    before = snapshot(r)
    assert client.post(WRITES[0], data=b"2", headers=bearer(JOB_TOKEN)).status_code == 401
    assert client.post(WRITES[1], data=b"two", headers=bearer(JOB_TOKEN)).status_code == 401
    assert snapshot(r) == before
    assert r.hget(key, "progress") == "1"
    assert r.lrange(f"{key}:logs", 0, -1) == ["one"]


def test_a_renewed_lock_keeps_the_token(client, r, job):
    key = job(lock_ms=300)
    r.pexpire(f"{key}:lock", 30_000)  # what a worker's lock renewal does
    time.sleep(0.4)
    assert client.post(WRITES[0], data=b"3", headers=bearer(JOB_TOKEN)).status_code == 200
    assert r.hget(key, "progress") == "3"


def test_any_configured_api_token_reads(make_app, r, job):
    job()
    app = make_app(AUTH_TOKENS=["old-token", "new-token", "ключ"])
    client = app.test_client()
    for token in ("old-token", "new-token"):
        assert client.get(READ, headers=bearer(token)).status_code == 200
    # A non-ASCII token arrives as its UTF-8 bytes.
    headers = {"Authorization": "Bearer " + "ключ".encode().decode("latin-1")}
    assert client.get(READ, headers=headers).status_code == 200
    assert client.get(READ, headers=bearer("other")).status_code == 401


def test_without_api_tokens_reads_are_refused_and_writes_still_work(make_app, r, job):
    key = job()
    client = make_app(AUTH_TOKENS=[]).test_client()
    response = client.get(READ, headers=bearer("anything"))
    assert response.status_code == 401
    assert response.data == b"this server has no API token configured (AUTH_TOKENS)"
    assert client.post(WRITES[0], data=b"4", headers=bearer(JOB_TOKEN)).status_code == 200
    assert r.hget(key, "progress") == "4"


def test_non_ascii_job_token_matches_its_utf8_bytes(client, r, job):
    key = job(token="jeton-é")
    headers = {"Authorization": "Bearer " + "jeton-é".encode().decode("latin-1")}
    assert client.post(WRITES[0], data=b"5", headers=headers).status_code == 200
    assert r.hget(key, "progress") == "5"
