"""A server that returns wrong or malformed outputs is caught and routed around.

Cheating servers are the real server started by tests/tampering_server.py with its outputs tampered (noise added by
its blocks; a NaN, or a token missing, in what it sends). Honest servers of the same blocks announce a low speed
(conftest.SLOW: routing takes a step through a span of theirs for 120 s, against a few ms measured), so routing
takes the cheaters first: what the client then returns equals the model run locally.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from conftest import SLOW
from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.client.transport import BadReply, check_reply, is_server_failure
from meadow.client.verify import WrongOutputs, disagreement, tolerance
from meadow.local_swarm import LocalSwarm
from meadow.models import load_tokenizer
from meadow.models.default import default_model_path

NEW_TOKENS = 12
TAMPERING_SERVER = str(Path(__file__).with_name("tampering_server.py"))


def start(model, servers: list[tuple[str, str | None, tuple[str, ...]]]) -> LocalSwarm:
    """A DHT node and servers (span, tampering mode or None, extra args), started in parallel, ready on return."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        for span, mode, extra in servers:
            program = None if mode is None else [sys.executable, TAMPERING_SERVER, mode]
            swarm.start_server(model, "--blocks", span, *extra, wait=False, program=program)
        for server in swarm.servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
    except BaseException:
        stop(swarm)
        raise
    return swarm


def stop(swarm: LocalSwarm) -> None:
    """Tell every server to leave at once (each takes ~2 s to say goodbye), then wait for them all."""
    for server in swarm.servers:
        if server.popen.poll() is None:
            server.popen.send_signal(signal.SIGTERM)
    for server in swarm.servers:
        try:
            server.popen.wait(15)
        except subprocess.TimeoutExpired:
            pass  # swarm.stop() kills it
    swarm.stop()


def peer_of(server) -> PeerID:
    ready = next(line for line in server.lines if "Server ready" in line)
    return PeerID.from_base58(ready.split(" as ")[1].split(",")[0])


def client(model_path, swarm, **config) -> AutoDistributedModelForCausalLM:
    config = ClientConfig(wait_for_servers=10.0, **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(model_path), swarm.initial_peers, client_config=config)


def banned_for(model, peer: PeerID) -> float:
    """Seconds this client will still avoid `peer` (0 if it does not)."""
    return max(0.0, model.sequence.banned_until.get(peer, 0.0) - time.monotonic())


@pytest.fixture(scope="module")
def model_path(checkpoints):
    return checkpoints("llama", num_layers=24)


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_and_tokens(local):
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    return prompt, local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def swarms(model_path):
    """One DHT node and two swarms of the model, started together. The default one: blocks 0:12 on a cheater (noise)
    and two slow honest servers, 12:24 on one honest server. The one named "broken": all blocks on a server that
    sends NaN, on one whose replies lack a token, and on a slow honest one. Yields the cheater and the broken two."""
    broken = ("--dht-prefix", "broken")
    swarm = start(model_path, [
        ("0:12", None, SLOW), ("0:12", None, SLOW), ("0:12", "noise", ()), ("12:24", None, ()),
        ("0:24", None, SLOW + broken), ("0:24", "nan", broken), ("0:24", "shape", broken),
    ])  # fmt: skip
    yield swarm, peer_of(swarm.servers[2]), [peer_of(server) for server in swarm.servers[5:]]
    stop(swarm)


@pytest.fixture
def cheating_swarm(swarms):
    swarm, cheater, _ = swarms
    return swarm, cheater


def test_a_cheater_changes_tokens_when_nobody_checks(model_path, cheating_swarm, prompt_and_tokens):
    swarm, cheater = cheating_swarm
    prompt, reference = prompt_and_tokens
    with client(model_path, swarm, verify=0.0) as model:
        assert cheater in {hop.peer for hop in model.sequence.make_chain()}
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert not torch.equal(got, reference)  # the tampering matters: the next tests catch something real
        assert banned_for(model, cheater) == 0


def test_greedy_tokens_equal_local_when_a_cheater_serves_the_session(model_path, cheating_swarm, prompt_and_tokens, caplog):
    swarm, cheater = cheating_swarm
    prompt, reference = prompt_and_tokens
    with client(model_path, swarm, verify=1.0) as model, caplog.at_level("WARNING", logger="meadow.client"):
        assert cheater in {hop.peer for hop in model.sequence.make_chain()}  # the session starts on the cheater
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(got, reference)
        assert banned_for(model, cheater) > 3600  # a long ban, not a failover's 15 s
        assert model.sequence.checker.caught >= 1
    assert f"wrong outputs from {cheater}" in caplog.text  # logged with the two servers that outvoted it


def test_gradients_equal_local_when_a_cheater_serves_the_forward(model_path, cheating_swarm, local):
    swarm, cheater = cheating_swarm
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])
    with client(model_path, swarm, verify=1.0) as model:
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds).logits
        (logits.square().mean()).backward()
        assert banned_for(model, cheater) > 3600
        assert cheater not in {hop.peer for hop in model.sequence.last_hops}

    local_embeds = local.get_input_embeddings()(input_ids).detach().requires_grad_()
    expected = local(inputs_embeds=local_embeds).logits
    expected.square().mean().backward()
    assert (logits - expected).abs().max() <= 1e-4
    assert ((embeds.grad - local_embeds.grad).abs().max() / local_embeds.grad.abs().max()) <= 1e-4


def test_malformed_replies_fail_over_in_generation_and_forward(model_path, swarms, prompt_and_tokens, local, caplog):
    swarm, _, broken = swarms
    prompt, reference = prompt_and_tokens
    for call in ("generate", "forward"):
        caplog.clear()
        with client(model_path, swarm, verify=0.0, dht_prefix="broken") as model, caplog.at_level("WARNING", "meadow.client"):
            assert model.sequence.make_chain()[0].peer in broken
            if call == "generate":
                assert torch.equal(model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False), reference)
            else:
                with torch.no_grad():
                    assert (model(prompt).logits - local(prompt).logits).abs().max() <= 1e-4
            assert all(banned_for(model, peer) > 0 for peer in broken)
        # banned for the replies they sent (the client's checks caught them), not for crashing
        nan, shape = broken
        assert f"bad reply from {nan}: tensor 0 holds NaN" in caplog.text
        assert f"bad reply from {shape}: tensor 0 is float32 (1, 7, 64), expected" in caplog.text


def test_reply_checks():
    peer = "QmPeer"
    hidden = torch.zeros(2, 3, 8)
    assert check_reply([hidden.clone()], [hidden], peer)[0].shape == (2, 3, 8)
    bad = {
        "2 tensors, expected 1": [hidden, hidden],
        r"float32 \(2, 2, 8\), expected float32 \(2, 3, 8\)": [hidden[:, :2]],
        "float16": [hidden.half()],
        "NaN or infinite": [torch.full_like(hidden, float("inf"))],
    }
    for message, tensors in bad.items():
        with pytest.raises(BadReply, match=message) as caught:
            check_reply(tensors, [hidden], peer)
        assert is_server_failure(caught.value)
    assert is_server_failure(WrongOutputs("differs", peer))


def test_tolerance_fits_dtypes_and_quantization():
    float32, bfloat16 = {"dtype": "float32"}, {"dtype": "bfloat16"}
    int8, nf4 = {**float32, "quant": "int8"}, {**float32, "quant": "nf4"}
    assert tolerance(float32, float32) < tolerance(bfloat16, bfloat16) < tolerance(float32, bfloat16)
    assert tolerance(float32, float32) < tolerance(nf4, nf4) < tolerance(int8, int8) == tolerance(int8, float32) < 1
    for other in (float32, int8, {**float32, "quant": "fp3"}):  # nf4 is as far from these as zeros would be
        assert tolerance(nf4, other) == tolerance(other, nf4) == math.inf
    a = torch.randn(1, 5, 16)
    assert disagreement([a], [a + 1e-5 * torch.randn_like(a)]) < tolerance(float32, float32)
    changed = a.clone()
    changed[0, 4] *= 1.01  # one token of five off by 1%: caught in float32, within bfloat16's roundoff
    assert tolerance(float32, float32) < disagreement([a], [changed]) < tolerance(bfloat16, bfloat16)
    with pytest.raises(ValueError, match="verify"):
        ClientConfig(verify=1.5)


def test_spot_checks_ban_no_honest_int8_server():
    """LLM.int8() keeps the activation columns that hold an outlier unquantized, chosen from the whole batch, so an
    int8 server's tokens decoded one by one differ from its own prefill of them (by up to 0.3 per token on the default
    model). A spot-check compares exactly those: with every step checked, three honest int8 servers must stay
    unbanned. A real model's blocks 0:4, since random weights have no outliers."""
    model = str(default_model_path())
    swarm = start(model, [*[("0:4", None, ("--quant", "int8"))] * 3, ("4:30", None, ())])
    try:
        swarm_model = client(model, swarm, verify=1.0)
        tokenizer = load_tokenizer(model)
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                             tokenize=False, add_generation_prompt=True)  # fmt: skip
        prompt = tokenizer(text, return_tensors="pt")["input_ids"]
        swarm_model.generate(prompt, max_new_tokens=8, do_sample=False)
        checker = swarm_model.sequence.checker
        assert checker.checked >= 8 and checker.caught == 0  # each step's 0:4 hop was checked; 4:30 has no witness
        assert not swarm_model.sequence.banned()
        swarm_model.sequence.close()
    finally:
        stop(swarm)
