"""Which chain of servers a client uses: a pure function of the announcements and of what the client measured."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from hivemind.p2p import PeerID

from meadow.swarm import ServerInfo, ServerState
from meadow.wire import BlockRange, MeadowError

DEFAULT_BLOCK_SECONDS = 0.01  # a server that has not measured its speed yet: 100 steps/s per block
UNREACHABLE_RTT = 60.0  # a failed ping makes a server a last resort, not unusable: the failure may have passed
SESSION_LOAD = 0.2  # each open session on a server slows our steps by this fraction (sessions rarely all step at once)
MAX_SLOWDOWN = 100.0  # a server measured slower than announced costs at most this many times its announcement
OVERLOADED_SECONDS = 100.0  # a server without KV cache left for our session is used only where nobody else can be
JITTER = 0.1  # announced speeds are measurements good to about 10%: chains closer than that are equals, spread over


class MissingBlocksError(MeadowError):
    """No online server holds some blocks of the model."""

    def __init__(self, missing: list[int], adapter: str | None = None, served_adapters: Sequence[str] = ()):
        """`served_adapters`: those that the servers of the missing blocks do serve, when `adapter` is not one."""
        holds = f"holds blocks {block_ranges(missing)} of this model" + (f" with adapter {adapter!r}" if adapter else "")
        served = ""
        if adapter:
            names = ", ".join(repr(name) for name in served_adapters)
            served = f" (theirs serve {names})" if served_adapters else " (theirs serve no adapter)"
        super().__init__(f"no online server {holds}; start a server for them{served}")
        self.missing, self.adapter = missing, adapter


@dataclass(frozen=True)
class Hop:
    """One server of a chain and the blocks it runs for us."""

    peer: PeerID
    blocks: BlockRange


class MeasuredStep(NamedTuple):
    """A decoding step this client timed on one server: its seconds (round trip included) through `blocks` blocks."""

    seconds: float
    blocks: int


def servers_by_peer(per_block: list[dict[PeerID, ServerInfo]]) -> dict[PeerID, ServerInfo]:
    """Online servers from the per-block view of the DHT."""
    return {
        peer: info for servers in per_block for peer, info in servers.items() if info.state == ServerState.ONLINE
    }


def hop_cost(
    info: ServerInfo, rtt: float, *, step: MeasuredStep | None = None, failures: int = 0, cache_tokens: int = 0
) -> tuple[float, float]:
    """Expected seconds of one decoding step through this server, as (fixed, per block): a hop over k blocks costs
    fixed + k * per_block. The round trip plus the announced time per block, slowed by the server's open sessions;
    all of it times (1 + our recent failures there) and times how much slower than that we measured it (never
    faster: a measurement only catches a server that does less than it announces); plus a large penalty when it
    announced less KV cache than our session needs (`cache_tokens`)."""
    rtt = rtt if math.isfinite(rtt) else UNREACHABLE_RTT
    per_block = 1.0 / info.inference_rps if info.inference_rps > 0 else DEFAULT_BLOCK_SECONDS
    per_block *= 1.0 + SESSION_LOAD * info.open_sessions
    scale = 1.0 + failures
    if step is not None and step.blocks > 0 and math.isfinite(step.seconds):
        scale *= min(max(step.seconds / (rtt + step.blocks * per_block), 1.0), MAX_SLOWDOWN)
    penalty = OVERLOADED_SECONDS if info.cache_tokens_left < cache_tokens else 0.0
    return rtt * scale + penalty, per_block * scale


def chain_cost(
    chain: list[Hop],
    servers: Mapping[PeerID, ServerInfo],
    rtt: Mapping[PeerID, float],
    *,
    default_rtt: float = 0.05,
    steps: Mapping[PeerID, MeasuredStep] = {},
    failures: Mapping[PeerID, int] = {},
    cache_tokens: int = 0,
) -> float:
    """Expected seconds of one decoding step through `chain`: what choose_chain minimizes (without its jitter)."""
    total = 0.0
    for hop in chain:
        options = dict(step=steps.get(hop.peer), failures=failures.get(hop.peer, 0), cache_tokens=cache_tokens)
        fixed, per_block = hop_cost(servers[hop.peer], rtt.get(hop.peer, default_rtt), **options)
        total += fixed + len(hop.blocks) * per_block
    return total


def choose_chain(
    servers: Mapping[PeerID, ServerInfo],
    rtt: Mapping[PeerID, float],
    blocks: BlockRange,
    *,
    default_rtt: float = 0.05,
    banned: frozenset[PeerID] = frozenset(),
    steps: Mapping[PeerID, MeasuredStep] = {},
    failures: Mapping[PeerID, int] = {},
    cache_tokens: int = 0,
    jitter: float = JITTER,
    salt: bytes | None = None,
) -> list[Hop]:
    """The chain covering `blocks` with the least expected time per decoding step (see hop_cost), up to `jitter`:
    each server's cost is multiplied by a random factor in [1, 1 + jitter], so the chain taken costs at most
    (1 + jitter) times the best, and clients spread over near-equal chains instead of all taking the same one.
    The factors are drawn anew on every call, or fixed by `salt` (a client passes its own: it keeps the same
    chain from call to call while other clients, with other salts, take other near-equal ones).

    A shortest path over block boundaries, left to right, in O(sum of the servers' spans): the best way to reach
    boundary j through server s is fixed_s + j * per_block_s + min over boundaries i where s could have been entered
    (s.start <= i < j) of best[i] - i * per_block_s; that minimum is kept up to date per server as j advances."""
    peers, lines = [], []  # usable servers, and (first block, end block, fixed cost, cost per block) of each
    for peer, info in servers.items():
        low, high = max(info.start, blocks.start), min(info.end, blocks.end)
        if low >= high or (banned and peer in banned):
            continue
        step, failed = steps.get(peer) if steps else None, failures.get(peer, 0) if failures else 0
        options = dict(step=step, failures=failed, cache_tokens=cache_tokens)
        hop_fixed, per_block = hop_cost(info, rtt.get(peer, default_rtt), **options)
        noise = 1.0 + jitter * (random.random() if salt is None else _unit_hash(salt, peer))
        peers.append(peer)
        lines.append((low, high, hop_fixed * noise, per_block * noise))
    if not lines:
        raise MissingBlocksError(list(range(blocks.start, blocks.end)))
    low, high, fixed, slope = np.array(lines).T

    best = np.full(blocks.end + 1, np.inf)  # least cost to reach each block boundary
    best[blocks.start] = 0.0
    came_from = [(0, 0)] * (blocks.end + 1)  # (boundary the last hop started at, its server)
    entry = np.full(len(peers), np.inf)  # per server: min of best[i] - i * slope over boundaries i it could start at
    entry_at = np.zeros(len(peers), dtype=np.int64)  # ...and that i
    for i in range(blocks.start, blocks.end):
        holds = (low <= i) & (i < high)  # the servers holding block i
        entered = best[i] - i * slope
        better = holds & (entered < entry)
        entry[better], entry_at[better] = entered[better], i
        cost = np.where(holds, entry + fixed + (i + 1) * slope, np.inf)
        via = int(cost.argmin())
        best[i + 1] = cost[via]
        if best[i + 1] == np.inf:  # nobody holds block i: name every such block
            covered = {block for start, end, _, _ in lines for block in range(start, end)}
            raise MissingBlocksError([i for i in range(blocks.start, blocks.end) if i not in covered])
        came_from[i + 1] = (int(entry_at[via]), via)
    chain, here = [], blocks.end
    while here != blocks.start:
        previous, s = came_from[here]
        chain.append(Hop(peers[s], BlockRange(start=previous, end=here)))
        here = previous
    return chain[::-1]


def peers_to_ping(
    servers: Mapping[PeerID, ServerInfo],
    rtt: Mapping[PeerID, float],
    blocks: BlockRange,
    *,
    chains: int = 3,
    default_rtt: float = 0.05,
    banned: frozenset[PeerID] = frozenset(),
    salt: bytes | None = None,
) -> list[PeerID]:
    """The servers without a measured round trip on the best few chains: the one choose_chain takes now, then the
    best that avoids its servers wherever someone else holds their blocks, and so on (where a failover would go).
    Pinging them and asking again converges on chains of measured servers without pinging the whole swarm."""
    found: list[PeerID] = []
    avoided: dict[PeerID, int] = {}  # servers of earlier chains, taken as if they had failed many times
    for _ in range(chains):
        try:
            options = dict(default_rtt=default_rtt, banned=banned, failures=avoided, salt=salt)
            chain = choose_chain(servers, rtt, blocks, **options)
        except MissingBlocksError:
            return found
        new = [hop.peer for hop in chain if hop.peer not in rtt and hop.peer not in found]
        if not new and all(hop.peer in avoided for hop in chain):
            break  # no other chain
        found += new
        avoided.update((hop.peer, 1000) for hop in chain)
    return found


def _unit_hash(salt: bytes, peer: PeerID) -> float:
    """A number in [0, 1) fixed by (salt, peer), spread uniformly over peers."""
    digest = hashlib.blake2b(peer.to_bytes(), digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def block_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6'"""
    spans, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(f"{start}:{index + 1}")
            start = None
    return ", ".join(spans)
