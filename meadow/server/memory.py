"""The KV-cache budget: how many token slots a server lends to sessions, who holds them, and who waits for them."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Hashable, Iterator

from meadow.wire import BadRequest, ServerBusy

# seconds a request keeps its place in the line without asking again: a waiting client asks every second
# (ClientConfig.busy_retry); one that stopped asking was served elsewhere or gave up
LINE_PATIENCE = 5.0


@dataclass
class Waiter:
    """A session refused for want of room, that keeps its place in the line by asking again with the same ticket."""

    tokens: int
    priority: int
    arrived: int  # its place among those of its priority
    asked: float  # when it last asked (time.monotonic)

    def ahead_of(self, priority: int, arrived: float) -> bool:
        return (self.priority, -self.arrived) > (priority, -arrived)


class CacheBudget:
    """Token slots (batch x length) of KV cache for every hosted block; a session holds its slots until it ends.
    Slots and sessions are counted per peer too, so that no peer can take the whole server. Sessions refused for
    want of room wait in a line, by priority (points), then first come, first served: a newcomer gets room only if
    it leaves enough for everyone waiting ahead of it, so clients that ask more often do not jump the queue."""

    def __init__(self, tokens: int, patience: float = LINE_PATIENCE):
        self.total, self.patience = tokens, patience
        self.used = 0
        self.peer_tokens: Counter[Hashable] = Counter()
        self.peer_sessions: Counter[Hashable] = Counter()
        self.line: dict[Hashable, Waiter] = {}  # by (peer, ticket)
        self.arrivals = itertools.count()

    @property
    def left(self) -> int:
        return self.total - self.used

    @property
    def room(self) -> int:
        """Slots a newcomer could take now: those left, less what the line waits for (what routing is told)."""
        self._forget_stale()
        return max(0, self.left - sum(waiter.tokens for waiter in self.line.values()))

    @contextmanager
    def reserve(
        self, tokens: int, peer: Hashable = None, max_peer_share: float = 1.0, max_peer_sessions: int | None = None,
        ticket: str | None = None, priority: int = 0,
    ) -> Iterator[None]:  # fmt: skip
        """Hold `tokens` slots for `peer` inside; ServerBusy if they are not free, or if the peer would then hold
        more than max_peer_share of all slots or more than max_peer_sessions sessions. BadRequest if they never will
        be: waiting would not help. A request refused for want of room keeps its place in the line while it asks
        again with the same `ticket` (at least every `patience` seconds)."""
        peer_limit = int(max_peer_share * self.total)
        if tokens > peer_limit:
            raise BadRequest(
                f"the session needs {tokens} token slots of KV cache (batch x max_length), and this server lends one "
                f"peer at most {peer_limit} (of its {self.total}): ask for fewer, or use a server with more"
            )
        key = None if ticket is None else (peer, ticket)
        self._forget_stale()
        # a peer's places in the line count as held sessions: else one peer could queue for all the room there is,
        # ahead of everyone, or fill the line
        mine = [waiter for k, waiter in self.line.items() if k[0] == peer and k != key]
        if max_peer_sessions is not None and self.peer_sessions[peer] + len(mine) >= max_peer_sessions:
            self.line.pop(key, None)  # it waits for its own sessions to end, not for room: it holds no place
            waits = f" (and wait for {len(mine)})" if mine else ""
            raise ServerBusy(f"you already hold {self.peer_sessions[peer]} sessions here{waits}, the most one peer may")
        queued = sum(waiter.tokens for waiter in mine)
        if self.peer_tokens[peer] + queued + tokens > peer_limit:
            self.line.pop(key, None)
            waits = f", wait for {queued}" if queued else ""
            raise ServerBusy(
                f"one peer may hold at most {peer_limit} of the {self.total} KV cache token slots; you hold "
                f"{self.peer_tokens[peer]}{waits} and the session needs {tokens}"
            )
        me = self.line.get(key)
        arrived = me.arrived if me is not None else float("inf")
        ahead = [w for k, w in self.line.items() if k != key and w.ahead_of(priority, arrived)]
        if tokens + sum(waiter.tokens for waiter in ahead) > self.left:
            if key is not None:
                if me is None:
                    me = self.line[key] = Waiter(tokens, priority, next(self.arrivals), 0.0)
                me.tokens, me.priority, me.asked = tokens, priority, time.monotonic()
            waiting = f"; sessions waiting ahead of yours: {len(ahead)}, for {sum(w.tokens for w in ahead)} slots"
            raise ServerBusy(
                f"not enough KV cache: the session needs {tokens} token slots (batch x max_length), "
                f"{self.left} of {self.total} are free" + (waiting if ahead else "")
            )
        self.line.pop(key, None)
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

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for key in [key for key, waiter in self.line.items() if now - waiter.asked > self.patience]:
            del self.line[key]
