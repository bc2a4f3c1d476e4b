"""Speculative decoding through a real swarm: the client drafts tokens (transformers' prompt lookup, or a small local
assistant model), the servers score them in one pass and rewind their KV caches past the rejected ones. Greedy tokens
stay those of plain greedy decoding, with spot-checks and pushes on, and across a killed server."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import server_with_peer, start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.client import transport
from meadow.client.config import ClientConfig
from meadow.client.event_loop import run
from meadow.client.model import GenerationSession
from meadow.wire import OpenSession, RemoteError, Step
from test_failover import AfterTokens

PROMPT = torch.tensor([[1, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])  # repeats: prompt lookup finds drafts
NEW_TOKENS = 24
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)  # no early end-of-sequence


@pytest.fixture(scope="module")
def model_path(checkpoints):
    return checkpoints("llama", num_layers=6)


@pytest.fixture(scope="module")
def local(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def assistant(model_path):
    """A draft model the client runs itself: the same checkpoint cut to its first 2 blocks (drafts often wrong)."""
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, num_hidden_layers=2).eval()


@pytest.fixture(scope="module")
def reference(local):
    return local.generate(PROMPT, **GREEDY)


@pytest.fixture(scope="module")
def swarm(model_path):
    swarm = start_swarm(model_path, ["0:3", "3:6", "3:6"])  # two servers for 3:6: spot-checks and failover
    yield swarm
    swarm.stop()


@pytest.fixture(scope="module")
def model(model_path, swarm):
    # every step spot-checked: a history not cut right at a rewind fails its check
    config = ClientConfig(verify=1.0, step_timeout=3.0)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(model_path), swarm.initial_peers, client_config=config)
    yield model
    model.close()


def generate_counting(model, **kwargs) -> tuple[torch.Tensor, GenerationSession]:
    """Greedy generation in a session of its own, returned too: it counts the steps sent and the tokens rewound."""
    # prompt lookup may draft past the generation's max_length: room for that
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS + kwargs.get("prompt_lookup_num_tokens", 0)) as session:
        return model.generate(PROMPT, **GREEDY, **kwargs), session


def test_prompt_lookup_gives_the_greedy_tokens_with_drafts_accepted_and_rejected(model, reference):
    got, plain = generate_counting(model)
    assert torch.equal(got, reference) and plain.steps == NEW_TOKENS and plain.dropped == 0
    checked = model.sequence.checker.checked
    got, speculative = generate_counting(model, prompt_lookup_num_tokens=3)
    assert torch.equal(got, reference)
    assert speculative.dropped > 0  # some drafts were rejected and rolled back...
    assert speculative.steps < NEW_TOKENS  # ...and some accepted: fewer passes over the swarm than one per token
    # every step's spot-check (blocks 3:6 have a witness) recomputed the segment's history, cut at each rewind, and
    # found the outputs kept for it right
    assert model.sequence.checker.checked - checked >= speculative.steps
    assert not model.sequence.banned()


def test_assistant_model_gives_the_greedy_tokens(model, assistant, reference):
    got, session = generate_counting(model, assistant_model=assistant)
    assert torch.equal(got, reference)
    assert session.dropped > 0 and session.steps < NEW_TOKENS
    assert not model.sequence.banned()


def test_speculative_sampling_matches_transformers_with_a_seed(model, local, assistant):
    """Sampling keeps transformers' speculative acceptance rule: with the same seed, the same tokens."""
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, assistant_model=assistant)
    torch.manual_seed(7)
    expected = local.generate(PROMPT, **settings)
    torch.manual_seed(7)
    assert torch.equal(model.generate(PROMPT, **settings), expected)


def test_a_chat_session_continues_after_speculative_turns(model, local):
    with model.inference_session(max_length=64):
        first = model.generate(PROMPT, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=4)
        second = model.generate(torch.cat([first, PROMPT[:, 1:6]], dim=1), max_new_tokens=8, do_sample=False)
    assert torch.equal(second, local.generate(torch.cat([first, PROMPT[:, 1:6]], dim=1), max_new_tokens=8, do_sample=False))


def test_rewinding_beyond_the_history_is_refused_clearly(model, model_path, swarm, reference):
    with model.inference_session(max_length=32) as session:
        model(PROMPT)
        with pytest.raises(ValueError, match="cannot rewind to position 15"):
            session.rewind(PROMPT.shape[1] + 1)
    # a raw step that skips ahead of what the server holds gets a clear error; the server stays up
    peer = model.sequence.make_chain()[0].peer

    async def skip_ahead():
        stream = transport.InferenceStream(model.sequence.p2p, peer)
        await stream.open(OpenSession(blocks=model.sequence.make_chain()[0].blocks, max_length=8, batch_size=1), 30)
        try:
            hidden = torch.randn(1, 2, model.config.hidden_size)
            inputs = [hidden, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)]
            await stream.step(inputs, 30, Step(position=0).to_wire())
            await stream.step(inputs, 30, Step(position=5).to_wire())
        finally:
            await stream.close()

    with pytest.raises(RemoteError, match="session holds 2 tokens: a step may rewind to an earlier position, never skip"):
        run(skip_ahead())
    assert torch.equal(model.generate(PROMPT, **GREEDY), reference)


def test_greedy_speculation_survives_a_killed_server(model, swarm, reference):
    """Failover replays exactly the accepted history. Last in this module: it kills one of the swarm's servers."""

    def kill_current_server():
        peer = next(s.hop.peer for s in model.session.remote.segments if s.hop.blocks.start == 3)
        server_with_peer(swarm.servers, peer).signal(signal.SIGKILL)

    streamer = AfterTokens({4: kill_current_server})
    got = model.generate(PROMPT, **GREEDY, prompt_lookup_num_tokens=3, streamer=streamer)
    assert streamer.seen >= 4  # the server was killed mid-generation
    assert torch.equal(got, reference)
