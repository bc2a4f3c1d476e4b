"""What points buy: a place in a busy server's compute queue. Pure."""

from __future__ import annotations

import math

MAX_LEVEL = 40


def priority_of(points: float) -> int:
    """The compute-queue priority of a requester with `points`: 0 with none, then one level per doubling from a
    millionth of a point up (so small swarms' points matter too), at most MAX_LEVEL."""
    if not points > 0:
        return 0
    return max(1, min(MAX_LEVEL, 1 + int(math.log2(points * 1e6 + 1))))
