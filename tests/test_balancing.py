"""Servers started with --num-blocks only: they spread over the model, fill a gap left by a killed server, and
otherwise stay put. Real processes on 127.0.0.1; the swarm is watched through the DHT as a client sees it.

The tests share one swarm and run in file order: coverage, then stability, then a kill."""

from __future__ import annotations

import re
import signal
import time

import pytest
import torch

from conftest import server_with_peer
from meadow.local_swarm import LocalSwarm
from meadow.models import load_config
from meadow.server.block_selection import placements
from meadow.server.throughput import block_speed
from meadow.swarm import ServerState, dht_prefix_for, fetch_servers, start_dht

NUM_BLOCKS, SPAN = 6, 2
# short periods so that a test sees many balance checks: records expire after 3 update periods (3 s),
# and every server checks its place every 0.25-0.75 s
PERIODS = ("--update-period", "1", "--balance-period", "0.5")


@pytest.fixture(scope="module")
def swarm(checkpoints):
    path = checkpoints("llama", num_layers=NUM_BLOCKS)
    # measured once here, the way servers do it: they all read this entry, so all announce the same speed
    speed, _ = block_speed(load_config(path), torch.float32, torch.device("cpu"))
    with LocalSwarm() as swarm:
        swarm.start_dht()
        # all at once: each sees an empty or half-built swarm, so balancing, not luck, must spread them
        servers = [swarm.start_server(path, "--num-blocks", str(SPAN), *PERIODS, wait=False) for _ in range(4)]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        dht = start_dht(swarm.initial_peers, client_mode=True)
        try:
            yield swarm, path, dht, speed
        finally:
            dht.shutdown()


def online_spans(dht, path) -> dict:
    """peer -> (start, end) of every server the DHT shows online."""
    per_block = fetch_servers(dht, dht_prefix_for(str(path)), NUM_BLOCKS)
    online = [{p: i for p, i in servers.items() if i.state == ServerState.ONLINE} for servers in per_block]
    return {peer: (p.start, p.end) for peer, p in placements(online, NUM_BLOCKS).items()}


def wait_until_settled(dht, path, timeout: float) -> dict:
    """Wait for every block to be online and nobody joining, twice in a row 2 s apart; return the spans."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        per_block = fetch_servers(dht, dht_prefix_for(str(path)), NUM_BLOCKS)
        joining = any(i.state != ServerState.ONLINE for servers in per_block for i in servers.values())
        spans = online_spans(dht, path)
        covered = all(any(a <= b < e for a, e in spans.values()) for b in range(NUM_BLOCKS))
        if covered and not joining and spans == last:
            return spans
        last = spans if covered and not joining else None
        time.sleep(2.0)
    raise AssertionError(f"the swarm did not settle with every block online in {timeout} s: {online_spans(dht, path)}")


def count(server, pattern: str) -> int:
    return sum(1 for line in list(server.lines) if re.search(pattern, line))


def test_servers_started_with_num_blocks_only_cover_the_whole_model(swarm):
    swarm, path, dht, speed = swarm
    spans = wait_until_settled(dht, path, timeout=60)
    assert len(spans) == 4 and all(end - start == SPAN for start, end in spans.values())
    # every server read the measured speed from the cache and announces its share for a 2-block span
    for server in swarm.servers:
        assert "(cached)" in server.wait_for(lambda line: "ready" in line, timeout=1)
    per_block = fetch_servers(dht, dht_prefix_for(str(path)), NUM_BLOCKS)
    announced = {info.throughput for servers in per_block for info in servers.values()}
    assert announced and all(value == pytest.approx(speed.forward_tps / SPAN) for value in announced)


def test_a_balanced_swarm_makes_no_moves(swarm):
    # A minute in the issue; 15 s here with a 0.5 s balance period: each server checks ~30 times (asserted >= 20)
    swarm, path, dht, _ = swarm
    spans = wait_until_settled(dht, path, timeout=60)
    checks = [count(server, "balance check") for server in swarm.servers]
    moves = [count(server, "Moving from") for server in swarm.servers]
    time.sleep(15)
    assert online_spans(dht, path) == spans
    assert [count(server, "Moving from") for server in swarm.servers] == moves
    done = [count(server, "balance check") - before for server, before in zip(swarm.servers, checks)]
    assert min(done) >= 20, done


def test_a_gap_left_by_a_killed_server_is_filled(swarm):
    swarm, path, dht, _ = swarm
    spans = wait_until_settled(dht, path, timeout=60)
    holders = {b: [p for p, (s, e) in spans.items() if s <= b < e] for b in range(NUM_BLOCKS)}
    victim_peer = next(holders[b][0] for b in range(NUM_BLOCKS) if len(holders[b]) == 1)  # the only holder of a block
    victim = server_with_peer(swarm.servers, victim_peer)
    gap = spans[victim_peer]
    moves = sum(count(server, "Moving from") for server in swarm.servers)

    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    while True:
        now = online_spans(dht, path)
        if victim_peer not in now and any(start <= gap[0] and gap[1] <= end for start, end in now.values()):
            break
        assert time.monotonic() - killed < 60, f"blocks {gap} still uncovered 60 s after the kill: {now}\n" + "\n".join(
            f"exit code {server.popen.poll()}, last lines {server.lines[-3:]}" for server in swarm.servers
        )  # a swarm gone silent: what its servers said last
        time.sleep(0.25)
    print(f"blocks {gap[0]}:{gap[1]} served again {time.monotonic() - killed:.1f} s after their only server was killed")
    assert sum(count(server, "Moving from") for server in swarm.servers) > moves  # filled by a move, not by chance
    spans = wait_until_settled(dht, path, timeout=60)
    assert len(spans) == 3


def test_generation_survives_losing_the_only_server_of_some_blocks_when_another_moves_there(checkpoints, caplog):
    """A fixed server holds 3:6 and a --num-blocks server takes the gap 0:3, so the client's chain is those two.
    Mid-generation the 3:6 server is killed and a fixed 0:3 server starts: the --num-blocks server moves to 3:6,
    ending its open session on 0:3 with ServerLeaving, and the client fails over to both: the tokens do not change."""
    from transformers import AutoModelForCausalLM

    from meadow import AutoDistributedModelForCausalLM
    from meadow.client.config import ClientConfig
    from test_failover import AfterTokens

    path = checkpoints("llama", num_layers=NUM_BLOCKS)
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).generate(prompt, max_new_tokens=16, do_sample=False)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        tail = swarm.start_server(path, "--blocks", "3:6", *PERIODS)
        mover = swarm.start_server(path, "--num-blocks", "3", *PERIODS)
        assert "blocks 0:3" in mover.wait_for(lambda line: "ready" in line, timeout=1)

        def kill_the_tail_and_start_a_head():
            tail.signal(signal.SIGKILL)
            swarm.start_server(path, "--blocks", "0:3", *PERIODS, wait=False)

        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), swarm.initial_peers, client_config=ClientConfig(wait_for_servers=90.0)
        )
        with caplog.at_level("INFO", logger="meadow.client.sequence"):
            got = model.generate(prompt, max_new_tokens=16, do_sample=False, streamer=AfterTokens({5: kill_the_tail_and_start_a_head}))
        assert torch.equal(got, reference)
        assert any("Moving from blocks 0:3 to 3:6" in line for line in mover.lines)
        assert "is moving from blocks 0:3 to 3:6" in caplog.text  # the client's session on the mover was told
        model.sequence.close()
