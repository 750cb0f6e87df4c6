"""Tokens: API tokens, who may read which queues, from AUTH_TOKENS and AUTH_TOKENS_FILE
(the file's format is the README's, under "API tokens"); watch tokens, which open one
job's events (watch_token); and the sessions a watch page trades its link for.

Tokens are looked up by their SHA-256 digest, so a request costs the same with one
token or a thousand, and nothing about the secret shows in how long a lookup takes.
The file is checked for changes at most once a second, on a request, and a changed one
is read in a thread of its own while requests go on with the set in force; the
request that noticed waits up to 50 ms for it, so that a small file's change applies
to that request already. A file that cannot be read or parsed leaves the last good set
in force; so does an empty file, or one whose last line has no newline: a file caught
while it is being written.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gevent import monkey

from .js_json import compact
from .settings import ConfigError

log = logging.getLogger(__name__)

# How often, at most, a process looks at the token file for a change.
CHECK_SECONDS = 1.0
# How long the request that notices a change waits for the file to be read: a file of
# a few thousand lines is read by then, and the request is judged by the new set.
READ_WAIT_SECONDS = 0.05

HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
# A comment line of one word this long reads like a token someone meant to add.
LIKE_A_TOKEN = 16

# Starts a thread of the operating system's own, even where gevent has patched the
# threading module: a greenlet reading a large file would hold up the worker's requests.
start_thread = monkey.get_original("_thread", "start_new_thread")


class TokenFileError(ConfigError):
    """A token file that cannot be read or parsed; the message says where and why (at
    start-up, the one-line refusal of a bad setting)."""


# What an API token may do on its queues: read jobs (their logs, progress and events),
# work them (claim them, as a BullMQ worker does), or both.
READ, WORK = "read", "work"
EVERY_RIGHT = frozenset((READ, WORK))


@dataclass(frozen=True)
class Token:
    """One API token: its name, the digest it is known by, the queues it may touch,
    and what it may do there."""

    name: str
    digest: bytes
    queues: re.Pattern[str]
    rights: frozenset[str] = EVERY_RIGHT

    @functools.cached_property
    def identity(self) -> str:
        """Return what the token is counted as by the stream limits, and named as in
        the watch tokens it mints: the same whatever its name, and nothing of the secret
        (a hash of its digest)."""
        return hashlib.sha256(b"bullmq-http identity\0" + self.digest).hexdigest()[:32]

    def may(self, right: str, queue: str) -> bool:
        """Say whether the token has this right (READ, WORK) on this queue."""
        return right in self.rights and self.queues.fullmatch(queue) is not None


@functools.cache
def queue_patterns(patterns: str) -> re.Pattern[str]:
    """Return one regular expression that matches any of the comma-separated glob
    patterns; each set of patterns is compiled once, however many tokens share it."""
    parts = patterns.split(",")
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in parts), re.DOTALL)


EVERY_QUEUE = queue_patterns("*")


def digest(token: bytes) -> bytes:
    """Return the SHA-256 digest a token is known by."""
    return hashlib.sha256(token).digest()


class TokenSet:
    """Tokens by digest; lookups take the same time whatever the set holds."""

    def __init__(self, tokens: Iterable[Token]) -> None:
        self.by_digest: dict[bytes, Token] = {}
        names: set[str] = set()
        for token in tokens:
            twin = self.by_digest.get(token.digest)
            if twin is not None:
                raise TokenFileError(f"{token.name} is the same token as {twin.name}")
            if token.name in names:
                raise TokenFileError(f"the name {token.name} is given twice")
            self.by_digest[token.digest] = token
            names.add(token.name)

    def __len__(self) -> int:
        return len(self.by_digest)

    def find(self, sent: bytes) -> Token | None:
        """Return the token that was sent, or None."""
        key = digest(sent)
        token = self.by_digest.get(key)
        # Compared once more in constant time: the lookup found it by its hash alone.
        if token is None or not hmac.compare_digest(token.digest, key):
            return None
        return token


def from_environment(tokens: Iterable[str]) -> list[Token]:
    """Return AUTH_TOKENS as tokens that read every queue, named by their place."""
    return [
        Token(f"AUTH_TOKENS.{n}", digest(token.encode("utf-8")), EVERY_QUEUE)
        for n, token in enumerate(tokens, 1)
    ]


def parse_file(path: str, text: str) -> list[Token]:
    """Return the tokens of a token file's text; raise TokenFileError naming the line."""
    if not text.strip():
        raise TokenFileError(f"AUTH_TOKENS_FILE={path!r} is empty")
    if not text.endswith("\n"):
        raise TokenFileError(
            f"AUTH_TOKENS_FILE={path!r} does not end with a newline: it may be cut short"
        )
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if fields[0].startswith("#"):
            if len(fields) == 1 and len(fields[0]) >= LIKE_A_TOKEN:
                log.warning(
                    "AUTH_TOKENS_FILE=%r line %d is a comment (it starts with #), not a "
                    "token: a token in this file cannot start with #",
                    path,
                    number,
                )
            continue
        where = f"AUTH_TOKENS_FILE={path!r} line {number}"
        # A line written before rights existed keeps what it had: reading.
        rights = frozenset((READ,))
        if len(fields) == 1:
            secret, name, queues = fields[0], f"AUTH_TOKENS_FILE.{number}", EVERY_QUEUE
        elif len(fields) in (3, 4):
            name, secret, patterns = fields[:3]
            if not all(patterns.split(",")):
                raise TokenFileError(f"{where}: an empty queue pattern in {patterns!r}")
            queues = queue_patterns(patterns)
            if len(fields) == 4:
                rights = frozenset(fields[3].split(","))
                if not rights <= EVERY_RIGHT or not all(fields[3].split(",")):
                    raise TokenFileError(
                        f"{where}: rights must be read, work or read,work, not {fields[3]!r}"
                    )
        else:
            raise TokenFileError(
                f"{where}: expected a token alone, or three or four fields: "
                "name, token, queues, rights"
            )
        hashed = HASHED.fullmatch(secret)
        if secret.startswith("sha256:") and not hashed:
            raise TokenFileError(f"{where}: sha256: must be followed by 64 hex digits")
        known_by = bytes.fromhex(hashed[1]) if hashed else digest(secret.encode("utf-8"))
        tokens.append(Token(name, known_by, queues, rights))
    return tokens


def read_file(path: str) -> tuple[str, os.stat_result]:
    """Return a file's text (less a byte order mark a Windows editor may have put before
    the first token) and the stat it was read at; raise TokenFileError. Only a regular
    file is read: a FIFO or a device would hold up start-up, or the reload, for ever."""
    try:
        # Opened without waiting: opening a FIFO would wait for a writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(descriptor, encoding="utf-8-sig") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise TokenFileError(f"AUTH_TOKENS_FILE={path!r} is not a regular file")
            return file.read(), status
    except (OSError, UnicodeDecodeError) as error:
        raise TokenFileError(f"AUTH_TOKENS_FILE={path!r} cannot be read ({error})") from None


def file_fingerprint(status: os.stat_result) -> tuple[int, int, int, int]:
    """Return what changes when a file is replaced or rewritten."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


class ApiTokens:
    """The API tokens in force: AUTH_TOKENS, and AUTH_TOKENS_FILE as it is now."""

    def __init__(self, environment: Iterable[str], path: str | None) -> None:
        """Load the tokens; raise TokenFileError when the file is bad at start-up."""
        self.environment = from_environment(environment)
        self.path = path
        self.checked = time.monotonic()
        self.reading = False  # a thread is reading the file
        self.current, self.seen = self.load()

    def load(self) -> tuple[TokenSet, tuple[int, int, int, int] | None]:
        """Return the tokens in force now, and the fingerprint of the file they came from."""
        if not self.path:
            return TokenSet(self.environment), None
        text, status = read_file(self.path)
        return TokenSet(self.environment + parse_file(self.path, text)), file_fingerprint(status)

    def find(self, sent: bytes) -> Token | None:
        """Return the token that was sent; look at the file first if a look is due."""
        if self.path and time.monotonic() - self.checked >= CHECK_SECONDS:
            self.checked = time.monotonic()
            self.look()
        return self.current.find(sent)

    def look(self) -> None:
        """If the file changed, read it in a thread of the operating system's own, not a
        greenlet: a large file takes a while, and requests must not wait for it."""
        try:
            status = os.stat(self.path or "")
        except OSError as error:
            self.keep(f"AUTH_TOKENS_FILE={self.path!r} cannot be read ({error})", None)
            return
        if file_fingerprint(status) != self.seen and not self.reading:
            self.reading = True
            start_thread(self.refresh, ())
            # The request that noticed waits a moment, so that a token rotated out is
            # refused at once: sleeping, which under gevent lets other requests run.
            deadline = time.monotonic() + READ_WAIT_SECONDS
            while self.reading and time.monotonic() < deadline:
                time.sleep(0.002)

    def refresh(self) -> None:
        """Load the file again; keep the last good set if it is bad."""
        try:
            try:
                status = os.stat(self.path or "")
                if file_fingerprint(status) == self.seen:
                    return
                self.current, self.seen = self.load()
            except OSError as error:
                self.keep(f"AUTH_TOKENS_FILE={self.path!r} cannot be read ({error})", None)
                return
            except TokenFileError as error:
                self.keep(str(error), file_fingerprint(status))
                return
            log.warning("AUTH_TOKENS_FILE=%r reloaded: %d API tokens", self.path, len(self.current))
        finally:
            self.reading = False

    def keep(self, reason: str, seen: tuple[int, int, int, int] | None) -> None:
        """Say once per change of the file that the last good set stays in force."""
        if seen != self.seen:
            log.error("%s; the last good set of %d API tokens stays", reason, len(self.current))
        self.seen = seen


def watch_token(
    secret: str, queue: str, job_id: str, expires: int, minter: str | None = None
) -> str:
    """Return the watch token of one job's events, good until `expires` (Unix seconds).

    It is `<expires>.<signature>`, the signature the hex HMAC-SHA256, under the secret,
    of the JSON array ["bullmq-http watch", queue, job id, expires] written as
    JavaScript's JSON.stringify writes it: no queue name or job id, whatever it holds (a
    newline, a quote), can pass for another's, and any backend can sign one (README).
    A token this service mints names the API token that minted it (its identity), whose
    limits its streams count against too: `<expires>.<minter>.<signature>`, the minter
    the array's fifth element.
    """
    fields: list[str | int] = ["bullmq-http watch", queue, job_id, expires]
    if minter is not None:
        fields.append(minter)
    message = compact(fields)
    signature = hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{signature}" if minter is None else f"{expires}.{minter}.{signature}"


# Why a watch token, or a page's session, that is not one of this job's is refused.
NOT_THIS_JOB = "the watch token is not valid for this job"


class BadWatchToken(ValueError):
    """A watch token that does not open a job's events now; its message says why."""


@dataclass(frozen=True)
class WatchToken:
    """A valid watch token, or a page's session opened with one: when what it grants
    ends (Unix time), the identity of the API token that minted it (None for one signed
    elsewhere), and its share: what its streams count against (a hash of the link's
    token, the same for the link and for every session opened with it)."""

    expires: int
    minter: str | None
    share: str


MINTER = re.compile(r"[0-9a-f]{32}")


def check_watch_token(secret: str, token: str, queue: str, job_id: str, longest: int) -> WatchToken:
    """Return a watch token of this job, or raise BadWatchToken unless it is one,
    unexpired, and lives no longer than `longest` seconds from now."""
    expires, *middle = token.split(".")[:-1] or [""]
    if not (
        token.isascii()
        and expires.isdigit()
        and len(expires) <= 12
        and len(middle) <= 1
        and all(MINTER.fullmatch(minter) for minter in middle)
    ):
        raise BadWatchToken(NOT_THIS_JOB)
    minter = middle[0] if middle else None
    expected = watch_token(secret, queue, job_id, int(expires), minter)
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise BadWatchToken(NOT_THIS_JOB)
    check_lifetime(int(expires), longest)
    share = hashlib.sha256(b"bullmq-http share\0" + token.encode()).hexdigest()[:32]
    return WatchToken(int(expires), minter, share)


def check_lifetime(expires: int, longest: int) -> None:
    """Raise BadWatchToken if `expires` has passed, or lies more than `longest` seconds
    ahead."""
    now = time.time()
    if expires <= now:
        raise BadWatchToken("the watch token has expired: ask for a new one")
    if expires > now + longest:
        raise BadWatchToken(
            f"the watch token lives longer than WATCH_TOKEN_MAX_SECONDS={longest} allows"
        )


def session_token(
    secret: str, queue: str, job_id: str, watch: WatchToken, seconds: int
) -> tuple[str, int]:
    """Return a page's session of one job, opened with a watch token, and when it ends:
    `seconds` from now, or when the token does if that is sooner.

    It is what the page keeps (its cookie) in place of its link's token: it cannot be
    turned back into the link, it ends on its own (the page renews it while it is open,
    never past the link's end), and it grants what the link does, from the same share.
    `<ends>.<expires>.<share>.<minter or ->.<signature>`, the signature the hex
    HMAC-SHA256 of the fields, with the queue and job id, as a JSON array.
    """
    ends = min(watch.expires, int(time.time()) + seconds)
    minter = watch.minter or "-"
    fields = [str(ends), str(watch.expires), watch.share, minter]
    return ".".join([*fields, session_signature(secret, queue, job_id, fields)]), ends


def session_signature(secret: str, queue: str, job_id: str, fields: list[str]) -> str:
    """Return the signature of a session's fields for one job."""
    message = compact(["bullmq-http session", queue, job_id, *fields])
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


SESSION = re.compile(r"(\d{1,12})\.(\d{1,12})\.([0-9a-f]{32})\.([0-9a-f]{32}|-)\.([0-9a-f]{64})")


def check_session_token(
    secret: str, session: str, queue: str, job_id: str, longest: int
) -> WatchToken:
    """Return what a page's session of this job grants, or raise BadWatchToken unless
    it is one and neither it nor its link has ended."""
    match = SESSION.fullmatch(session)
    if match is None:
        raise BadWatchToken(NOT_THIS_JOB)
    ends, expires, share, minter, signature = match.groups()
    expected = session_signature(secret, queue, job_id, [ends, expires, share, minter])
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise BadWatchToken(NOT_THIS_JOB)
    if int(ends) <= time.time():
        raise BadWatchToken("the page's session has ended: open its link again")
    check_lifetime(int(expires), longest)
    return WatchToken(int(expires), None if minter == "-" else minter, share)


class MintingLimit:
    """How many watch tokens each API token may mint per minute on this process: each
    has a bucket of that many, refilled evenly over the minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}  # identity: (left, when)
        self.lock = threading.Lock()

    def take(self, identity: str) -> float:
        """Take one token's minting from the API token's bucket and return 0; or, with
        the bucket empty, take nothing and return the seconds until it holds one."""
        rate = self.per_minute / 60
        with self.lock:
            now = time.monotonic()
            left, when = self.buckets.get(identity, (self.per_minute, now))
            left = min(self.per_minute, left + (now - when) * rate)
            if left < 1:
                self.buckets[identity] = (left, now)
                return (1 - left) / rate
            self.buckets[identity] = (left - 1, now)
            return 0.0
