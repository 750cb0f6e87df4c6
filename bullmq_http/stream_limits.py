"""How many long requests (streams of events, and claims waiting for a job) this process
holds, in all and per credential: each holds a connection of a worker while it lasts."""

from __future__ import annotations

import threading
from collections.abc import Callable


class TooManyStreams(Exception):
    """A stream past a limit of this process: its credential's, whose kind (`"api"` or
    `"watch"`) `kind` says, or with `kind` None the process's own."""

    def __init__(self, kind: str | None, limit: int) -> None:
        super().__init__(kind, limit)
        self.kind = kind
        self.limit = limit


class StreamLimits:
    """How many streams of events, and claims waiting for a job, this process holds: in
    all, and per credential (an API token's identity for its streams, or for its waiting
    claims; a watch token's share), within the limits its settings set."""

    def __init__(
        self, most: int, per_api_token: int, per_watch_token: int, per_claimer: int
    ) -> None:
        self.most = most
        self.per_kind = {"api": per_api_token, "watch": per_watch_token, "claim": per_claimer}
        self.open = 0
        self.held: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def take(self, *credentials: tuple[str, str]) -> Callable[[], None]:
        """Count one more stream against each credential given, (kind, identity) with
        kind "api" or "watch", or raise TooManyStreams naming the first at its limit;
        return the function that gives it back, once."""
        with self.lock:
            if self.open >= self.most:
                raise TooManyStreams(None, self.most)
            for kind, identity in credentials:
                if self.held.get((kind, identity), 0) >= self.per_kind[kind]:
                    raise TooManyStreams(kind, self.per_kind[kind])
            self.open += 1
            for credential in credentials:
                self.held[credential] = self.held.get(credential, 0) + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            with self.lock:
                if given_back:
                    return
                given_back = True
                self.open -= 1
                for credential in credentials:
                    self.held[credential] -= 1
                    if not self.held[credential]:
                        del self.held[credential]

        return give_back
