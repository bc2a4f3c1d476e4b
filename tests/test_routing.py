"""Pure decisions on simulated swarms: which chain a client takes, which span a new server takes."""

import random

import pytest
from hivemind.p2p import PeerID

from meadow.client.routing import MissingBlocksError, choose_chain
from meadow.server.block_selection import choose_span
from meadow.swarm import ServerInfo, ServerState
from meadow.wire import BlockRange


def peer(i: int) -> PeerID:
    return PeerID(f"peer-{i}".encode())


def server(start, end, rps=100.0, state=ServerState.ONLINE):
    return ServerInfo(state=state, start=start, end=end, inference_rps=rps)


def assert_covers(chain, blocks):
    assert chain[0].blocks.start == blocks.start and chain[-1].blocks.end == blocks.end
    for a, b in zip(chain, chain[1:]):
        assert a.blocks.end == b.blocks.start


def test_chain_prefers_fewer_hops_and_faster_servers():
    servers = {peer(0): server(0, 4), peer(1): server(4, 8), peer(2): server(0, 8, rps=100.0), peer(3): server(0, 8, rps=10.0)}
    chain = choose_chain(servers, {}, BlockRange(start=0, end=8), default_rtt=0.05)
    assert [hop.peer for hop in chain] == [peer(2)]
    # a slow network to the big server makes the two-hop chain better
    chain = choose_chain(servers, {peer(2): 1.0, peer(3): 1.0}, BlockRange(start=0, end=8), default_rtt=0.01)
    assert [hop.peer for hop in chain] == [peer(0), peer(1)]


def test_chain_can_switch_servers_mid_span():
    servers = {peer(0): server(0, 6), peer(1): server(3, 8)}
    chain = choose_chain(servers, {}, BlockRange(start=0, end=8))
    assert_covers(chain, BlockRange(start=0, end=8))
    assert [hop.peer for hop in chain] == [peer(0), peer(1)]


def test_missing_blocks_are_named():
    servers = {peer(0): server(0, 3), peer(1): server(5, 8), peer(2): server(3, 5, state=ServerState.JOINING)}
    with pytest.raises(MissingBlocksError, match=r"blocks 3:5 "):
        choose_chain({p: s for p, s in servers.items() if s.state == ServerState.ONLINE}, {}, BlockRange(start=0, end=8))


def test_banned_servers_are_avoided():
    servers = {peer(0): server(0, 8, rps=1000), peer(1): server(0, 8, rps=1)}
    chain = choose_chain(servers, {}, BlockRange(start=0, end=8), banned=frozenset({peer(0)}))
    assert [hop.peer for hop in chain] == [peer(1)]


def test_random_swarm_of_a_thousand_servers_is_covered():
    rng = random.Random(0)
    servers = {}
    for i in range(1000):
        start = rng.randrange(80)
        servers[peer(i)] = server(start, min(80, start + rng.randint(1, 12)), rps=rng.uniform(1, 100))
    servers[peer(1000)] = server(0, 80, rps=0.5)  # guarantees coverage
    chain = choose_chain(servers, {}, BlockRange(start=0, end=80))
    assert_covers(chain, BlockRange(start=0, end=80))
    for hop in chain:
        info = servers[hop.peer]
        assert info.start <= hop.blocks.start and hop.blocks.end <= info.end


def test_new_servers_fill_uncovered_blocks_first():
    coverage = [0] * 12
    starts = []
    for _ in range(3):
        start = choose_span(coverage, 4)
        starts.append(start)
        for i in range(start, start + 4):
            coverage[i] += 1
    assert sorted(starts) == [0, 4, 8] and min(coverage) == 1
    assert choose_span([3, 3, 1, 1, 2, 3], 2) == 2
    with pytest.raises(ValueError):
        choose_span([0, 0], 3)
