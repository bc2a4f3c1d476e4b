"""Framing and strict deserialization: large tensors survive the 4 MiB cap, malformed bytes are refused clearly."""

import asyncio

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from meadow.wire import BadRequest, BlockRange, ForwardRequest, deserialize, pack, serialize, unpack
from meadow.wire.tensors import MAX_MESSAGE_BYTES


def read(messages, max_bytes=2**30):
    async def stream():
        for message in messages:
            yield message

    return asyncio.run(unpack(stream(), max_bytes))


def test_round_trip_of_every_dtype_and_large_tensors():
    tensors = [
        torch.randn(3, 700, 1000),  # 8.4 MB: must be split under the message cap
        torch.arange(7),
        torch.tensor([[True, False]]),
        torch.randn(5, 4).to(torch.bfloat16),
        torch.randn(2, 2).half(),
        torch.zeros(0, 3),
    ]
    messages = pack(tensors, {"x": 1}, runtime_pb2.ExpertRequest)
    assert len(messages) > 1 and all(m.ByteSize() < 4 * 1024 * 1024 for m in messages)
    assert all(sum(len(t.buffer) for t in m.tensors) <= MAX_MESSAGE_BYTES for m in messages)
    received, meta = read(messages)
    assert meta == {"x": 1}
    for sent, got in zip(tensors, received, strict=True):
        assert sent.dtype == got.dtype and torch.equal(sent, got)


def test_bfloat16_travels_as_two_bytes():
    assert len(serialize(torch.zeros(10, dtype=torch.bfloat16)).buffer) == 20


@pytest.mark.parametrize(
    "proto, message",
    [
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[2], dtype="complex64"), "unsupported tensor dtype"),
        (runtime_pb2.Tensor(buffer=b"\0" * 7, size=[2], dtype="float32"), "needs 8 bytes, got 7"),
        (runtime_pb2.Tensor(buffer=b"\0" * 8, size=[2], dtype="float32", compression=1), "compressed"),
    ],
)
def test_malformed_tensors_are_refused(proto, message):
    with pytest.raises(BadRequest, match=message):
        deserialize(proto)


def test_garbage_header_truncated_stream_and_oversize_are_refused():
    with pytest.raises(BadRequest, match="malformed message header"):
        read([runtime_pb2.ExpertRequest(metadata=b"\xff\x00garbage")])
    messages = pack([torch.randn(1000, 1000)], {}, runtime_pb2.ExpertRequest)
    with pytest.raises(BadRequest, match="ended in the middle"):
        read(messages[:-1])
    with pytest.raises(BadRequest, match="larger than this server accepts"):
        read(messages, max_bytes=1000)
    extra = runtime_pb2.ExpertRequest(
        metadata=msgpack.packb({"meta": {}, "tensors": 1}), tensors=[serialize(torch.ones(1)), serialize(torch.ones(1))]
    )
    with pytest.raises(BadRequest, match="more tensor parts"):
        read([extra])


def test_schemas_validate_and_ignore_unknown_fields():
    request = ForwardRequest.from_wire({"blocks": {"start": 1, "end": 3}, "from_the_future": 7})
    assert request.blocks == BlockRange(start=1, end=3)
    for bad in ({"blocks": {"start": 3, "end": 1}}, {"blocks": {"start": -1, "end": 1}}, {"blocks": "0:1"}, {}):
        with pytest.raises(BadRequest):
            ForwardRequest.from_wire(bad)
