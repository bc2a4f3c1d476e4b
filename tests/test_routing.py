"""Pure decisions on simulated swarms: which chain a client takes, which span a new server takes; and, on a real
swarm, which servers a client pings."""

import math
import random
import signal
import time
from collections import Counter

import pytest
from hivemind.p2p import PeerID

from conftest import peer_of, start_swarm
from meadow.client.config import ClientConfig
from meadow.client.sequence import connect_sequence
from meadow.models import load_config

from meadow.client.routing import Hop, MeasuredStep, MissingBlocksError, chain_cost, choose_chain, peers_to_ping
from meadow.server.block_selection import choose_span
from meadow.swarm import ServerInfo, ServerState
from meadow.wire import BlockRange


def peer(i: int) -> PeerID:
    return PeerID(f"peer-{i}".encode())


def server(start, end, rps=100.0, state=ServerState.ONLINE, **fields):
    return ServerInfo(state=state, start=start, end=end, inference_rps=rps, **fields)


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


def test_missing_blocks_name_exactly_what_nobody_unbanned_serves():
    servers = {peer(0): server(0, 3), peer(1): server(2, 5), peer(2): server(6, 8), peer(3): server(4, 7)}
    with pytest.raises(MissingBlocksError, match=r"blocks 5:6 ") as caught:
        choose_chain(servers, {}, BlockRange(start=0, end=8), banned=frozenset({peer(3)}))
    assert caught.value.missing == [5]
    with pytest.raises(MissingBlocksError) as caught:
        choose_chain(servers, {}, BlockRange(start=1, end=8), banned=frozenset({peer(1), peer(3)}))
    assert caught.value.missing == [3, 4, 5]


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


def all_chains(servers, blocks, banned=frozenset()):
    """Every chain covering `blocks`: each hop any part of a server's span that starts where the last hop ended."""
    if blocks.start == blocks.end:
        return [[]]
    chains = []
    for p, info in servers.items():
        if p in banned or not info.start <= blocks.start < info.end:
            continue
        for end in range(blocks.start + 1, min(info.end, blocks.end) + 1):
            rest = all_chains(servers, BlockRange.model_construct(start=end, end=blocks.end), banned)
            chains += [[Hop(p, BlockRange(start=blocks.start, end=end))] + chain for chain in rest]
    return chains


def random_small_swarm(rng):
    blocks = rng.randint(2, 7)
    servers, rtt, steps, failures = {}, {}, {}, {}
    for i in range(rng.randint(1, 6)):
        start = rng.randrange(blocks)
        fields = dict(open_sessions=rng.choice([0, 0, 3]), cache_tokens_left=rng.choice([0, 5000]))
        servers[peer(i)] = server(start, rng.randint(start + 1, blocks), rps=rng.choice([0, rng.uniform(1, 200)]), **fields)
        if rng.random() < 0.8:
            rtt[peer(i)] = rng.choice([rng.uniform(0.001, 0.2), math.inf])
        if rng.random() < 0.3:
            steps[peer(i)] = MeasuredStep(rng.uniform(0.001, 2.0), rng.randint(1, 4))
        if rng.random() < 0.2:
            failures[peer(i)] = rng.randint(1, 3)
    start = rng.randrange(blocks)
    return servers, rtt, BlockRange(start=start, end=rng.randint(start + 1, blocks)), dict(steps=steps, failures=failures)


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_chosen_chain_costs_what_the_best_of_all_chains_costs(jitter):
    """Against brute force on many small random swarms: without jitter the chain is optimal, with it within
    (1 + jitter) of optimal; the missing blocks named are exactly the uncovered ones."""
    rng, checked = random.Random(jitter), 0
    for seed in range(400):
        servers, rtt, blocks, seen = random_small_swarm(rng)
        banned = frozenset(p for p in servers if rng.random() < 0.15)
        cache_tokens = rng.choice([0, 1000, 10_000])
        options = dict(default_rtt=0.05, cache_tokens=cache_tokens, **seen)
        chains = all_chains(servers, blocks, banned)
        if not chains:
            uncovered = [i for i in range(blocks.start, blocks.end)
                         if not any(s.start <= i < s.end for p, s in servers.items() if p not in banned)]  # fmt: skip
            with pytest.raises(MissingBlocksError) as caught:
                choose_chain(servers, rtt, blocks, banned=banned, jitter=jitter, **options)
            assert caught.value.missing == uncovered, seed
            continue
        chain = choose_chain(servers, rtt, blocks, banned=banned, jitter=jitter, **options)
        assert chain in chains, seed
        best = min(chain_cost(c, servers, rtt, **options) for c in chains)
        assert chain_cost(chain, servers, rtt, **options) <= best * (1 + jitter) * (1 + 1e-9), seed
        checked += 1
    assert checked > 200  # most swarms were covered


def test_equal_replicas_share_the_load_and_a_faster_chain_always_wins():
    replicas = {peer(i): server(0, 4) for i in range(4)} | {peer(10 + i): server(4, 8) for i in range(3)}
    blocks = BlockRange(start=0, end=8)
    per_call = Counter(tuple(hop.peer for hop in choose_chain(replicas, {}, blocks)) for _ in range(600))
    per_client = Counter(tuple(hop.peer for hop in choose_chain(replicas, {}, blocks, salt=bytes([i, 7]))) for i in range(200))
    for chosen in (per_call, per_client):
        first, second = Counter(chain[0] for chain in chosen.elements()), Counter(chain[1] for chain in chosen.elements())
        assert set(first) == {peer(i) for i in range(4)} and min(first.values()) >= sum(first.values()) / 8
        assert set(second) == {peer(10 + i) for i in range(3)} and min(second.values()) >= sum(second.values()) / 6
    # one client (one salt) keeps its chain from call to call
    assert len({tuple(hop.peer for hop in choose_chain(replicas, {}, blocks, salt=b"me")) for _ in range(20)}) == 1

    faster = replicas | {peer(20): server(0, 8)}  # 0.075 + 0.08 = 0.155 s a step against 0.18 s: 16%, over the jitter
    for i in range(300):
        salt = i.to_bytes(2, "big") if i % 2 else None
        assert [hop.peer for hop in choose_chain(faster, {peer(20): 0.075}, blocks, salt=salt)] == [peer(20)]


def test_load_failures_measured_steps_and_cache_steer_away_from_a_server():
    blocks = BlockRange(start=0, end=4)
    idle, other = peer(0), peer(1)

    def chosen(servers, **options):
        return choose_chain(servers, {}, blocks, jitter=0.0, **options)[0].peer

    assert chosen({idle: server(0, 4), other: server(0, 4, open_sessions=3)}) == idle
    assert chosen({idle: server(0, 4, open_sessions=3), other: server(0, 4)}) == other
    pair = {idle: server(0, 4), other: server(0, 4)}
    assert chosen(pair, failures={idle: 1}) == other
    assert chosen(pair, steps={idle: MeasuredStep(seconds=0.5, blocks=4)}) == other  # announced 0.09 s, measured 0.5
    assert chosen(pair, steps={idle: MeasuredStep(seconds=0.001, blocks=4)}, failures={other: 1}) == idle
    full = {idle: server(0, 4, cache_tokens_left=100), other: server(0, 4, rps=10.0, cache_tokens_left=10_000)}
    assert chosen(full) == idle
    assert chosen(full, cache_tokens=1000) == other  # the fast server has no room for our session
    assert chosen({idle: server(0, 4, cache_tokens_left=100)}, cache_tokens=1000) == idle  # ...unless it is the only one


def test_a_server_that_failed_its_ping_is_a_last_resort():
    servers = {peer(0): server(0, 4, rps=1000.0), peer(1): server(0, 2), peer(2): server(2, 4, rps=1.0)}
    rtt = {peer(0): math.inf}
    assert [hop.peer for hop in choose_chain(servers, rtt, BlockRange(start=0, end=4))] == [peer(1), peer(2)]
    chain = choose_chain(servers, rtt, BlockRange(start=0, end=4), banned=frozenset({peer(2)}))
    assert [hop.peer for hop in chain] == [peer(0)]  # the only one left for blocks 2:4: tried rather than an error


def test_pinging_converges_on_measured_chains_without_pinging_the_swarm():
    rng = random.Random(1)
    servers, true_rtt = {}, {}
    for i in range(1000):
        length = rng.randint(8, 20)
        start = rng.randrange(80 - length + 1)
        servers[peer(i)] = server(start, start + length, rps=rng.uniform(5, 200))
        true_rtt[peer(i)] = rng.choice([rng.uniform(0.001, 0.2), math.inf])  # half of them do not answer
    blocks, measured = BlockRange(start=0, end=80), {}
    for _ in range(10):  # route refreshes, each pinging what peers_to_ping names
        to_ping = peers_to_ping(servers, measured, blocks, salt=b"client")
        assert not set(to_ping) & set(measured) and len(to_ping) <= 3 * 10
        measured |= {p: true_rtt[p] for p in to_ping}
    chain = choose_chain(servers, measured, blocks, salt=b"client")
    assert all(hop.peer in measured and measured[hop.peer] < math.inf for hop in chain)
    assert len(measured) < 150
    # in a small swarm every server is on some chain, so all of them get pinged
    small = {peer(0): server(0, 3), peer(1): server(3, 6), peer(2): server(3, 6)}
    assert set(peers_to_ping(small, {}, BlockRange(start=0, end=6))) == set(small)


def test_a_server_that_does_not_answer_its_ping_is_pinged_again_later(checkpoints):
    path = checkpoints("llama", num_layers=2)
    swarm = start_swarm(path, ["0:2", "0:2"])
    hung = swarm.servers[1]
    try:
        hung.signal(signal.SIGSTOP)
        config = ClientConfig(connect_timeout=1.0, ping_retry=5.0)
        sequence = connect_sequence(str(path), load_config(path), swarm.initial_peers, client_config=config)
        chain = sequence.make_chain()
        silent = [p for p, rtt in sequence.rtt.items() if rtt == math.inf]
        assert len(sequence.rtt) == 2 and len(silent) == 1 and silent[0].to_base58() == peer_of(hung)
        assert [hop.peer for hop in chain] != silent  # the answering server, not the silent one
        hung.signal(signal.SIGCONT)
        sequence.update_routes(force=True)  # within ping_retry: the failed ping stands
        assert sequence.rtt[silent[0]] == math.inf
        time.sleep(max(0.0, sequence.rtt_expires[silent[0]] - time.monotonic()))
        sequence.update_routes(force=True)
        assert sequence.rtt[silent[0]] < math.inf
        sequence.close()
    finally:
        hung.signal(signal.SIGCONT)
        swarm.stop()


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
