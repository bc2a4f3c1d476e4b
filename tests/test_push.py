"""Decoding steps pushed from server to server: the next server of a chain gets its input without the client."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from conftest import start_swarm
from meadow.client import transport
from meadow.client.config import ClientConfig
from meadow.client.event_loop import run
from meadow.client.sequence import connect_sequence
from meadow.models import load_config
from meadow.wire import RPC_PUSH, OpenSession, Push, PushTarget, RemoteError, Step, pack

HIDDEN = 64


@pytest.fixture(scope="module")
def chain(checkpoints):
    path = checkpoints("llama", num_layers=4)
    swarm = start_swarm(path, ["0:2", "2:4"])
    sequence = connect_sequence(str(path), load_config(path), swarm.initial_peers, client_config=ClientConfig())
    try:
        yield sequence, sequence.make_chain()
    finally:
        sequence.close()
        swarm.stop()


def step_inputs(position: int):
    generator = torch.Generator().manual_seed(position)
    return [torch.randn(1, 1, HIDDEN, generator=generator), torch.tensor([[position]]), torch.ones(1, 1, dtype=torch.bool)]


def test_the_next_server_answers_a_pushed_step_the_client_never_sent_it(chain):
    sequence, (first, second) = chain

    async def scenario():
        streams = [transport.InferenceStream(sequence.p2p, hop.peer) for hop in (first, second)]
        ids = ["first-session", "second-session"]
        for stream, hop, session_id in zip(streams, (first, second), ids):
            await stream.open(OpenSession(blocks=hop.blocks, max_length=8, batch_size=1, session_id=session_id), 30)
        try:
            outputs = []
            for position in range(3):
                target = PushTarget(peer=second.peer.to_base58(), session_id=ids[1])
                middle = await streams[0].step(step_inputs(position), 30, Step(position=position, push_to=[target]).to_wire())
                # the second server computed this step from the push: its reply is there though we sent nothing
                pushed = await streams[1].output(10)
                outputs.append((middle, pushed))
            # the client's own copy of the last step (resent: the push seemed late) is recognised as served: no second
            # reply, no error
            copy = [outputs[-1][0], torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.bool)]
            streams[1]._send(copy, Step(position=2, resent=True).to_wire())
            assert await streams[1].pushed_output(1.0) is None
            return outputs
        finally:
            for stream in streams:
                await stream.close()

    outputs = run(scenario())
    # the same steps sent by the client alone give the same outputs
    with sequence.inference_session(max_length=8, batch_size=1) as session:
        for position, (_, pushed) in enumerate(outputs):
            hidden, positions, mask = step_inputs(position)
            assert torch.allclose(session.step(hidden, positions, mask), pushed, atol=1e-5)


def test_a_push_to_an_unknown_session_is_refused_and_harms_nothing(chain):
    sequence, (first, second) = chain
    meta = Push(session_id="nobody-has-this", position=0).to_wire()
    (message,) = pack(step_inputs(0), meta, runtime_pb2.ExpertRequest)
    garbage = runtime_pb2.ExpertRequest(metadata=b"\x93garbage")
    # both on one push stream, as a server sends its pushes: each refused with its own error, the stream going on
    replies = run(push_replies(sequence.p2p, second.peer, [message, garbage]))
    with pytest.raises(RemoteError, match="no session with this id"):
        run(transport.read_reply(_one(replies[0]), second.peer, 10))
    with pytest.raises(RemoteError, match="malformed message header"):
        run(transport.read_reply(_one(replies[1]), second.peer, 10))
    with sequence.inference_session(max_length=4, batch_size=1) as session:  # still serving
        assert session.step(*step_inputs(0)).shape == (1, 1, HIDDEN)


def test_a_push_that_does_not_fit_its_session_is_refused_and_the_session_goes_on(chain):
    sequence, (_, second) = chain
    hidden, positions, mask = step_inputs(0)
    wide = [hidden.repeat(2, 1, 1), positions.repeat(2, 1), mask.repeat(2, 1)]
    long = [torch.randn(1, 5, HIDDEN), torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool)]
    bad = [
        (wide, 0, "session was opened for batch size 1"),
        (long, 0, "decoding steps of at most 4"),
        (step_inputs(0), 127, "exceeds the session's max_length 127"),
        (step_inputs(0), 90, "over 64 tokens past the session's 0"),
    ]

    async def session_steps(session_id: str, before=None) -> list[torch.Tensor]:
        stream = transport.InferenceStream(sequence.p2p, second.peer)
        await stream.open(OpenSession(blocks=second.blocks, max_length=127, batch_size=1, session_id=session_id), 30)
        try:
            await (before() if before else asyncio.sleep(0))
            return [await stream.step(step_inputs(position), 30, Step(position=position).to_wire()) for position in range(3)]
        finally:
            await stream.close()

    errors = []

    async def bad_pushes():
        for tensors, position, _ in bad:
            (message,) = pack(tensors, Push(session_id="victim-session", position=position).to_wire(), runtime_pb2.ExpertRequest)
            (reply,) = await push_replies(sequence.p2p, second.peer, [message])
            try:
                await transport.read_reply(_one(reply), second.peer, 10)
            except RemoteError as e:
                errors.append(str(e))

    outputs = run(session_steps("victim-session", bad_pushes))
    assert len(errors) == len(bad) and all(message in error for error, (_, _, message) in zip(errors, bad)), errors
    untouched = run(session_steps("another-session"))  # the victim's session went on as if nothing had come
    assert all(torch.allclose(got, expected, atol=1e-5) for got, expected in zip(outputs, untouched))


async def _one(message):
    yield message


async def push_replies(p2p, peer, messages: list) -> list:
    """Send `messages` on one push stream, as a server does, and return the replies (only refusals get one)."""
    replies = await p2p.iterate_protobuf_handler(peer, RPC_PUSH, _many(messages), runtime_pb2.ExpertResponse)
    return [reply async for reply in replies]


async def _many(messages: list):
    for message in messages:
        yield message
