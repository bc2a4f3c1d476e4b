"""How long one choose_chain call takes on simulated swarms, today's routing against the one it replaced.

    python benchmarks/routing.py [--calls 20] [--old-up-to 1000]

Swarms of 100, 1000 and 5000 servers over 80 blocks; each server holds a random span (fixed sizes 8 or 20, or
anything from 8 to 20 blocks) with a random speed, load and round trip. Prints ms per call; the old routing (a
Dijkstra whose every step scanned every server, kept here for comparison only) is timed up to --old-up-to servers.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import time

from hivemind.p2p import PeerID

from meadow.client.routing import choose_chain
from meadow.swarm import ServerInfo, ServerState
from meadow.wire import BlockRange

BLOCKS = 80


def simulated_swarm(servers: int, spans: tuple[int, int], seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    infos, rtt = {}, {}
    for i in range(servers):
        peer = PeerID(f"server-{i}".encode())
        length = rng.randint(*spans)
        start = rng.randrange(BLOCKS - length + 1)
        infos[peer] = ServerInfo(
            state=ServerState.ONLINE, start=start, end=start + length, inference_rps=rng.uniform(5, 200),
            cache_tokens_left=rng.randrange(0, 100_000), open_sessions=rng.randrange(5),
        )  # fmt: skip
        rtt[peer] = rng.uniform(0.001, 0.2)
    return infos, rtt


def old_choose_chain(servers, rtt, blocks, default_rtt=0.05):
    """The routing before issue 9, verbatim but for bans: from each boundary, every server's every later stop."""
    usable = {peer: info for peer, info in servers.items() if info.end > info.start}
    best, came_from, queue = {blocks.start: 0.0}, {}, [(0.0, blocks.start)]
    while queue:
        cost, here = heapq.heappop(queue)
        if here == blocks.end:
            break
        if cost > best.get(here, float("inf")):
            continue
        for peer, info in usable.items():
            if not info.start <= here < info.end:
                continue
            stops = {min(info.end, blocks.end)} | {
                other.start for other in usable.values() if here < other.start < min(info.end, blocks.end)
            }
            per_block = 1.0 / info.inference_rps if info.inference_rps > 0 else 0.01
            for there in stops:
                new_cost = cost + rtt.get(peer, default_rtt) + (there - here) * per_block
                if new_cost < best.get(there, float("inf")):
                    best[there], came_from[there] = new_cost, (here, peer)
                    heapq.heappush(queue, (new_cost, there))
    return best[blocks.end]


def ms_per_call(function, calls: int) -> tuple[float, float]:
    """Median milliseconds per call: wall-clock, and CPU time of this process (what a busy shared machine inflates least)."""
    wall, cpu = [], []
    for _ in range(calls):
        began, began_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="calls timed per configuration (the median is shown)")
    parser.add_argument("--old-up-to", type=int, default=1000, help="time the old routing on swarms up to this size")
    args = parser.parse_args()
    blocks = BlockRange(start=0, end=BLOCKS)
    print("ms per choose_chain call, median; wall-clock (CPU time of this process)")
    print(f"{'servers':>8} {'blocks':>6} {'span':>6} {'old ms/call':>18} {'new ms/call':>16} {'speedup':>8}")
    for servers in (100, 1000, 5000):
        for spans in ((8, 8), (20, 20), (8, 20)):
            infos, rtt = simulated_swarm(servers, spans, seed=servers + spans[1])
            as_a_client = dict(salt=b"one client", cache_tokens=2048)  # what RemoteSequence.make_chain passes
            new = ms_per_call(lambda: choose_chain(infos, rtt, blocks, **as_a_client), args.calls)
            old = None
            if servers <= args.old_up_to:
                old = ms_per_call(lambda: old_choose_chain(infos, rtt, blocks), max(1, args.calls // 10))
            span = f"{spans[0]}" if spans[0] == spans[1] else f"{spans[0]}-{spans[1]}"
            old_text = f"{old[0]:9.1f} ({old[1]:6.1f})" if old else "-"
            speedup = f"{old[0] / new[0]:.0f}x" if old else "-"
            print(f"{servers:>8} {BLOCKS:>6} {span:>6} {old_text:>18} {new[0]:7.2f} ({new[1]:6.2f}) {speedup:>8}", flush=True)

if __name__ == "__main__":
    main()
