"""local_blocks=N: the client runs the first N blocks itself, so servers never see the token embeddings.

The swarm serves only blocks 2:6 of a 6-block model: a client without local blocks cannot run at all, one with
local_blocks=2 gets the logits, greedy tokens and gradients of the whole model run locally.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.client.routing import MissingBlocksError
from meadow.models import load_block, load_config

LOCAL = 2


@pytest.fixture(scope="module")
def model_path(checkpoints):
    return checkpoints("llama", num_layers=6)


@pytest.fixture(scope="module")
def swarm(model_path):
    swarm = start_swarm(model_path, [f"{LOCAL}:6"])
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(model_path, swarm):
    config = ClientConfig(wait_for_servers=1.0)
    with AutoDistributedModelForCausalLM.from_pretrained(
        str(model_path), swarm.initial_peers, local_blocks=LOCAL, client_config=config
    ) as model:
        yield model


def padded_batch():
    input_ids = torch.tensor([[0, 0, 1, 40, 41, 42, 43], [1, 50, 51, 52, 53, 54, 55]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return input_ids, mask


def test_the_client_holds_exactly_its_local_blocks(model, model_path):
    config = load_config(model_path)
    one_block = sum(p.numel() for p in load_block(model_path, config, 0, torch.float32).parameters())
    assert sum(p.numel() for p in model.local_blocks.parameters()) == LOCAL * one_block
    assert [hop.blocks.start for hop in model.sequence.make_chain()] == [LOCAL]  # servers start after them


def test_logits_and_greedy_tokens_equal_local(model, local):
    input_ids, mask = padded_batch()
    with torch.no_grad():
        expected = local(input_ids, attention_mask=mask).logits
        got = model(input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    reference = local.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0), reference)
    prompt = input_ids[1:]
    # a chat: the second call sends only its new tokens, and grows the session (here and on the servers) past the
    # first call's room
    with model.inference_session(max_length=prompt.shape[1] + 3):
        first = model.generate(prompt, max_new_tokens=3, do_sample=False)
        second = model.generate(first, max_new_tokens=5, do_sample=False)
    assert torch.equal(second, local.generate(prompt, max_new_tokens=8, do_sample=False))


def test_gradients_flow_through_the_local_blocks(model, local):
    input_ids, _ = padded_batch()
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.square().mean().backward()
    local_embeds = local.get_input_embeddings()(input_ids).detach().requires_grad_()
    local(inputs_embeds=local_embeds).logits.square().mean().backward()
    assert ((embeds.grad - local_embeds.grad).abs().max() / local_embeds.grad.abs().max()) <= 1e-4


def test_without_local_blocks_the_swarm_lacks_them_and_bad_options_are_refused(model_path, swarm):
    config = ClientConfig(wait_for_servers=1.0)
    with AutoDistributedModelForCausalLM.from_pretrained(str(model_path), swarm.initial_peers, client_config=config) as plain:
        with pytest.raises(MissingBlocksError, match="blocks 0:2"):
            plain(torch.tensor([[1, 2, 3]]))
    for options, message in [
        (dict(local_blocks=6), r"local_blocks must be in \[0, 6\)"),
        (dict(local_blocks=2, tuning_mode="deep_ptune", pre_seq_len=2), "deep_ptune"),
        (dict(local_blocks=2, active_adapter="some-adapter"), "active_adapter"),
    ]:
        with pytest.raises(ValueError, match=message):
            AutoDistributedModelForCausalLM.from_pretrained(str(model_path), swarm.initial_peers, **options)
