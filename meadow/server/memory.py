"""The KV-cache budget: how many token slots a server lends to sessions, and who holds them."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Hashable, Iterator

from meadow.wire import BadRequest, ServerBusy


class CacheBudget:
    """Token slots (batch x length) of KV cache for every hosted block; a session holds its slots until it ends.
    Slots and sessions are counted per peer too, so that no peer can take the whole server."""

    def __init__(self, tokens: int):
        self.total = tokens
        self.used = 0
        self.peer_tokens: Counter[Hashable] = Counter()
        self.peer_sessions: Counter[Hashable] = Counter()

    @property
    def left(self) -> int:
        return self.total - self.used

    @contextmanager
    def reserve(
        self, tokens: int, peer: Hashable = None, max_peer_share: float = 1.0, max_peer_sessions: int | None = None
    ) -> Iterator[None]:
        """Hold `tokens` slots for `peer` inside; ServerBusy if they are not free, or if the peer would then hold
        more than max_peer_share of all slots or more than max_peer_sessions sessions. BadRequest if they never will
        be: waiting would not help."""
        peer_limit = int(max_peer_share * self.total)
        if tokens > peer_limit:
            raise BadRequest(
                f"the session needs {tokens} token slots of KV cache (batch x max_length), and this server lends one "
                f"peer at most {peer_limit} (of its {self.total}): ask for fewer, or use a server with more"
            )
        if tokens > self.left:
            raise ServerBusy(
                f"not enough KV cache: the session needs {tokens} token slots (batch x max_length), "
                f"{self.left} of {self.total} are free"
            )
        if max_peer_sessions is not None and self.peer_sessions[peer] >= max_peer_sessions:
            raise ServerBusy(f"you already hold {self.peer_sessions[peer]} sessions here, the most one peer may")
        if self.peer_tokens[peer] + tokens > peer_limit:
            raise ServerBusy(
                f"one peer may hold at most {peer_limit} of the {self.total} KV cache token slots; you hold "
                f"{self.peer_tokens[peer]} and the session needs {tokens}"
            )
        self.used += tokens
        self.peer_tokens[peer] += tokens
        self.peer_sessions[peer] += 1
        try:
            yield
        finally:
            self.used -= tokens
            self.peer_tokens[peer] -= tokens
            self.peer_sessions[peer] -= 1
            if not self.peer_sessions[peer]:
                del self.peer_tokens[peer], self.peer_sessions[peer]
