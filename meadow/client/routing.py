"""Which chain of servers a client uses: a pure function of the announcements and measured pings."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from hivemind.p2p import PeerID

from meadow.swarm import ServerInfo, ServerState
from meadow.wire import BlockRange, MeadowError


class MissingBlocksError(MeadowError):
    """No online server holds some blocks of the model."""

    def __init__(self, missing: list[int], adapter: str | None = None):
        holds = f"holds blocks {_ranges(missing)} of this model" + (f" with adapter {adapter!r}" if adapter else "")
        super().__init__(f"no online server {holds}; start a server for them")
        self.missing, self.adapter = missing, adapter


@dataclass(frozen=True)
class Hop:
    """One server of a chain and the blocks it runs for us."""

    peer: PeerID
    blocks: BlockRange


def servers_by_peer(per_block: list[dict[PeerID, ServerInfo]]) -> dict[PeerID, ServerInfo]:
    """Online servers from the per-block view of the DHT."""
    return {
        peer: info for servers in per_block for peer, info in servers.items() if info.state == ServerState.ONLINE
    }


def choose_chain(
    servers: dict[PeerID, ServerInfo],
    rtt: dict[PeerID, float],
    blocks: BlockRange,
    *,
    default_rtt: float = 0.05,
    banned: frozenset[PeerID] = frozenset(),
) -> list[Hop]:
    """The chain covering `blocks` with the least expected time per token: for each hop, its round trip plus
    its announced compute time for the blocks it runs. Dijkstra over block boundaries."""
    usable = {peer: info for peer, info in servers.items() if peer not in banned and info.end > info.start}
    best: dict[int, float] = {blocks.start: 0.0}
    came_from: dict[int, tuple[int, PeerID]] = {}
    queue = [(0.0, blocks.start)]
    while queue:
        cost, here = heapq.heappop(queue)
        if here == blocks.end:
            break
        if cost > best.get(here, float("inf")):
            continue
        for peer, info in usable.items():
            if not info.start <= here < info.end:
                continue
            # stop at our end, or where another server starts (switching there may pay off)
            stops = {min(info.end, blocks.end)} | {
                other.start for other in usable.values() if here < other.start < min(info.end, blocks.end)
            }
            per_block = 1.0 / info.inference_rps if info.inference_rps > 0 else 0.01
            for there in stops:
                new_cost = cost + rtt.get(peer, default_rtt) + (there - here) * per_block
                if new_cost < best.get(there, float("inf")):
                    best[there], came_from[there] = new_cost, (here, peer)
                    heapq.heappush(queue, (new_cost, there))
    if blocks.end not in best:
        covered = {i for info in usable.values() for i in range(info.start, info.end)}
        raise MissingBlocksError([i for i in range(blocks.start, blocks.end) if i not in covered] or [blocks.start])
    chain, here = [], blocks.end
    while here != blocks.start:
        previous, peer = came_from[here]
        chain.append(Hop(peer, BlockRange(start=previous, end=here)))
        here = previous
    return chain[::-1]


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6'"""
    spans, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(f"{start}:{index + 1}")
            start = None
    return ", ".join(spans)
