"""A server refuses every kind of bad request with a clear error, stays up, and loses nothing for other clients."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from conftest import start_swarm
from meadow.client import transport
from meadow.client.config import ClientConfig
from meadow.client.routing import MissingBlocksError
from meadow.client.event_loop import run
from meadow.client.sequence import connect_sequence
from meadow.models import load_config
from meadow.wire import (
    RPC_BACKWARD,
    RPC_FORWARD,
    BackwardRequest,
    BlockRange,
    ForwardRequest,
    LoraEntry,
    OpenSession,
    RemoteError,
    Step,
    serialize,
)

HIDDEN = 64
SPAN = BlockRange(start=1, end=3)  # of a 4-block model: blocks 0 and 3 are served by nobody


@pytest.fixture(scope="module")
def served(checkpoints):
    path = checkpoints("llama", num_layers=4, hidden_size=HIDDEN)
    limits = ["--cache-tokens", "64", "--max-length", "48", "--max-batch-tokens", "256", "--idle-timeout", "3"]
    swarm = start_swarm(path, [str(SPAN)], *limits)
    config = ClientConfig(wait_for_servers=1.0, max_retries=0)
    sequence = connect_sequence(str(path), load_config(path), swarm.initial_peers, client_config=config)
    sequence.update_routes(force=True)
    (peer,) = sequence.servers
    try:
        yield sequence, peer, swarm
    finally:
        sequence.close()
        swarm.stop()


def inputs(batch=1, length=3, hidden=HIDDEN, dtype=torch.float32):
    return [
        torch.randn(batch, length, hidden).to(dtype),
        torch.arange(length).repeat(batch, 1),
        torch.ones(batch, length, dtype=torch.bool),
    ]


def forward(sequence, peer, tensors, blocks=SPAN):
    return run(transport.forward(sequence.p2p, peer, ForwardRequest(blocks=blocks), tensors, 30))


def assert_still_serving(sequence, peer):
    output = forward(sequence, peer, inputs())
    assert output.shape == (1, 3, HIDDEN) and torch.isfinite(output).all()


@pytest.mark.parametrize(
    "blocks, tensors, message",
    [
        (BlockRange(start=0, end=2), inputs(), "holds blocks 1:3"),
        (BlockRange(start=2, end=9), inputs(), "holds blocks 1:3"),
        (SPAN, inputs(hidden=HIDDEN + 1), "must have shape"),
        (SPAN, inputs()[:1] + [torch.randn(1, 3)] + inputs()[2:], "position_ids must be int64"),
        (SPAN, inputs()[:2], "expected 3 tensors"),
        (SPAN, [torch.ones(1, 3, HIDDEN, dtype=torch.int64)] + inputs()[1:], "must be float32"),
        (SPAN, inputs()[:2] + [torch.ones(1, 3)], "key_mask must be bool"),
        (SPAN, [torch.full((1, 3, HIDDEN), float("nan"))] + inputs()[1:], "NaN"),
        (SPAN, inputs(batch=4, length=100), "exceed this server's limit"),
    ],
)
def test_bad_forward_gets_a_clear_error(served, blocks, tensors, message):
    sequence, peer, _ = served
    with pytest.raises(RemoteError, match=message):
        forward(sequence, peer, tensors, blocks)
    assert_still_serving(sequence, peer)


def test_malformed_tensor_bytes_and_garbage_headers(served):
    sequence, peer, _ = served
    truncated = serialize(torch.randn(1, 3, HIDDEN))
    truncated.buffer = truncated.buffer[:-5]
    bad_messages = [
        runtime_pb2.ExpertRequest(metadata=msgpack.packb({"meta": ForwardRequest(blocks=SPAN).to_wire(), "tensors": 1}), tensors=[truncated]),
        runtime_pb2.ExpertRequest(metadata=b"\x93garbage\x00\xff"),
        runtime_pb2.ExpertRequest(metadata=msgpack.packb({"meta": {"blocks": "all"}, "tensors": 0})),
        runtime_pb2.ExpertRequest(metadata=msgpack.packb({"meta": {"blocks": {"start": 1, "end": 2}, "version": 999}, "tensors": 0})),
    ]
    for message, expected in zip(bad_messages, ["needs", "malformed message header", "invalid ForwardRequest", "protocol"]):
        async def call():
            responses = await sequence.p2p.iterate_protobuf_handler(peer, RPC_FORWARD, transport._iterate([message]), runtime_pb2.ExpertResponse)
            try:
                return await transport.read_reply(responses, peer, 30)
            finally:
                await responses.aclose()

        with pytest.raises(RemoteError, match=expected):
            run(call())
    assert_still_serving(sequence, peer)


def test_raw_garbage_bytes_on_the_stream(served):
    sequence, peer, _ = served

    async def send_garbage():
        _, reader, writer = await sequence.p2p.call_binary_stream_handler(peer, RPC_FORWARD)
        writer.write(b"\x07" + b"\xde\xad\xbe\xef" * 1000)
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.2)

    run(send_garbage())
    assert_still_serving(sequence, peer)


def test_session_limits_leave_other_sessions_intact(served):
    sequence, peer, _ = served

    async def open_session(max_length, batch_size=1):
        stream = transport.InferenceStream(sequence.p2p, peer)
        await stream.open(OpenSession(blocks=SPAN, max_length=max_length, batch_size=batch_size), 30)
        return stream

    first = run(open_session(40))
    reference = forward(sequence, peer, inputs(length=3))  # no cache: what the session must reproduce
    with pytest.raises(RemoteError, match="not enough KV cache"):
        run(open_session(40))  # 40 + 40 token slots > 64: more sessions than the cache holds
    with pytest.raises(RemoteError, match="exceeds this server's limit 48"):
        run(open_session(100))
    # the first session still works and its results are right
    torch.manual_seed(0)
    tensors = inputs(length=3)
    out = run(first.step(tensors, 30))
    assert (out - forward(sequence, peer, tensors)).abs().max() < 1e-5
    assert reference.shape == out.shape
    with pytest.raises(RemoteError, match="exceeds the session's max_length 40"):
        run(first.step(inputs(length=38), 30))
    run(first.close())
    second = run(open_session(48))  # 40 + 48 > 64: only if the closed session's slots are free again
    run(second.close())
    # a session that needs more than the server's limit is refused; one asked to grow past the limit, though its step
    # fits, grows to the limit and goes on, exactly, up to the limit
    with pytest.raises(RemoteError, match="the session needs 49 tokens, past this server's limit 48"):
        run(run(open_session(8)).step(inputs(length=49), 30, Step(max_length=100).to_wire()))
    grown = run(open_session(2))
    out = run(grown.step(tensors, 30, Step(max_length=100).to_wire()))
    assert (out - forward(sequence, peer, tensors)).abs().max() < 1e-5
    with pytest.raises(RemoteError, match="exceeds the session's max_length 48"):
        run(grown.step(inputs(length=46), 30, Step(position=3).to_wire()))
    assert_still_serving(sequence, peer)


def test_idle_session_is_closed_and_its_cache_freed(served):
    sequence, peer, _ = served

    async def open_and_wait():
        stream = transport.InferenceStream(sequence.p2p, peer)
        await stream.open(OpenSession(blocks=SPAN, max_length=40, batch_size=1), 30)
        await asyncio.sleep(4)  # the server's --idle-timeout is 3 s
        return stream

    stale = run(open_and_wait())
    with pytest.raises(RemoteError, match="idle"):
        run(stale.step(inputs(), 30))
    fresh = transport.InferenceStream(sequence.p2p, peer)
    run(fresh.open(OpenSession(blocks=SPAN, max_length=40, batch_size=1), 30))  # 40 + 40 > 64 slots: only if freed
    run(fresh.close())


def test_missing_blocks_are_named(served):
    sequence, _, _ = served
    with pytest.raises(MissingBlocksError, match=r"blocks 0:1, 3:4"):
        sequence.make_chain()


def call(sequence, peer, rpc, request, tensors):
    return run(transport.call(sequence.p2p, peer, rpc, request, tensors, 30))


def lora_entry(module="q_proj", block=1, rank=2):
    return LoraEntry(block=block, module=module, rank=rank, scale=1.0)


def q_proj_weights(rank=2):
    return torch.randn(rank * (HIDDEN + HIDDEN))  # A (rank, 64) and B (64, rank) of a 64-wide q_proj


@pytest.mark.parametrize(
    "fields, extra, message",
    [
        (dict(prompts=True), [torch.randn(1, 2, HIDDEN)], "deep prompts must have shape"),  # 1 block of 2 requested
        (dict(prompts=True), [torch.randn(2, 2, HIDDEN + 1)], "deep prompts must have shape"),
        (dict(prompts=True), [torch.ones(2, 2, HIDDEN, dtype=torch.int32)], "deep prompts must be float"),
        (dict(prompts=True), [torch.full((2, 2, HIDDEN), float("inf"))], "deep prompts contain NaN or infinity"),
        (dict(prompts=True), [torch.randn(2, 4, HIDDEN)], "deep prompts of 4 tokens for 3 tokens"),
        (dict(prompts=True), [], "expected 4 tensors"),
        (dict(lora=[lora_entry("w_proj")]), [q_proj_weights()], "unknown module 'w_proj'"),
        (dict(lora=[lora_entry(block=0)]), [q_proj_weights()], "outside the requested blocks"),
        (dict(lora=[lora_entry(), lora_entry()]), [torch.randn(2 * 2 * 128)], "two LoRA entries"),
        (dict(lora=[lora_entry()]), [torch.randn(7)], "one flat tensor of 256 values"),
        (dict(lora=[lora_entry()]), [torch.full((256,), float("nan"))], "LoRA weights contain NaN"),
        (dict(lora=[lora_entry(rank=100)]), [q_proj_weights(100)], "exceeds this server's limit"),
        (dict(adapter="not-here"), [], "adapter 'not-here' is not served here"),
    ],
)
def test_bad_tuning_gets_a_clear_error(served, fields, extra, message):
    sequence, peer, _ = served
    request = ForwardRequest(blocks=SPAN, **fields)
    with pytest.raises(RemoteError, match=message):
        call(sequence, peer, RPC_FORWARD, request, inputs() + extra)
    assert_still_serving(sequence, peer)


@pytest.mark.parametrize(
    "grad, message",
    [
        (torch.randn(1, 3, HIDDEN + 1), "grad_output must be a float tensor of shape"),
        (torch.ones(1, 3, HIDDEN, dtype=torch.int64), "grad_output must be a float tensor of shape"),
        (torch.full((1, 3, HIDDEN), float("nan")), "grad_output contains NaN"),
        (None, "expected 4 tensors"),
    ],
)
def test_bad_backward_gets_a_clear_error(served, grad, message):
    sequence, peer, _ = served
    tensors = inputs() + ([grad] if grad is not None else [])
    with pytest.raises(RemoteError, match=message):
        call(sequence, peer, RPC_BACKWARD, BackwardRequest(blocks=SPAN), tensors)
    assert_still_serving(sequence, peer)


def test_backward_returns_gradients_for_everything_sent(served):
    sequence, peer, _ = served
    request = BackwardRequest(blocks=SPAN, prompts=True, lora=[lora_entry()])
    prompts, weights = torch.randn(2, 2, HIDDEN), q_proj_weights()
    grads = call(sequence, peer, RPC_BACKWARD, request, inputs() + [prompts, weights, torch.randn(1, 3, HIDDEN)])
    assert [g.shape for g in grads] == [(1, 3, HIDDEN), prompts.shape, weights.shape]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    with pytest.raises(RemoteError, match="exceed this server's limit"):  # oversized batches are refused here too
        call(sequence, peer, RPC_BACKWARD, BackwardRequest(blocks=SPAN), inputs(4, 100) + [torch.randn(4, 100, HIDDEN)])
