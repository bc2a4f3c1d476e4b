"""Load balancing as pure decisions on simulated swarms of up to a thousand servers: new servers go where the
swarm's throughput is weakest, gaps get filled, and a balanced swarm never moves."""

from __future__ import annotations

import random

import pytest
from hivemind.p2p import PeerID

from meadow.server.block_selection import Placement, block_throughputs, choose_move, choose_span, placements
from meadow.swarm import ServerInfo, ServerState


def join(swarm: list[Placement], length: int, throughput: float, num_blocks: int) -> Placement:
    """What `meadow serve --num-blocks` does on start: take the weakest window of the swarm as it is."""
    start = choose_span(block_throughputs(swarm, num_blocks), length)
    swarm.append(Placement(start, start + length, throughput))
    return swarm[-1]


def random_swarm(rng: random.Random, servers: int, num_blocks: int, max_length: int) -> list[Placement]:
    swarm: list[Placement] = []
    for _ in range(servers):
        join(swarm, rng.randint(1, max_length), rng.uniform(10, 1000), num_blocks)
    return swarm


def balance_round(swarm: list[Placement], num_blocks: int, rng: random.Random, quality: float = 0.75) -> int:
    """Every server checks once, in random order, seeing the others' latest places (as after a jittered wait);
    moves are applied at once. Returns how many servers moved."""
    moves = 0
    for i in rng.sample(range(len(swarm)), len(swarm)):
        mine = swarm[i]
        start = choose_move(mine, swarm[:i] + swarm[i + 1 :], num_blocks, quality)
        if start is not None:
            swarm[i] = Placement(start, start + len(mine), mine.throughput)
            moves += 1
    return moves


def score(swarm: list[Placement], num_blocks: int) -> tuple[int, float]:
    """What every move must improve: fewer uncovered blocks, then a stronger weakest block."""
    throughputs = block_throughputs(swarm, num_blocks)
    return -throughputs.count(0.0), min(throughputs)


def test_a_new_server_takes_the_blocks_weakest_in_throughput_not_in_server_count():
    # blocks 0:4 have one fast server, blocks 4:8 three slow ones
    swarm = [Placement(0, 4, 1000.0)] + [Placement(4, 8, 10.0)] * 3
    assert choose_span(block_throughputs(swarm, 8), 4) == 4
    assert choose_span([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0], 4) == 0  # the same counts, read as server counts


def test_servers_joining_one_by_one_cover_every_block_of_a_thousand_server_swarm():
    rng, num_blocks, swarm = random.Random(1), 80, []
    gaps = num_blocks
    while gaps:
        join(swarm, rng.randint(1, 12), rng.uniform(10, 1000), num_blocks)
        now = block_throughputs(swarm, num_blocks).count(0.0)
        assert now < gaps  # every newcomer covers at least one block nobody held
        gaps = now
    assert len(swarm) <= num_blocks
    while len(swarm) < 1000:
        join(swarm, rng.randint(1, 12), rng.uniform(10, 1000), num_blocks)
    throughputs = block_throughputs(swarm, num_blocks)
    # the weakest block gets a fair share: at least half the average of what the swarm has per block
    average = sum(p.throughput * len(p) for p in swarm) / num_blocks
    assert min(throughputs) > 0.5 * average, (min(throughputs), average)


def test_a_balanced_swarm_of_a_thousand_servers_never_moves():
    rng, num_blocks = random.Random(2), 80
    swarm = random_swarm(rng, 1000, num_blocks, 12)
    before = list(swarm)
    for _ in range(2):
        assert balance_round(swarm, num_blocks, rng) == 0
    assert swarm == before


def test_balancing_converges_and_then_stays_put():
    """Random small swarms, placed at random (not balanced): each move improves the swarm by a fixed step,
    so the moves stop after a few rounds, and from then on nobody moves."""
    for seed in range(300):
        converge_then_stay(random.Random(seed))


def converge_then_stay(rng: random.Random) -> None:
    num_blocks = rng.randint(2, 10)
    swarm = []
    for _ in range(rng.randint(1, 12)):
        length = rng.randint(1, num_blocks)
        start = rng.randint(0, num_blocks - length)
        swarm.append(Placement(start, start + length, rng.choice([50.0, 100.0, rng.uniform(1, 1000)])))
    for _ in range(50):
        previous = score(swarm, num_blocks)
        if balance_round(swarm, num_blocks, rng) == 0:
            break
        assert score(swarm, num_blocks) > previous
    else:
        pytest.fail(f"still moving after 50 rounds: {swarm}")
    settled = list(swarm)
    for _ in range(5):
        assert balance_round(swarm, num_blocks, rng) == 0
    assert swarm == settled


def test_a_gap_left_by_a_dead_server_is_filled_by_one_server_and_then_all_stay():
    rng, num_blocks = random.Random(3), 24
    swarm: list[Placement] = []
    for _ in range(5):  # 30 block slots for 24 blocks: one span is held twice, the others once
        join(swarm, 6, 100.0, num_blocks)
    assert score(swarm, num_blocks)[0] == 0
    sole = next(p for p in swarm if min(block_throughputs(swarm, num_blocks)[p.start : p.end]) == 100.0)
    swarm.remove(sole)  # the only server of some blocks dies
    assert score(swarm, num_blocks)[0] < 0
    assert balance_round(swarm, num_blocks, rng) >= 1
    assert score(swarm, num_blocks)[0] == 0
    assert balance_round(swarm, num_blocks, rng) == 0


def test_the_only_server_of_its_blocks_does_not_leave_them_for_a_gap():
    others = [Placement(2, 4, 100.0)]  # blocks 4:6 are uncovered
    assert choose_move(Placement(0, 2, 100.0), others, 6) is None
    # with a second server on 0:2, either of the two fills the gap
    assert choose_move(Placement(0, 2, 100.0), [*others, Placement(0, 2, 100.0)], 6) == 4


def test_a_server_moves_only_when_the_weakest_block_gets_clearly_faster():
    others = [Placement(0, 2, 100.0), Placement(2, 4, 80.0)]
    mine = Placement(0, 2, 20.0)  # moving to 2:4 lifts the weakest block from 80 to 100 tokens/s: 1.25x
    assert choose_move(mine, others, 4, quality=0.75) is None  # 1.25x is not > 1 / 0.75
    assert choose_move(mine, others, 4, quality=0.85) == 2  # but is > 1 / 0.85
    with pytest.raises(ValueError):
        choose_move(mine, others, 4, quality=0.0)


def test_a_server_at_its_best_place_stays_even_where_others_are_equal():
    # two identical servers share the model; any move would only swap who holds what
    assert choose_move(Placement(0, 3, 100.0), [Placement(3, 6, 100.0)], 6) is None
    assert choose_move(Placement(3, 6, 100.0), [Placement(0, 3, 100.0)], 6) is None


def test_placements_read_online_and_joining_servers_from_the_dht_view():
    def info(state, start, end, throughput=10.0):
        return ServerInfo(state=state, start=start, end=end, throughput=throughput)

    a, b, c = (PeerID(f"peer-{i}".encode()) for i in range(3))
    per_block = [
        {a: info(ServerState.ONLINE, 0, 2), c: info(ServerState.OFFLINE, 0, 2)},
        {a: info(ServerState.ONLINE, 0, 2)},
        {b: info(ServerState.JOINING, 2, 9, throughput=5.0)},  # an end beyond the model is clipped
    ]
    found = placements(per_block, 3)
    assert found == {a: Placement(0, 2, 10.0), b: Placement(2, 3, 5.0)}
    assert block_throughputs(found.values(), 3) == [10.0, 10.0, 5.0]


def test_throughput_sums_do_not_depend_on_server_order():
    rng = random.Random(4)
    swarm = [Placement(0, 1, rng.uniform(0, 1) * 10 ** rng.randint(-3, 3)) for _ in range(200)]
    assert len({tuple(block_throughputs(rng.sample(swarm, len(swarm)), 1)) for _ in range(20)}) == 1
