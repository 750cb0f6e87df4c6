"""Settings: defaults, then environment variables, then the factory's overrides."""

import logging
import os
import re

import pytest

from app import create_app
from bullmq_http.settings import DEFAULTS, SETTINGS, ConfigError, settings_from_env
from bullmq_http.tokens import READ
from tests.helpers import ROOT


def test_defaults_match_the_reference_proxy():
    assert DEFAULTS["QUEUE_PREFIX"] == "bull"
    assert DEFAULTS["MIN_QUEUE_NAME_LENGTH"] == 3
    assert DEFAULTS["MAX_QUEUE_NAME_LENGTH"] == 100
    assert DEFAULTS["MAX_BODY_BYTES"] == 1024 * 1024
    assert settings_from_env({}) == {}


def test_environment_is_parsed(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated monthly\nfrom-file-1\n\n  from-file-2  \n")
    settings = settings_from_env(
        {
            "REDIS_URL": "rediss://user:secret@redis.internal:6380/2",
            "REDIS_PORT": "6380",
            "REDIS_TLS": "true",
            "REDIS_TIMEOUT": "0.5",
            "QUEUE_PREFIX": "{jobs}",
            "AUTH_TOKENS": "one, two,,",
            "AUTH_TOKENS_FILE": str(tokens),
            "MIN_QUEUE_NAME_LENGTH": "1",
            "MAX_QUEUE_NAME_LENGTH": "50",
            "MAX_BODY_BYTES": "2048",
            "UNRELATED": "ignored",
        }
    )
    assert settings == {
        "REDIS_URL": "rediss://user:secret@redis.internal:6380/2",
        "REDIS_PORT": 6380,
        "REDIS_TLS": True,
        "REDIS_TIMEOUT": 0.5,
        "QUEUE_PREFIX": "{jobs}",
        "AUTH_TOKENS": ("one", "two"),
        "AUTH_TOKENS_FILE": str(tokens),
        "MIN_QUEUE_NAME_LENGTH": 1,
        "MAX_QUEUE_NAME_LENGTH": 50,
        "MAX_BODY_BYTES": 2048,
    }


def test_empty_variables_are_unset_but_empty_auth_tokens_means_none():
    assert settings_from_env({"REDIS_URL": "", "QUEUE_PREFIX": ""}) == {}
    assert settings_from_env({"AUTH_TOKENS": ""}) == {"AUTH_TOKENS": ()}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"REDIS_URL": "http://x"},
            "REDIS_URL='http://x' must start with redis://, rediss:// or unix://",
        ),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL='localhost:6379' must start with redis://"),
        ({"REDIS_PORT": "0"}, "REDIS_PORT='0' must be a whole number from 1 to 65535"),
        ({"REDIS_PORT": "six"}, "REDIS_PORT='six' must be a whole number from 1 to 65535"),
        ({"REDIS_TLS": "maybe"}, "REDIS_TLS='maybe' must be true or false"),
        ({"REDIS_TIMEOUT": "0"}, "REDIS_TIMEOUT='0' must be a number of seconds above 0"),
        ({"REDIS_TIMEOUT": "nan"}, "REDIS_TIMEOUT='nan' must be a number of seconds above 0"),
        (
            {"MAX_BODY_BYTES": "1M"},
            "MAX_BODY_BYTES='1M' must be a whole number from 1 to 536870912",
        ),
        ({"MIN_QUEUE_NAME_LENGTH": "-1"}, "MIN_QUEUE_NAME_LENGTH='-1' must be a whole number"),
    ],
)
def test_bad_environment_is_one_clear_error(environ, message):
    with pytest.raises(ConfigError) as raised:
        settings_from_env(environ)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_api_tokens_come_from_the_variable_and_the_file(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated monthly\nfrom-file-1\n\n  from-file-2  \n")
    monkeypatch.setenv("AUTH_TOKENS", "one, two,,")
    monkeypatch.setenv("AUTH_TOKENS_FILE", str(tokens))
    tokens = create_app().extensions["bullmq_http"].tokens
    for sent in (b"one", b"two", b"from-file-1", b"from-file-2"):
        assert tokens.find(sent).may(READ, "any-queue")
    assert tokens.find(b"# rotated monthly") is None
    assert len(tokens.current) == 4


def test_an_unreadable_token_file_stops_the_factory(monkeypatch):
    monkeypatch.setenv("AUTH_TOKENS_FILE", "/no/such/file")
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value).startswith("AUTH_TOKENS_FILE='/no/such/file' cannot be read")
    assert "\n" not in str(raised.value)


def test_secrets_come_from_mounted_files(tmp_path, monkeypatch):
    (tmp_path / "watch").write_text("a s3cret with spaces, of 32 bytes or more \n")
    (tmp_path / "redis").write_text("pa55\r\n")
    monkeypatch.setenv("WATCH_TOKEN_SECRET_FILE", str(tmp_path / "watch"))
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(tmp_path / "redis"))
    app = create_app()
    assert app.config["WATCH_TOKEN_SECRET"] == "a s3cret with spaces, of 32 bytes or more "
    assert app.config["REDIS_PASSWORD"] == "pa55"


@pytest.mark.parametrize("secret", ["a", "x" * 31, "é" * 15])
def test_a_watch_secret_shorter_than_32_bytes_stops_the_factory(monkeypatch, secret):
    """Any link carries a signature: a short secret can be found from one offline, and
    then opens every job."""
    monkeypatch.setenv("WATCH_TOKEN_SECRET", secret)
    with pytest.raises(ConfigError) as raised:
        create_app()
    size = len(secret.encode())
    assert str(raised.value) == (
        f"WATCH_TOKEN_SECRET is {size} bytes: it must be at least 32 (openssl rand -hex 32), "
        "as any link lets a short one be guessed offline"
    )


def test_a_fifo_as_the_token_file_stops_the_factory_at_once(tmp_path, monkeypatch):
    fifo = tmp_path / "tokens"
    os.mkfifo(fifo)
    monkeypatch.setenv("AUTH_TOKENS_FILE", str(fifo))
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value) == f"AUTH_TOKENS_FILE={str(fifo)!r} is not a regular file"


@pytest.mark.parametrize(
    ("content", "also", "message"),
    [
        (None, {}, "WATCH_TOKEN_SECRET_FILE={path} cannot be read: [Errno 2]"),
        ("\n", {}, "WATCH_TOKEN_SECRET_FILE={path} is empty"),
        (
            "x",
            {"WATCH_TOKEN_SECRET": "y"},
            "WATCH_TOKEN_SECRET and WATCH_TOKEN_SECRET_FILE are both set",
        ),
    ],
)
def test_a_bad_secret_file_stops_the_factory(tmp_path, monkeypatch, content, also, message):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("WATCH_TOKEN_SECRET_FILE", str(path))
    for name, value in also.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value).startswith(message.format(path=path))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "also", "named"),
    [
        ("redis://:pw@cache:6379", {"REDIS_PASSWORD_FILE": "file"}, "REDIS_PASSWORD_FILE is"),
        ("redis://app:pw@cache:6379", {"REDIS_PASSWORD": "pw"}, "REDIS_PASSWORD is"),
        ("redis://app@cache:6379", {"REDIS_USERNAME": "app"}, "REDIS_USERNAME is"),
        (
            "redis://app:pw@a:1,redis://b:2",
            {"REDIS_USERNAME": "app", "REDIS_PASSWORD": "pw", "REDIS_CLUSTER": "1"},
            "REDIS_USERNAME and REDIS_PASSWORD are",
        ),
    ],
)
def test_credentials_in_the_url_and_in_settings_stop_the_factory(
    tmp_path, monkeypatch, url, also, named
):
    """Neither silently wins: the one line names both places."""
    monkeypatch.setenv("REDIS_URL", url)
    for name, value in also.items():
        if name.endswith("_FILE"):
            (tmp_path / value).write_text("pw\n")
            value = str(tmp_path / value)
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value) == (
        f"REDIS_URL holds a user or password, and {named} set too: "
        "give the credentials in one place"
    )


def test_the_factory_reads_the_environment_and_overrides_win(monkeypatch):
    monkeypatch.setenv("QUEUE_PREFIX", "from-env")
    monkeypatch.setenv("MAX_BODY_BYTES", "100")
    app = create_app({"MAX_BODY_BYTES": 200})
    assert app.config["QUEUE_PREFIX"] == "from-env"
    assert app.config["MAX_CONTENT_LENGTH"] == 200
    assert app.extensions["bullmq_http"].store.key("q", "1", "lock") == "from-env:q:1:lock"


def test_bad_environment_stops_the_factory(monkeypatch):
    monkeypatch.setenv("REDIS_PORT", "99999")
    with pytest.raises(ConfigError, match="REDIS_PORT='99999' must be a whole number"):
        create_app()


def test_contradicting_settings_stop_the_factory():
    with pytest.raises(
        ConfigError, match="MIN_QUEUE_NAME_LENGTH=10 is above MAX_QUEUE_NAME_LENGTH=5"
    ):
        create_app({"MIN_QUEUE_NAME_LENGTH": 10, "MAX_QUEUE_NAME_LENGTH": 5})


def test_no_api_token_is_warned_about(caplog, monkeypatch):
    monkeypatch.delenv("AUTH_TOKENS", raising=False)
    with caplog.at_level(logging.WARNING, logger="app"):
        create_app()
    assert "no API token configured (AUTH_TOKENS): GET logs will answer 401" in caplog.text


@pytest.mark.parametrize(
    ("settings", "connection"),
    [
        ({}, {"host": "localhost", "port": 6379}),
        (
            {"REDIS_HOST": "cache", "REDIS_PORT": 6390, "REDIS_PASSWORD": "pw"},
            {"host": "cache", "port": 6390, "password": "pw"},
        ),
        (
            {"REDIS_URL": "redis://:pw@cache:6391/3"},
            {"host": "cache", "port": 6391, "db": 3, "password": "pw"},
        ),
        ({"REDIS_URL": "unix:///run/redis.sock"}, {"path": "/run/redis.sock"}),
    ],
)
def test_redis_connection_settings(settings, connection):
    app = create_app(settings)
    kwargs = app.extensions["bullmq_http"].store.connect().connection_pool.connection_kwargs
    assert {name: kwargs.get(name) for name in connection} == connection
    assert kwargs["socket_timeout"] == 2.0


def test_cluster_and_sentinel_settings_are_parsed():
    settings = settings_from_env(
        {
            "REDIS_CLUSTER": "1",
            "REDIS_CLUSTER_NODES": "10.0.0.1:7000, redis-b:7001",
            "REDIS_SENTINELS": "s1:26379,s2:26379",
            "REDIS_SENTINEL_MASTER": "jobs",
            "REDIS_URL": "redis://a:7000,redis://b:7001",
        }
    )
    assert settings["REDIS_CLUSTER"] is True
    assert settings["REDIS_CLUSTER_NODES"] == (("10.0.0.1", 7000), ("redis-b", 7001))
    assert settings["REDIS_SENTINELS"] == (("s1", 26379), ("s2", 26379))


@pytest.mark.parametrize("value", ["nohost", "h:0", "h:port", ":7000", "h:7000,"])
def test_bad_node_lists_are_one_clear_error(value):
    with pytest.raises(ConfigError, match="must be host:port, comma separated"):
        settings_from_env({"REDIS_CLUSTER_NODES": value})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"REDIS_CLUSTER": True, "REDIS_SENTINELS": (("s", 1),), "REDIS_SENTINEL_MASTER": "m"},
            "REDIS_CLUSTER and REDIS_SENTINELS are set: choose one",
        ),
        ({"REDIS_SENTINELS": (("s", 1),)}, "REDIS_SENTINELS is set without REDIS_SENTINEL_MASTER"),
        ({"REDIS_URL": "redis://a:1,redis://b:2"}, "REDIS_URL names several servers"),
    ],
)
def test_contradicting_redis_settings_stop_the_factory(settings, message):
    with pytest.raises(ConfigError, match=message):
        create_app(settings)


def test_an_unreachable_cluster_at_start_up_answers_503_not_a_failed_start():
    app = create_app({"REDIS_CLUSTER": True, "REDIS_CLUSTER_NODES": (("127.0.0.1", 1),)})
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")


def readme_settings() -> dict[str, str]:
    """Return the Configuration table (docs/operations.md): each variable's default as
    written."""
    readme = (ROOT / "docs" / "operations.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \|([^|]*)\|", section, re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def test_the_readmes_settings_table_is_the_settings_table():
    """Every setting, and nothing else, in docs/operations.md, with the default the service
    has: a default in backticks reads, as the variable would, as the default; one in
    words is worked out at start-up (the setting's default is None); none, unset."""
    documented = readme_settings()
    # gunicorn and prometheus_client read this one themselves.
    assert set(documented) == {*SETTINGS, "PROMETHEUS_MULTIPROC_DIR"}
    for name, setting in SETTINGS.items():
        written = documented[name]
        if written.startswith("`"):
            assert setting.parse(written.strip("`")) == setting.default, name
        else:
            assert setting.default in (None, (), frozenset()), name
            assert (written == "") == (name not in COMPUTED_DEFAULTS), name


# The settings whose default is worked out at start-up, which the manual says in words.
COMPUTED_DEFAULTS = {"WEB_CONCURRENCY", "MAX_STREAMS"}
