"""End to end through real processes: a DHT node and servers on 127.0.0.1, a client through the public API.
Every result is compared with transformers running the same checkpoint locally."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import start_swarm
from meadow import AutoDistributedModelForCausalLM

FAMILIES = {  # family -> server spans over a 6-block model
    "llama": ["0:2", "2:4", "4:6"],
    "mistral": ["0:3", "3:6"],
    "qwen2": ["0:4", "4:6"],
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def swarm_and_models(request, checkpoints):
    family = request.param
    path = checkpoints(family, num_layers=6)
    swarm = start_swarm(path, FAMILIES[family])
    try:
        distributed = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        yield distributed, local, tokenizer
        distributed.sequence.close()
    finally:
        swarm.stop()
    # a clean stop, without a traceback: a server that another still had a push stream open to printed one
    for server in swarm.servers:
        said = "\n".join(server.lines)
        assert "Server stopped" in server.lines and "Traceback" not in said, said


def test_logits_equal_local_model(swarm_and_models):
    distributed, local, _ = swarm_and_models
    input_ids = torch.randint(0, local.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = local(input_ids).logits
        got = distributed(input_ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_client_holds_no_block_weights(swarm_and_models):
    distributed, local, _ = swarm_and_models
    names = [name for name, _ in distributed.named_parameters()]
    assert not [name for name in names if ".layers." in name]
    assert sum(p.numel() for p in distributed.parameters()) < sum(p.numel() for p in local.parameters()) / 2


def test_greedy_generation_is_identical(swarm_and_models):
    distributed, local, tokenizer = swarm_and_models
    inputs = tokenizer("A meadow of many machines", return_tensors="pt")
    expected = local.generate(**inputs, max_new_tokens=12, do_sample=False)
    got = distributed.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


def test_left_padded_batch_is_identical(swarm_and_models):
    distributed, local, tokenizer = swarm_and_models
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Hi", "A longer prompt than the first"], return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    expected = local.generate(**inputs, max_new_tokens=8, do_sample=False)
    got = distributed.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


def test_chat_over_several_generate_calls_equals_one_generation(swarm_and_models):
    distributed, local, tokenizer = swarm_and_models
    input_ids = tokenizer("Tell me", return_tensors="pt")["input_ids"]
    expected = local.generate(input_ids, max_new_tokens=16, do_sample=False)
    # room for the first call only: the later ones grow the session on every server
    with distributed.inference_session(max_length=input_ids.shape[1] + 4) as session:
        ids = input_ids
        for _ in range(3):
            ids = distributed.generate(ids, max_new_tokens=4, do_sample=False)
        session.make_room(500)  # what the next call will need, asked for at once (not in GROWTH_TOKENS at a time)
        ids = distributed.generate(ids, max_new_tokens=4, do_sample=False)
        assert [segment.max_length for segment in session.remote.segments] == [500] * len(session.remote.segments)
    assert torch.equal(ids, expected)


def test_sampling_with_a_seed_matches_local(swarm_and_models):
    distributed, local, tokenizer = swarm_and_models
    inputs = tokenizer("Sample", return_tensors="pt")
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(7)
    expected = local.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    got = distributed.generate(**inputs, **kwargs)
    assert torch.equal(got, expected)


def test_a_session_is_closed_only_by_the_process_that_opened_it(swarm_and_models):
    """A child forked mid-session (a fork-based DataLoader's worker, say) that closes its copy, as its garbage collector
    would, ends at once and leaves the session alone: the streams are the parent's, whose generation goes on."""
    distributed, local, tokenizer = swarm_and_models
    input_ids = tokenizer("Forked", return_tensors="pt")["input_ids"]
    expected = local.generate(local.generate(input_ids, max_new_tokens=4, do_sample=False), max_new_tokens=4,
                              do_sample=False)  # fmt: skip
    with distributed.inference_session(max_length=32) as session:
        ids = distributed.generate(input_ids, max_new_tokens=4, do_sample=False)
        child = os.fork()
        if child == 0:
            code = 1
            try:
                session.close()
                code = 0
            finally:
                os._exit(code)
        status, deadline = None, time.monotonic() + 20
        while status is None and time.monotonic() < deadline:
            pid, code = os.waitpid(child, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(code)
            else:
                time.sleep(0.05)
        if status is None:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        assert status == 0, "the child's close of the session it inherited hung" if status is None else status
        ids = distributed.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(ids, expected)
