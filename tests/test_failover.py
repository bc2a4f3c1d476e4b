"""Servers die, hang and leave mid-generation; the client fails over and the tokens do not change."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from conftest import SLOW, peer_of, server_with_peer, start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.client.event_loop import run
from meadow.client.routing import MissingBlocksError
from meadow.models.default import default_model_path
from meadow.stopping import descendants
from meadow.swarm import ServerState, fetch_servers, generate_identity

NEW_TOKENS = 16
TAMPERING_SERVER = str(Path(__file__).with_name("tampering_server.py"))


class AfterTokens:
    """A generate() streamer that runs actions[n] once n tokens have been generated."""

    def __init__(self, actions: dict[int, Callable[[], None]]):
        self.actions, self.seen = actions, -1  # the first put() is the prompt

    def put(self, value) -> None:
        self.seen += 1
        if self.seen in self.actions:
            self.actions[self.seen]()

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def model_path(checkpoints):
    return checkpoints("llama", num_layers=6)


@pytest.fixture(scope="module")
def expected(model_path):
    local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    return prompt, local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)


def client(model_path, swarm, **config):
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(model_path), swarm.initial_peers, client_config=ClientConfig(**config)
    )


def server_of(swarm, span: str):
    return next(server for server in swarm.servers if f"--blocks {span}" in " ".join(server.popen.args))


def wait_until_seen(model, server, blocks: range, timeout: float = 60.0) -> None:
    """Until the client's DHT node finds `server` online for each of `blocks`: a record just stored may not have
    reached every node it will."""
    deadline = time.monotonic() + timeout
    while True:
        per_block = fetch_servers(model.sequence.dht, model.sequence.dht_prefix, model.sequence.num_blocks)
        seen = [{peer.to_base58() for peer, info in per_block[i].items() if info.state == ServerState.ONLINE}
                for i in blocks]  # fmt: skip
        if all(peer_of(server) in peers for peers in seen):
            return
        assert time.monotonic() < deadline, f"the client's DHT node did not find the server online in {timeout} s"
        time.sleep(0.2)


def signal_current_server(model, swarm, first_block: int, sig: int):
    """An action that signals whichever server the model's open session uses for `first_block`."""

    def action():
        peer = next(s.hop.peer for s in model.session.remote.segments if s.hop.blocks.start == first_block)
        server_with_peer(swarm.servers, peer).signal(sig)

    return action


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_greedy_tokens_survive_a_dead_or_hung_server(model_path, expected, how):
    prompt, reference = expected
    swarm = start_swarm(model_path, ["0:3", "3:6", "3:6"])
    try:
        model = client(model_path, swarm, step_timeout=3.0)
        streamer = AfterTokens({5: signal_current_server(model, swarm, 3, how)})
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        assert torch.equal(got, reference)
        model.sequence.close()
    finally:
        for server in swarm.servers:
            server.signal(signal.SIGCONT)
        swarm.stop()


def test_a_server_killed_while_it_holds_a_step_is_failed_over_at_once_and_banned_once(model_path, expected, caplog):
    prompt, reference = expected
    swarm = start_swarm(model_path, ["0:3", "3:6", "3:6"])
    try:  # timeouts so long that only a stream seen to end lets the client go on before the test's own timeout
        model = client(model_path, swarm, request_timeout=60.0, step_timeout=60.0, min_step_timeout=60.0)

        def stop_then_kill():  # the next step reaches the stopped server's kernel; it dies before it answers
            peer = next(s.hop.peer for s in model.session.remote.segments if s.hop.blocks.start == 3)
            server = server_with_peer(swarm.servers, peer)
            server.signal(signal.SIGSTOP)
            threading.Timer(1.0, server.signal, (signal.SIGKILL,)).start()

        with caplog.at_level(logging.WARNING, logger="meadow"):
            streamer = AfterTokens({5: stop_then_kill})
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        assert torch.equal(got, reference)
        bans = [line for line in caplog.text.splitlines() if "avoiding it for" in line]
        assert len(bans) == 1 and "TimeoutError" not in bans[0], bans
        (victim,) = model.sequence.banned()
        until = model.sequence.banned_until[victim]
        model.sequence.ban(victim, ConnectionResetError())  # another session's request, in flight when it died
        assert model.sequence.banned_until[victim] == until and model.sequence.failures[victim] == 1
        model.sequence.close()
    finally:
        swarm.stop()


def test_a_failed_server_stays_avoided_after_its_ban_until_it_announces_again(model_path, expected):
    """A hung server's record lives on for three announcement periods: once its ban is over it is not dialled again
    (which takes seconds for a machine that is gone) until it announces again, and then it is used again. The other
    server of its blocks announces a low speed, so routing takes the hung one whenever it may."""
    prompt, reference = expected
    swarm = start_swarm(model_path, ["0:3", "3:6"], "--update-period", "10")
    try:
        slow = swarm.start_server(model_path, "--blocks", "3:6", *SLOW)
        model = client(model_path, swarm, ban_seconds=1.0, step_timeout=2.0, min_step_timeout=2.0, connect_timeout=2.0)
        hung = server_of(swarm, "3:6")
        streamer = AfterTokens({3: lambda: hung.signal(signal.SIGSTOP)})
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        assert torch.equal(got, reference)
        (victim,) = model.sequence.failures
        assert victim.to_base58() == peer_of(hung)
        time.sleep(max(0.0, model.sequence.banned_until[victim] - time.monotonic()))
        model.sequence.update_routes(force=True)
        assert victim in model.sequence.servers and victim in model.sequence.banned()  # its record lives on
        for _ in range(2):
            assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False), reference)
        assert model.sequence.failures[victim] == 1  # not tried again

        hung.signal(signal.SIGCONT)  # it announces at once (its announcement is overdue)
        deadline = time.monotonic() + 30
        while victim in model.sequence.banned():
            assert time.monotonic() < deadline, "the server that came back was never routed to again"
            time.sleep(0.5)
            model.sequence.update_routes(force=True)
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False), reference)
            assert victim in [hop.peer for hop in session.remote.hops] and slow.popen.poll() is None
        model.sequence.close()
    finally:
        for server in swarm.servers:
            server.signal(signal.SIGCONT)
        swarm.stop()


def test_failover_to_smaller_servers_that_join_after_the_session_began(model_path, expected):
    prompt, reference = expected
    swarm = start_swarm(model_path, ["0:3", "3:6"], "--update-period", "2")
    try:
        model = client(model_path, swarm, wait_for_servers=120.0)

        def replace_with_two_small_servers():
            server_of(swarm, "3:6").signal(signal.SIGKILL)
            swarm.start_server(model_path, "--blocks", "3:5", wait=False)
            swarm.start_server(model_path, "--blocks", "5:6", wait=False)

        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=AfterTokens({6: replace_with_two_small_servers}))
        assert torch.equal(got, reference)
        model.sequence.close()
    finally:
        swarm.stop()


def test_a_replacement_that_fails_its_replay_is_banned_and_the_next_one_taken(model_path, expected, caplog):
    """The session's server dies; its fastest replacement is two servers, and the second answers the replayed history
    with NaN: it is banned and another server takes its blocks. Only their cache is rebuilt again (the first server of
    the replacement keeps the one it rebuilt), and the tokens do not change."""
    prompt, reference = expected
    swarm = start_swarm(model_path, ["0:6", "0:3"], "--update-period", "2")
    try:
        swarm.start_server(model_path, "--blocks", "3:6", *SLOW, "--update-period", "2")  # honest
        model = client(model_path, swarm, routes_max_age=1.0)  # the failover reads the servers' records again
        broken: list = []

        def after_3_tokens():  # a fast server that sends NaN joins once the session runs on the first one
            broken.append(swarm.start_server(model_path, "--blocks", "3:6", "--update-period", "2",
                                             program=[sys.executable, TAMPERING_SERVER, "nan"]))  # fmt: skip
            wait_until_seen(model, broken[0], range(3, 6))  # else the failover may not know of it yet and skip it
            # and the routes the session was opened with are older than routes_max_age, so the failover reads them
            # again (a server forked in 0.6 s was sometimes seen within 1 s of the session's start)
            time.sleep(1.0)

        def after_6_tokens():
            assert server_with_peer(swarm.servers, model.session.remote.segments[0].hop.peer) is swarm.servers[0]
            swarm.servers[0].signal(signal.SIGKILL)

        streamer = AfterTokens({3: after_3_tokens, 6: after_6_tokens})
        with caplog.at_level(logging.INFO, logger="meadow.client.session"):
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        assert torch.equal(got, reference)
        cheat = PeerID.from_base58(peer_of(broken[0]))
        assert model.sequence.banned_until[cheat] > time.monotonic()
        rebuilt = [record.getMessage() for record in caplog.records if record.getMessage().startswith("rebuilt")]
        assert [message.split()[5] for message in rebuilt] == ["0:3", "3:6"]  # 0:3 once: kept when 3:6 failed
        assert cheat.to_base58() not in rebuilt[1]
        model.sequence.close()
    finally:
        swarm.stop()


def test_a_client_whose_p2p_daemon_dies_starts_another_and_bans_no_server(model_path, expected, caplog, tmp_path):
    """The client's own p2pd (or DHT process) dies mid-generation: that is our failure, not the servers'. The client
    starts new ones (with its identity file, and its receipts follow) and goes on; the tokens do not change, and no
    server is banned."""
    prompt, reference = expected
    swarm = start_swarm(model_path, ["0:3", "3:6"])
    try:
        identity = generate_identity(tmp_path / "client.key")
        model = client(model_path, swarm, identity=str(identity.path))
        daemons = []

        def kill_our_p2p_daemon():
            daemons.extend(descendants(model.sequence.dht.pid))  # the DHT process's child: p2pd
            for pid in daemons:
                os.kill(pid, signal.SIGKILL)

        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=AfterTokens({5: kill_our_p2p_daemon}))
        assert daemons and torch.equal(got, reference)
        assert not model.sequence.banned() and "avoiding it for" not in caplog.text  # no ban, not even one that ended
        payer = model.sequence.payer
        assert payer.p2p is model.sequence.p2p and payer.client == identity.peer_id.to_base58()
        payer.wait()  # the session's last receipts, sent as it closed: before we take the network down again
        assert not payer.refused  # the servers took the receipts sent over the new connection
        with torch.no_grad():  # a forward pass too, after the DHT process itself died (and its p2pd with it)
            dht_process = model.sequence.dht.pid
            for pid in [dht_process, *descendants(dht_process)]:
                os.kill(pid, signal.SIGKILL)
            model.sequence.routes_updated = 0.0  # stale routes: the pass reads the DHT first, from a dead process
            local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            assert (model(prompt).logits - local(prompt).logits).abs().max() <= 1e-4
        assert not model.sequence.banned() and "avoiding it for" not in caplog.text
        assert caplog.text.count("our DHT process or p2p daemon died; starting new ones") == 2
        assert payer.p2p is model.sequence.p2p

        async def ban_as_a_spot_check_does(peer):  # on the client loop, where no restart can be waited for
            model.sequence.ban(peer, TimeoutError())

        peer = model.sequence.make_chain()[0].peer
        run(ban_as_a_spot_check_does(peer))
        assert model.sequence.banned() == {peer}
        model.sequence.close()
    finally:
        swarm.stop()


def test_forward_survives_a_killed_server_and_missing_blocks_are_named(model_path, expected):
    prompt, _ = expected
    swarm = start_swarm(model_path, ["0:4", "0:4", "4:6"], "--update-period", "2")  # records refreshed often
    try:
        model = client(model_path, swarm, wait_for_servers=6.0)
        local = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        with torch.no_grad():
            reference = local(prompt).logits
            assert (model(prompt).logits - reference).abs().max() <= 1e-4
            server_with_peer(swarm.servers, model.sequence.make_chain()[0].peer).signal(signal.SIGKILL)  # the one in use
            assert (model(prompt).logits - reference).abs().max() <= 1e-4

            server_of(swarm, "4:6").signal(signal.SIGKILL)
            began = time.monotonic()
            with pytest.raises(MissingBlocksError, match="blocks 4:6"):
                model(prompt)
            assert time.monotonic() - began < 30  # bounded wait, then a clear error
        model.sequence.close()
    finally:
        swarm.stop()


def test_a_server_leaving_on_sigterm_mid_generation_tells_its_client_at_once(model_path, expected, caplog):
    """SIGTERM: the server ends its sessions with a ServerLeaving reply before it goes (without it, the client
    only learns from a reset connection, or from its step timeout if the server lingers: 60 s here), and exits."""
    prompt, reference = expected
    swarm = start_swarm(model_path, ["0:3", "3:6", "3:6"])
    try:
        model = client(model_path, swarm, step_timeout=60.0)
        leaving = []

        def terminate_current_server():
            peer = next(s.hop.peer for s in model.session.remote.segments if s.hop.blocks.start == 3)
            leaving.append(server_with_peer(swarm.servers, peer))
            leaving[0].popen.send_signal(signal.SIGTERM)  # the main process only, as a person's Ctrl-C or `kill` would
            leaving[0].popen.wait(timeout=15)  # the next steps go to a server that is gone

        began = time.monotonic()
        with caplog.at_level("INFO", logger="meadow.client.sequence"):
            got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=AfterTokens({5: terminate_current_server}))
        took = time.monotonic() - began
        assert torch.equal(got, reference)
        assert "ServerLeaving" in caplog.text  # the client was told, rather than finding out by a timeout
        assert took < 30, f"generation took {took:.1f} s: the client waited for a timeout"
        assert leaving[0].popen.wait(timeout=15) == 0
        assert any("Server stopped" in line for line in leaving[0].lines)
        model.sequence.close()
    finally:
        swarm.stop()


def test_a_long_prompt_on_a_slow_server_is_waited_for_not_failed_over():
    """A request may take request_timeout beyond what the server's announced speed says its tokens take, so a server
    busy with a long prompt is not taken for a dead one (and banned, and the prompt sent again elsewhere). Here a 1 s
    request_timeout, and a 1000-token prompt through one server of the default model's 30 blocks: seconds of work,
    as a prefill in a session and as a forward pass."""
    model = str(default_model_path())
    swarm = start_swarm(model, ["0:30"])
    try:
        config = ClientConfig(request_timeout=1.0, max_retries=0)
        with AutoDistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers, client_config=config) as m:
            prompt = torch.randint(100, 30000, (1, 1000), generator=torch.Generator().manual_seed(0))
            assert m.generate(prompt, max_new_tokens=2, do_sample=False).shape == (1, 1002)
            with torch.no_grad():
                assert m(prompt).logits.shape[:2] == (1, 1000)
            assert not m.sequence.banned()
    finally:
        swarm.stop()
