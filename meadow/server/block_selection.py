"""Which span a server started with --num-blocks takes, and when it should move: pure functions of the swarm's
announced throughputs, so they are tested on simulated swarms of a thousand servers without a process.

The swarm is as fast as its weakest block, so a block's strength is the sum of the throughputs (tokens/s) of
the servers holding it. A new server takes the weakest window. A running server moves only when that fills
uncovered blocks, or raises the weakest block's throughput by more than a factor 1 / quality: every move then
improves the swarm by a fixed step, so moves cannot go in circles and a balanced swarm stays put."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from meadow.swarm import ServerInfo, ServerState

MIN_THROUGHPUT = 1e-3  # what a server announcing 0 tokens/s (not measured) adds: it still covers its blocks


@dataclass(frozen=True)
class Placement:
    """One server's span [start, end) and its throughput (tokens/s through the span), as the balancer sees it."""

    start: int
    end: int
    throughput: float

    def __len__(self) -> int:
        return self.end - self.start


def block_throughputs(placements: Iterable[Placement], num_blocks: int) -> list[float]:
    """Sum of the throughputs of the servers holding each block; 0 means no server holds it.
    Summed with fsum, so the result does not depend on the servers' order (float rounding never tips a decision)."""
    parts: list[list[float]] = [[] for _ in range(num_blocks)]
    for p in placements:
        for i in range(max(p.start, 0), min(p.end, num_blocks)):
            parts[i].append(max(p.throughput, MIN_THROUGHPUT))
    return [math.fsum(values) for values in parts]


def choose_span(throughputs: list[float], num_blocks: int) -> int:
    """Start of the `num_blocks`-long window whose weakest block is weakest (ties: the least total, then leftmost).
    `throughputs[i]` is how much serving block i already has (tokens/s, or a server count)."""
    if not 0 < num_blocks <= len(throughputs):
        raise ValueError(f"cannot place {num_blocks} blocks in a model of {len(throughputs)}")
    windows = range(len(throughputs) - num_blocks + 1)
    return min(windows, key=lambda s: (min(throughputs[s : s + num_blocks]), sum(throughputs[s : s + num_blocks]), s))


def choose_move(mine: Placement, others: Iterable[Placement], num_blocks: int, quality: float = 0.75) -> int | None:
    """Where a server placed at `mine` should move (a new start), or None to stay.

    `others` are every other server (online or joining). The server takes its own contribution out, finds the
    weakest window, and moves there only if that fills uncovered blocks without uncovering as many, or, with no
    block uncovered, raises the swarm's weakest-block throughput above (weakest now) / quality."""
    if not 0 < quality <= 1:
        raise ValueError(f"balance quality must be in (0, 1], got {quality}")
    rest = block_throughputs(others, num_blocks)
    start = choose_span(rest, len(mine))
    if start == mine.start:
        return None
    before = _with(rest, mine.start, len(mine), mine.throughput)
    after = _with(rest, start, len(mine), mine.throughput)
    gaps_before, gaps_after = before.count(0.0), after.count(0.0)
    if gaps_before or gaps_after:
        return start if gaps_after < gaps_before else None
    return start if min(after) * quality > min(before) else None


def placements(per_block: list[dict[Hashable, ServerInfo]], num_blocks: int) -> dict[Hashable, Placement]:
    """Each online or joining server's placement, from the DHT's per-block view (as fetch_servers returns it)."""
    found: dict[Hashable, Placement] = {}
    for servers in per_block:
        for peer, info in servers.items():
            if info.state in (ServerState.ONLINE, ServerState.JOINING) and info.start < min(info.end, num_blocks):
                found[peer] = Placement(info.start, min(info.end, num_blocks), info.throughput)
    return found


def _with(rest: list[float], start: int, length: int, throughput: float) -> list[float]:
    added = max(throughput, MIN_THROUGHPUT)
    return [t + added if start <= i < start + length else t for i, t in enumerate(rest)]
