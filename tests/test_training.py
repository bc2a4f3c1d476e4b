"""Training through a real swarm: losses and gradients equal transformers run locally on the same checkpoint.

Servers hold blocks 0:2, 2:4 (twice) of a 4-block model; the client holds embeddings, norm and head. Gradients are
compared w.r.t. inputs_embeds, client-side parameters, prompts (ptune), deep prompts (deep_ptune) and a
classification head, with relative error <= 1e-4 in float32.
"""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import SLOW, server_with_peer, start_swarm
from meadow import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from meadow.client.config import ClientConfig
from meadow.client.model import positions_from_mask

SPANS = ["0:2", "2:4", "2:4"]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints("llama", num_layers=4)


@pytest.fixture(scope="module")
def swarm(path):
    swarm = start_swarm(path, SPANS, "--max-batch-tokens", "512")
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def local(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def connect(path, swarm, cls=AutoDistributedModelForCausalLM, **kwargs):
    kwargs.setdefault("client_config", ClientConfig(wait_for_servers=10.0))
    return cls.from_pretrained(str(path), swarm.initial_peers, **kwargs)


def batch(vocab_size: int, rows: int = 2, length: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    return input_ids, mask


def labels_for(input_ids, mask):
    """Labels of real tokens that follow a real token: a pad's output is arbitrary, so nothing is predicted from it."""
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


def test_loss_and_gradients_equal_local_model(path, swarm, local):
    model = connect(path, swarm)
    input_ids, mask = batch(local.config.vocab_size)
    labels = labels_for(input_ids, mask)
    positions = positions_from_mask(mask.bool())

    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    model.norm.weight.requires_grad_(True)  # a client-side parameter being trained
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    out.loss.backward()

    local.zero_grad()
    local_embeds = local.get_input_embeddings()(input_ids).detach().requires_grad_()
    expected = local(inputs_embeds=local_embeds, attention_mask=mask, position_ids=positions, labels=labels)
    expected.loss.backward()

    assert abs(out.loss.item() - expected.loss.item()) <= 1e-4 * abs(expected.loss.item())
    assert relative_error(embeds.grad, local_embeds.grad) <= 1e-4
    assert relative_error(model.norm.weight.grad, local.model.norm.weight.grad) <= 1e-4
    assert embeds.grad.abs().sum() > 0  # the gradient really came through the servers
    model.sequence.close()


def test_big_batches_go_in_micro_batches_with_the_same_gradients(path, swarm, local):
    # the servers take at most 512 tokens per request: 24 x 40 = 960 tokens must be split to be accepted; here into
    # 24 micro-batches, more than a server runs for one peer at once (16): they must not all be sent at once
    config = ClientConfig(micro_batch_tokens=40, wait_for_servers=10.0, busy_wait=5.0)
    model = connect(path, swarm, client_config=config)
    input_ids = torch.randint(4, local.config.vocab_size, (24, 40), generator=torch.Generator().manual_seed(3))
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=input_ids).loss.backward()

    local_embeds = local.get_input_embeddings()(input_ids).detach().requires_grad_()
    local(inputs_embeds=local_embeds, labels=input_ids).loss.backward()
    assert relative_error(embeds.grad, local_embeds.grad) <= 1e-4
    model.sequence.close()


def local_prompted(local, input_ids, mask, prefix, deep=None):
    """The reference for prompt tuning: transformers with the prompt embeddings before every row and, for deep
    prompt tuning, each layer's prompt added to the prefix positions' hidden states before that layer."""
    rows, length = input_ids.shape
    prefix_length = prefix.shape[0]
    embeds = torch.cat([prefix.expand(rows, -1, -1), local.get_input_embeddings()(input_ids)], dim=1)
    full_mask = torch.cat([torch.ones(rows, prefix_length, dtype=mask.dtype), mask], dim=1)
    positions = torch.cat([torch.arange(prefix_length).expand(rows, -1), positions_from_mask(mask.bool()) + prefix_length], dim=1)
    hooks = []
    if deep is not None:
        for index, layer in enumerate(local.model.layers):

            def add_prompt(module, args, kwargs, index=index):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                hidden = torch.cat([hidden[:, :prefix_length] + deep[index], hidden[:, prefix_length:]], dim=1)
                return (hidden, *args[1:]), kwargs

            hooks.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        return local(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions).logits[:, prefix_length:].contiguous()
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_gradients_equal_local_reference(path, swarm, local, mode):
    model = connect(path, swarm, tuning_mode=mode, pre_seq_len=3)
    prompts = model.prompts
    generator = torch.Generator().manual_seed(0)  # the same prompts whatever ran before in this process
    with torch.no_grad():  # not the zero init: a deep prompt that changes something
        prompts.prefix.normal_(0, 0.5, generator=generator)
        if prompts.deep is not None:
            prompts.deep.normal_(0, 0.5, generator=generator)
    input_ids, mask = batch(local.config.vocab_size, seed=1)
    labels = labels_for(input_ids, mask)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()

    prefix = prompts.prefix.detach().clone().requires_grad_()
    deep = None if prompts.deep is None else prompts.deep.detach().clone().requires_grad_()
    logits = local_prompted(local, input_ids, mask, prefix, deep)
    loss = local.loss_function(logits=logits, labels=labels, vocab_size=local.config.vocab_size)
    loss.backward()

    assert (out.logits - logits)[mask.bool()].abs().max().item() <= 1e-4  # a pad's output is arbitrary
    assert relative_error(prompts.prefix.grad, prefix.grad) <= 1e-4
    if deep is not None:
        assert relative_error(prompts.deep.grad, deep.grad) <= 1e-4
        assert (deep.grad[-1].abs().sum() > 0) and (deep.grad[0].abs().sum() > 0)  # every server sent its part
    assert [name for name, p in model.named_parameters() if p.requires_grad] == (
        ["prompts.prefix"] + (["prompts.deep"] if deep is not None else [])
    )

    # generation with the trained prompts gives the reference's greedy tokens
    prompt = input_ids[1:, :6]
    expected, ends = prompt, local.generation_config.eos_token_id
    for _ in range(4):
        with torch.no_grad():
            logits = local_prompted(local, expected, torch.ones_like(expected), prefix.detach(), None if deep is None else deep.detach())
        expected = torch.cat([expected, logits[:, -1:].argmax(-1)], dim=1)
        if expected[0, -1].item() in (ends if isinstance(ends, list) else [ends]):
            break  # as generate stops
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), expected)
    model.sequence.close()


def test_sequence_classification_equals_transformers(path, swarm):
    model = connect(path, swarm, cls=AutoDistributedModelForSequenceClassification, num_labels=3)
    local = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, dtype=torch.float32).eval()
    local.score.weight.data.copy_(model.score.weight.data)
    input_ids, mask = batch(local.config.vocab_size, seed=2)
    input_ids[1, -2:] = local.config.pad_token_id  # a right-padded row: the head reads its last real token
    mask[1, -2:] = 0
    labels = torch.tensor([0, 2])

    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    expected = local(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask.bool()), labels=labels)
    expected.loss.backward()
    assert out.logits.shape == (2, 3)
    assert (out.logits - expected.logits).abs().max().item() <= 1e-4
    assert relative_error(model.score.weight.grad, local.score.weight.grad) <= 1e-4
    model.sequence.close()


def test_a_backward_whose_server_died_is_computed_by_a_chain_of_two_as_it_would_have_been(checkpoints):
    """The server a forward went through for blocks 2:4 is killed before the backward; two others (2:3 and 3:4) take
    its part, the first recomputing the activations between them as a training forward does: with torch's own products,
    not the packed ones of inference (models/packed.py; they round differently at this width). The gradients (of deep
    prompts, each block's from the server that ran it) are those of the same backward when no server failed, and
    transformers'."""
    path = checkpoints("llama", num_layers=4, hidden_size=256, intermediate_size=512)
    # 2:3 and 3:4 announce a speed far below what 2:4 measures: the forward takes 2:4, with any jitter
    swarm = start_swarm(path, ["0:2", "2:4", "2:3", "3:4"], options={"2:3": SLOW, "3:4": SLOW})
    try:
        model = connect(path, swarm, tuning_mode="deep_ptune", pre_seq_len=3)
        prompts = model.prompts
        with torch.no_grad():
            prompts.prefix.normal_(0, 0.5)
            prompts.deep.normal_(0, 0.5)
        input_ids, mask = batch(model.config.vocab_size, seed=5)
        labels, grads = labels_for(input_ids, mask), []
        for kill in (False, True):
            model.zero_grad()
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            used = model.sequence.last_hops[-1]
            assert (used.blocks.start, used.blocks.end) == (2, 4)
            if kill:
                server_with_peer(swarm.servers, used.peer).signal(signal.SIGKILL)
            loss.backward()
            grads.append((prompts.prefix.grad.clone(), prompts.deep.grad.clone()))
        assert all(relative_error(after, before) <= 1e-7 for before, after in zip(*grads))
        assert used.peer in model.sequence.banned()
        model.sequence.close()

        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prefix, deep = (p.detach().clone().requires_grad_() for p in (prompts.prefix, prompts.deep))
        logits = local_prompted(local, input_ids, mask, prefix, deep)
        local.loss_function(logits=logits, labels=labels, vocab_size=local.config.vocab_size).backward()
        assert relative_error(grads[1][0], prefix.grad) <= 1e-4 and relative_error(grads[1][1], deep.grad) <= 1e-4
    finally:
        swarm.stop()


def test_backward_recomputed_block_by_block_equals_the_whole_graphs(path):
    """A backward whose forward graph was not kept recomputes one block at a time (its memory is one block's
    activations); its gradients w.r.t. hidden states, deep prompts and LoRA weights equal those of the whole graph."""
    from meadow.server.tuning import TuningInputs
    from meadow.wire import BlockRange, LoraEntry
    from local_sequence import LocalSequence

    span = LocalSequence(path).span
    blocks, hidden_size = BlockRange(start=1, end=4), span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    hidden, grad_output = torch.randn(2, 5, hidden_size, generator=generator), torch.randn(2, 5, hidden_size, generator=generator)
    position_ids, key_mask = torch.arange(5).repeat(2, 1), torch.tensor([[True] * 5, [False, False, True, True, True]])
    entries = tuple(LoraEntry(block=b, module="q_proj", rank=2, scale=0.5) for b in (1, 3))
    tuning = TuningInputs(blocks, torch.randn(3, 2, hidden_size, generator=generator),
                          torch.randn(2 * 2 * 2 * hidden_size, generator=generator), entries)  # fmt: skip
    by_block = span.backward(hidden, position_ids, key_mask, blocks, grad_output, tuning)
    graph = span._graph(hidden, position_ids, key_mask, blocks, tuning)
    whole = torch.autograd.grad(graph.output, graph.leaves, grad_output)
    assert len(by_block) == 3 and all(g.abs().sum() > 0 for g in by_block)
    assert all(relative_error(got, expected) <= 1e-5 for got, expected in zip(by_block, whole))
