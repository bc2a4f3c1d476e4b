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
from meadow.wire import RPC_FORWARD, BlockRange, ForwardRequest, OpenSession, RemoteError, pack, serialize

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
