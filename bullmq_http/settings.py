"""The service's settings, and gunicorn's: each read from the environment variable of
its name, over its default; a bad one stops start-up with one line (ConfigError).

gunicorn.conf.py reads gunicorn's (server_settings) before gevent patches the standard
library, so this module imports nothing that would need patching (ssl is imported
where it is used).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class ConfigError(RuntimeError):
    """A setting that cannot work; start-up stops with its one-line message."""


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """Return a parser of whole numbers from low to high, written in ASCII digits."""
    digits = len(str(high))  # longer text is out of range: no need to convert it

    def parse(value: str) -> int:
        if not (
            value.isascii()
            and value.isdigit()
            and len(value) <= digits
            and low <= int(value) <= high
        ):
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(value)

    return parse


def _text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def seconds(high: float) -> Callable[[str], float]:
    """Return a parser of a number of seconds above 0 and at most `high`."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not 0 < number <= high:
            raise ValueError(f"must be a number of seconds above 0 and at most {high:g}")
        return number

    return parse


def one_of(*choices: str) -> Callable[[str], str]:
    """Return a parser of one of a few words."""

    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be {' or '.join(choices)}")
        return value

    return parse


def _flag(value: str) -> bool:
    flags = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in flags:
        raise ValueError("must be true or false")
    return flags[value.lower()]


def _redis_url(value: str) -> str:
    # Several, comma separated, name the seed nodes of a cluster.
    for url in value.split(","):
        if urlsplit(url.strip()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
    return value


def _addresses(value: str) -> tuple[tuple[str, int], ...]:
    addresses = []
    for item in value.split(","):
        host, _, port = item.strip().rpartition(":")
        if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("must be host:port, comma separated")
        addresses.append((host, int(port)))
    return tuple(addresses)


def _binds(value: str) -> tuple[str, ...]:
    # Several, comma separated: a unix socket for a proxy, and a port for Prometheus.
    binds = tuple(bind.strip() for bind in value.split(","))
    for bind in binds:
        unix = bind.startswith("unix:") and len(bind) > len("unix:")
        if not (unix or bind.rpartition(":")[2].isdigit()):
            raise ValueError("must be host:port or unix:/path, comma separated")
    return binds


def _origins(value: str) -> frozenset[str]:
    # Web origins, comma separated: scheme, host and port, as a browser's Origin says.
    origins = frozenset(origin.strip() for origin in value.split(",") if origin.strip())
    for origin in origins:
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or origin != (f"{parts.scheme}://{parts.netloc}")
        ):
            raise ValueError("must be origins like https://app.example.com, comma separated")
    return origins


def _token_list(value: str) -> tuple[str, ...]:
    return tuple(token.strip() for token in value.split(",") if token.strip())


@dataclass(frozen=True)
class Setting:
    """A setting's default, and the parser of its environment variable (which raises
    ValueError saying what is expected)."""

    default: Any
    parse: Callable[[str], Any]


# gunicorn's settings (gunicorn.conf.py), which the app reads too: a worker's room sizes
# its streams.
SERVER_SETTINGS: dict[str, Setting] = {
    "BIND": Setting((), _binds),
    "PORT": Setting(8080, whole_number(1, 65535)),
    "WEB_CONCURRENCY": Setting(None, whole_number(1, 256)),  # unset: one per core
    "WORKER_CLASS": Setting("gevent", one_of("gevent", "gthread", "sync")),
    "WORKER_CONNECTIONS": Setting(1000, whole_number(1, 10_000)),
    "THREADS": Setting(8, whole_number(1, 1024)),
    "REQUEST_TIMEOUT": Setting(10.0, seconds(300)),
    "SEND_TIMEOUT": Setting(10.0, seconds(300)),
    "LOG_FORMAT": Setting("plain", one_of("plain", "json")),
}

# Each setting is read from the environment variable of its name.
SETTINGS: dict[str, Setting] = {
    "REDIS_URL": Setting(None, _redis_url),
    "REDIS_HOST": Setting("localhost", _text),
    "REDIS_PORT": Setting(6379, whole_number(1, 65535)),
    "REDIS_USERNAME": Setting(None, _text),
    "REDIS_PASSWORD": Setting(None, _text),
    "REDIS_PASSWORD_FILE": Setting(None, _text),  # read by read_secret_files
    "REDIS_TLS": Setting(False, _flag),
    "REDIS_TLS_CA_FILE": Setting(None, _text),
    "REDIS_TLS_CERT_FILE": Setting(None, _text),
    "REDIS_TLS_KEY_FILE": Setting(None, _text),
    "REDIS_TLS_CHECK_HOSTNAME": Setting(True, _flag),
    "REDIS_TIMEOUT": Setting(2.0, seconds(60)),
    "REDIS_MAX_CONNECTIONS": Setting(50, whole_number(1, 10_000)),
    "REDIS_CLUSTER": Setting(False, _flag),
    "REDIS_CLUSTER_NODES": Setting((), _addresses),
    "REDIS_SENTINELS": Setting((), _addresses),
    "REDIS_SENTINEL_MASTER": Setting(None, _text),
    "REDIS_SENTINEL_PASSWORD": Setting(None, _text),
    "QUEUE_PREFIX": Setting("bull", _text),
    "AUTH_TOKENS": Setting((), _token_list),
    "AUTH_TOKENS_FILE": Setting(None, _text),  # read by tokens.ApiTokens
    "MIN_QUEUE_NAME_LENGTH": Setting(3, whole_number(1, 1000)),
    "MAX_QUEUE_NAME_LENGTH": Setting(100, whole_number(1, 1000)),
    "MAX_BODY_BYTES": Setting(1024 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "MAX_PROGRESS_BYTES": Setting(64 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "MAX_LOG_LINE_BYTES": Setting(64 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "MAX_LOGS_PER_JOB": Setting(None, whole_number(1, 2**31)),
    "LOG_LINE_TIMESTAMPS": Setting(False, _flag),
    "MAX_PAGE_BYTES": Setting(1024 * 1024, whole_number(1, 512 * 1024 * 1024)),
    "TRUSTED_PROXIES": Setting(0, whole_number(0, 10)),
    "METRICS": Setting(True, _flag),
    "WATCH_TOKEN_SECRET": Setting(None, _text),
    "WATCH_TOKEN_SECRET_FILE": Setting(None, _text),  # read by read_secret_files
    "WATCH_TOKEN_SECONDS": Setting(300, whole_number(1, 86_400)),
    # The longest a watch token may live, minted or signed elsewhere: a link in a
    # notification must outlast the job it watches.
    "WATCH_TOKEN_MAX_SECONDS": Setting(86_400, whole_number(1, 30 * 86_400)),
    # How long a page's session cookie lasts before the page renews it.
    "WATCH_SESSION_SECONDS": Setting(3600, whole_number(1, 86_400)),
    "WATCH_TOKENS_PER_MINUTE": Setting(600, whole_number(1, 1_000_000)),
    # A job claimed over HTTP: how long its lock lasts unless the claim says, how often
    # BullMQ's stalled check runs for the queues worked here, and how many times a job
    # may stall before it fails, as BullMQ's worker options mean them.
    "LOCK_DURATION_MS": Setting(30_000, whole_number(1, 24 * 3600 * 1000)),
    # The longest a claim may wait for a job (?wait=), and how many claims one API token
    # may have waiting per worker; they count against MAX_STREAMS with the streams.
    "MAX_CLAIM_WAIT_SECONDS": Setting(60, whole_number(1, 3600)),
    "MAX_WAITING_CLAIMS_PER_TOKEN": Setting(100, whole_number(1, 10_000)),
    "STALLED_INTERVAL_MS": Setting(30_000, whole_number(100, 24 * 3600 * 1000)),
    "MAX_STALLED_COUNT": Setting(1, whole_number(0, 1000)),
    "WATCH_ALLOWED_ORIGINS": Setting(frozenset(), _origins),
    # The origins whose pages may show the watch page in a frame; none unless listed.
    "WATCH_FRAME_ANCESTORS": Setting(frozenset(), _origins),
    # Unset, from the worker's room: see default_max_streams.
    "MAX_STREAMS": Setting(None, whole_number(0, 10_000)),
    "MAX_STREAMS_PER_TOKEN": Setting(100, whole_number(1, 10_000)),
    "MAX_STREAMS_PER_WATCH_TOKEN": Setting(10, whole_number(1, 10_000)),
    **SERVER_SETTINGS,
}
DEFAULTS = {name: setting.default for name, setting in SETTINGS.items()}


def settings_from_env(
    environ: Mapping[str, str], table: Mapping[str, Setting] = SETTINGS
) -> dict[str, Any]:
    """Parse the environment variables of a table of settings (by default every one);
    raise ConfigError on a bad one."""
    settings: dict[str, Any] = {}
    for name, setting in table.items():
        value = environ.get(name)
        # An empty variable is unset, except AUTH_TOKENS: empty there means none.
        if value is None or (value == "" and name != "AUTH_TOKENS"):
            continue
        try:
            settings[name] = setting.parse(value)
        except ValueError as error:
            raise ConfigError(f"{name}={value!r} {error}") from None
    return settings


def binds(settings: Mapping[str, Any]) -> list[str]:
    """Return where gunicorn listens, as server_settings say: BIND, else loopback's
    PORT."""
    return list(settings["BIND"]) or [f"127.0.0.1:{settings['PORT']}"]


def server_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return gunicorn's settings from the environment, over their defaults; raise
    ConfigError on a bad one."""
    defaults = {name: setting.default for name, setting in SERVER_SETTINGS.items()}
    return {**defaults, **settings_from_env(environ, SERVER_SETTINGS)}


HASH_TAG = re.compile(r"\{[^}]+\}")

# The share of a gevent worker's connections that streams of events may hold: the rest
# stay free for writes, reads and probes.
STREAM_SHARE = 0.8


def default_max_streams(config: Mapping[str, Any]) -> int:
    """Return how many streams of events one worker holds, unless MAX_STREAMS says.

    A stream holds a connection of a gevent worker, a thread of a gthread worker, and a
    whole sync worker, for as long as it lasts: gevent keeps a fifth of its connections
    for other requests, gthread half its threads, and sync serves no streams.
    """
    if config["WORKER_CLASS"] == "gevent":
        return max(1, int(config["WORKER_CONNECTIONS"] * STREAM_SHARE))
    if config["WORKER_CLASS"] == "gthread":
        return config["THREADS"] // 2
    return 0


# Secrets that may come from a file (a container's mounted secret) instead.
SECRET_FILES = ("REDIS_PASSWORD", "WATCH_TOKEN_SECRET")
# A watch secret signs every link: one shorter than this can be found from a link by
# trying secrets offline.
MIN_SECRET_BYTES = 32


def read_secret_files(config: MutableMapping[str, Any]) -> None:
    """Set each secret whose <NAME>_FILE is set to the file's text, less its line end;
    raise ConfigError for a file that cannot be read, an empty one, or both set."""
    for name in SECRET_FILES:
        path = config[f"{name}_FILE"]
        if not path:
            continue
        if config[name]:
            raise ConfigError(f"{name} and {name}_FILE are both set: choose one")
        try:
            with open(path, encoding="utf-8") as file:
                secret = file.read().removesuffix("\n").removesuffix("\r")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{name}_FILE={path} cannot be read: {error}") from None
        if not secret:
            raise ConfigError(f"{name}_FILE={path} is empty")
        config[name] = secret


def check_settings(config: Mapping[str, Any]) -> None:
    """Raise ConfigError when settings contradict each other; warn of risky ones."""
    if config["MIN_QUEUE_NAME_LENGTH"] > config["MAX_QUEUE_NAME_LENGTH"]:
        raise ConfigError(
            f"MIN_QUEUE_NAME_LENGTH={config['MIN_QUEUE_NAME_LENGTH']} is above "
            f"MAX_QUEUE_NAME_LENGTH={config['MAX_QUEUE_NAME_LENGTH']}"
        )
    secret = config["WATCH_TOKEN_SECRET"]
    if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"WATCH_TOKEN_SECRET is {len(secret.encode())} bytes: it must be at least "
            f"{MIN_SECRET_BYTES} (openssl rand -hex 32), as any link lets a short one be "
            "guessed offline"
        )
    if config["REDIS_CLUSTER"] and config["REDIS_SENTINELS"]:
        raise ConfigError("REDIS_CLUSTER and REDIS_SENTINELS are set: choose one")
    if config["REDIS_SENTINELS"] and not config["REDIS_SENTINEL_MASTER"]:
        raise ConfigError("REDIS_SENTINELS is set without REDIS_SENTINEL_MASTER, the master's name")
    check_credentials(config)
    if "," in (config["REDIS_URL"] or "") and not config["REDIS_CLUSTER"]:
        raise ConfigError("REDIS_URL names several servers: set REDIS_CLUSTER=1 for a cluster")
    check_tls_files(config)
    if config["WORKER_CLASS"] == "gevent" and config["MAX_STREAMS"] >= config["WORKER_CONNECTIONS"]:
        raise ConfigError(
            f"MAX_STREAMS={config['MAX_STREAMS']} must be below "
            f"WORKER_CONNECTIONS={config['WORKER_CONNECTIONS']}: streams would leave no "
            "connection for writes and probes"
        )
    if config["REDIS_CLUSTER"] and not HASH_TAG.search(config["QUEUE_PREFIX"].split(":")[0]):
        log.warning(
            "QUEUE_PREFIX=%s has no hash tag: on Redis Cluster every queue name then needs "
            "one, like {orders}; QUEUE_PREFIX={bull} covers every queue",
            config["QUEUE_PREFIX"],
        )


def check_credentials(config: Mapping[str, Any]) -> None:
    """Raise ConfigError when REDIS_URL holds a user or password and the settings give
    one too: neither silently wins."""
    given = [name for name in ("REDIS_USERNAME", "REDIS_PASSWORD") if config[name]]
    if config["REDIS_PASSWORD_FILE"]:
        given = [name + "_FILE" if name == "REDIS_PASSWORD" else name for name in given]
    if given and url_credentials(config):
        raise ConfigError(
            f"REDIS_URL holds a user or password, and {' and '.join(given)} "
            f"{'are' if len(given) > 1 else 'is'} set too: give the credentials in one place"
        )


def url_credentials(config: Mapping[str, Any]) -> bool:
    """Return whether REDIS_URL, where it names the servers, holds a user or password."""
    if config["REDIS_SENTINELS"] or not config["REDIS_URL"]:
        return False
    parts = [urlsplit(url.strip()) for url in config["REDIS_URL"].split(",")]
    return any(part.username or part.password for part in parts)


def redis_tls(config: Mapping[str, Any]) -> bool:
    """Return whether the service reaches Redis over TLS: as REDIS_URL's scheme says
    where it names the servers (rediss://), else as REDIS_TLS says."""
    if config["REDIS_URL"] and not config["REDIS_SENTINELS"]:
        urls = config["REDIS_URL"].split(",")
        return any(urlsplit(url.strip()).scheme == "rediss" for url in urls)
    return bool(config["REDIS_TLS"])


def check_tls_files(config: Mapping[str, Any]) -> None:
    """Raise ConfigError unless the TLS files load as the link will load them."""
    named = [name for name in TLS_FILES if config[name]]
    if named and not redis_tls(config):
        raise ConfigError(
            f"{named[0]} is set, but the link to Redis is not TLS: "
            "set REDIS_TLS=true, or use a rediss:// REDIS_URL"
        )
    if config["REDIS_TLS_KEY_FILE"] and not config["REDIS_TLS_CERT_FILE"]:
        raise ConfigError("REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE, its certificate")
    import ssl  # here, not above: see the module's docstring

    context = ssl.create_default_context()
    for name in named:
        try:
            if name == "REDIS_TLS_CA_FILE":
                context.load_verify_locations(cafile=config[name])
            elif name == "REDIS_TLS_CERT_FILE":
                context.load_cert_chain(config[name], config["REDIS_TLS_KEY_FILE"])
        except OSError as error:  # missing, unreadable, no PEM, or a key not the cert's
            raise ConfigError(f"{name}={config[name]} cannot be used: {error}") from None


TLS_FILES = ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE")
