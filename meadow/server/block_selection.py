"""Which span a new server should take. A pure function of the swarm's coverage, so it is testable without processes."""

from __future__ import annotations


def choose_span(coverage: list[float], num_blocks: int) -> int:
    """Start of the `num_blocks`-long window whose weakest block is weakest (ties: the least total, then leftmost).
    `coverage[i]` is how much serving block i already has (server count or throughput)."""
    if not 0 < num_blocks <= len(coverage):
        raise ValueError(f"cannot place {num_blocks} blocks in a model of {len(coverage)}")
    windows = range(len(coverage) - num_blocks + 1)
    return min(windows, key=lambda s: (min(coverage[s : s + num_blocks]), sum(coverage[s : s + num_blocks]), s))
