"""The KV-cache budget: how many token slots a server lends to sessions, who holds them, and who waits for them."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

from meadow.wire import BadRequest, ServerBusy

# seconds a request keeps its place in the line without asking again: a waiting client asks every second
# (ClientConfig.busy_retry), and leaves the line once served elsewhere or given up; one that stopped asking without
# leaving died (or is older than rpc_leave_line)
LINE_PATIENCE = 5.0
# every 4th session let in is the one that has waited longest, whatever its points: those without are never starved
BY_ARRIVAL_EVERY = 4


@dataclass
class Waiter:
    """A refused session that keeps its place in the line by asking again with the same ticket."""

    peer: Hashable
    tokens: int
    priority: int
    arrived: int  # the order it came in
    asked: float  # when it last asked (time.monotonic)


@dataclass
class Held:
    """The slots one session holds, which grow with it."""

    peer: Hashable
    priority: int
    tokens: int


class CacheBudget:
    """Token slots (batch x length) of KV cache for every hosted block; a session holds its slots until it ends.
    No peer may hold more than `max_peer_share` of the slots or `max_peer_sessions` sessions. Refused sessions wait
    in a line, by priority (points), then first come, first served (every BY_ARRIVAL_EVERY-th turn, by arrival
    alone): a session gets room only if it leaves enough for those ahead of it (each peer's, as far as its share
    allows), so clients that ask more often do not jump the queue, and a peer's own sessions (an API's users, say)
    are served in their order too."""

    def __init__(
        self, tokens: int, max_peer_share: float = 1.0, max_peer_sessions: int | None = None,
        patience: float = LINE_PATIENCE,
    ):  # fmt: skip
        self.total, self.patience = tokens, patience
        self.peer_limit, self.max_peer_sessions = int(max_peer_share * tokens), max_peer_sessions
        self.used = 0
        self.peer_tokens: Counter[Hashable] = Counter()
        self.peer_sessions: Counter[Hashable] = Counter()
        self.line: dict[Hashable, Waiter] = {}  # by (peer, ticket)
        self.arrivals = itertools.count()
        self.let_in = 0  # sessions given room so far
        # called with the slots missing whenever a session (or a session's growth) is refused for lack of room: the
        # server may then close sessions that sit idle (BlockHandler.reclaim_idle)
        self.when_short: Callable[[int], None] = lambda slots: None

    @property
    def left(self) -> int:
        return self.total - self.used

    @property
    def room(self) -> int:
        """Slots a newcomer could take now: those left, less what the line waits for (what routing is told)."""
        self._forget_stale()
        return max(0, self.left - self._claimed(list(self.line.values())))

    @contextmanager
    def reserve(
        self, tokens: int, peer: Hashable = None, ticket: str | None = None, priority: int = 0
    ) -> Iterator[Held]:
        """Hold `tokens` slots for `peer` inside (`grow` adds to them); ServerBusy if they are not free for it now,
        BadRequest if they never will be. A refused request keeps its place in the line while it asks again with the
        same `ticket` (at least every `patience` seconds)."""
        if tokens > self.peer_limit:
            raise BadRequest(
                f"the session needs {tokens} token slots of KV cache (batch x max_length), and this server lends one "
                f"peer at most {self.peer_limit} (of its {self.total}): ask for fewer, or use a server with more"
            )
        key = None if ticket is None else (peer, ticket)
        self._forget_stale()
        me = self.line.get(key)
        if me is not None:
            me.priority = priority
        newcomer = Waiter(peer, tokens, priority, next(self.arrivals), 0.0)  # where it would stand if it came now
        order = self._order([*(w for k, w in self.line.items() if k != key), me or newcomer])
        ahead = order[: order.index(me or newcomer)]
        try:
            self._check(tokens, peer, ahead)
        except ServerBusy:
            places = sum(waiter.peer == peer for waiter in self.line.values())
            if me is None and key is not None and places < (self.max_peer_sessions or float("inf")):
                me = self.line[key] = newcomer
            if me is not None:
                me.tokens, me.asked = tokens, time.monotonic()
            raise
        self.line.pop(key, None)
        self.let_in += 1
        self.used += tokens
        self.peer_tokens[peer] += tokens
        self.peer_sessions[peer] += 1
        held = Held(peer, priority, tokens)
        try:
            yield held
        finally:
            self.used -= held.tokens
            self.peer_tokens[peer] -= held.tokens
            self.peer_sessions[peer] -= 1
            if not self.peer_sessions[peer]:
                del self.peer_tokens[peer], self.peer_sessions[peer]

    def grow(self, held: Held, tokens: int) -> None:
        """Add `tokens` slots to what a session holds; ServerBusy if they are not free for it now, BadRequest if they
        never will be. A running session grows before the newcomers waiting in line (as vLLM's scheduler runs the
        running first): refused, it would close and be replayed, and the newcomers wait for sessions to end anyway
        (benchmarks/api_reservation.py --users 12 --cache-tokens 1600 --reserve-only: mean time per request 0.87,
        sessions rebuilt 5.0 -> 2.2 a run). Those of higher priority (points) still come first."""
        if held.tokens + tokens > self.peer_limit:
            raise BadRequest(
                f"the session would hold {held.tokens + tokens} token slots of KV cache (batch x max_length), and this "
                f"server lends one peer at most {self.peer_limit} (of its {self.total})"
            )
        self._forget_stale()
        ahead = [waiter for waiter in self.line.values() if waiter.priority > held.priority]
        self._check(tokens, held.peer, ahead, growth=True)
        self.used += tokens
        self.peer_tokens[held.peer] += tokens
        held.tokens += tokens

    def leave(self, peer: Hashable, ticket: str) -> None:
        """`peer`'s request with `ticket` waits here no more (served elsewhere, or given up): its claim ends now, not
        when its place would lapse. Only the peer itself can take its place out of the line."""
        self.line.pop((peer, ticket), None)

    def _check(self, tokens: int, peer: Hashable, ahead: list[Waiter], growth: bool = False) -> None:
        """ServerBusy unless a session of `tokens` for `peer` (or, with `growth`, one of its sessions growing by
        `tokens`) fits now, after the waiters `ahead` of it."""
        mine = [waiter for waiter in ahead if waiter.peer == peer]  # the peer's own earlier requests come first
        held, sessions = self.peer_tokens[peer], self.peer_sessions[peer]
        waits = f" (and wait for {len(mine)}, for {sum(w.tokens for w in mine)} slots)" if mine else ""
        needs = f"growing the session needs {tokens} more" if growth else f"the session needs {tokens}"
        if not growth and self.max_peer_sessions is not None and sessions + len(mine) >= self.max_peer_sessions:
            raise ServerBusy(f"you already hold {sessions} sessions here{waits}, the most one peer may")
        claimed = self._claimed(ahead)
        if tokens + claimed > self.left:
            self.when_short(tokens + claimed - self.left)
            queued = f", and sessions waiting ahead of yours claim {claimed}" if claimed else ""
            raise ServerBusy(
                f"not enough KV cache: {needs} token slots (batch x max_length), "
                f"{self.left} of {self.total} are free{queued}"
            )
        if held + sum(waiter.tokens for waiter in mine) + tokens > self.peer_limit:
            raise ServerBusy(
                f"one peer may hold at most {self.peer_limit} of the {self.total} KV cache token slots; you hold "
                f"{held}{waits} and {needs}"
            )

    def _claimed(self, waiters: list[Waiter]) -> int:
        """The slots `waiters` would take as room comes, in line order: a peer's only as far as its share allows (a
        waiter its own peer's sessions hold back keeps no room from others)."""
        taken, claimed = Counter(self.peer_tokens), 0
        for waiter in self._order(waiters):
            taken[waiter.peer] += waiter.tokens
            if taken[waiter.peer] <= self.peer_limit:
                claimed += waiter.tokens
        return claimed

    def _order(self, waiters: list[Waiter]) -> list[Waiter]:
        """The line's order for the next session let in: higher priority first, then first come, first served; or,
        every BY_ARRIVAL_EVERY-th time, first come, first served alone."""
        by_arrival = self.let_in % BY_ARRIVAL_EVERY == BY_ARRIVAL_EVERY - 1
        return sorted(waiters, key=lambda waiter: (0 if by_arrival else -waiter.priority, waiter.arrived))

    def _forget_stale(self) -> None:
        now = time.monotonic()
        for key in [key for key, waiter in self.line.items() if now - waiter.asked > self.patience]:
            del self.line[key]
