"""Tensors on the wire: strict (de)serialization and framing of large messages into parts.

hivemind's `runtime_pb2.Tensor` is the container and `split_for_streaming` cuts big buffers into chunks.
We serialize ourselves because hivemind's default sends bfloat16 as float32 (twice the bytes) and its
deserializer trusts the sender: here every field is checked, since a server reads bytes from strangers.
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator, Sequence, TypeVar

import msgpack
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from meadow.wire.errors import BadRequest

# hivemind caps one message at 4 MiB; stay well below it.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
MIN_CHUNK_BYTES = 64 * 1024  # fewer bytes a part (but the last) would let a sender make us keep millions of parts

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

Message = TypeVar("Message", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype not in _DTYPE_NAMES:
        raise TypeError(f"cannot send dtype {tensor.dtype}; supported: {', '.join(DTYPES)}")
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    return runtime_pb2.Tensor(
        buffer=raw.numpy().tobytes(), size=tensor.shape, dtype=_DTYPE_NAMES[tensor.dtype], chunks=1
    )


def deserialize(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """Rebuild a tensor, raising BadRequest for anything malformed (unknown dtype, wrong byte count)."""
    dtype = DTYPES.get(proto.dtype)
    if dtype is None:
        raise BadRequest(f"unsupported tensor dtype {proto.dtype!r}; supported: {', '.join(DTYPES)}")
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise BadRequest("compressed tensors are not supported")
    shape = torch.Size(proto.size)
    expected = shape.numel() * dtype.itemsize
    if len(proto.buffer) != expected:
        raise BadRequest(f"tensor of shape {tuple(shape)} and dtype {proto.dtype} needs {expected} bytes, got {len(proto.buffer)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(proto.buffer), dtype=dtype).reshape(shape)


def pack(tensors: Sequence[torch.Tensor], meta: dict, message_type: type[Message]) -> list[Message]:
    """One logical message -> protobuf messages under hivemind's size cap. The first carries `meta`."""
    parts: list[runtime_pb2.Tensor] = []
    for tensor in tensors:
        proto = serialize(tensor)
        parts.extend([proto] if len(proto.buffer) <= CHUNK_BYTES else split_for_streaming(proto, CHUNK_BYTES))
    envelope = msgpack.packb({"meta": meta, "tensors": len(tensors)})
    messages, batch, size = [], [], 0
    for part in parts:
        if batch and size + len(part.buffer) > MAX_MESSAGE_BYTES:
            messages.append(batch)
            batch, size = [], 0
        batch.append(part)
        size += len(part.buffer)
    messages.append(batch)
    return [message_type(tensors=batch, metadata=envelope if i == 0 else b"") for i, batch in enumerate(messages)]


async def unpack(stream: AsyncIterator[Message], max_bytes: int) -> tuple[list[torch.Tensor], dict] | None:
    """Read one logical message from a stream; None if the stream ended cleanly before it began."""
    first = await anext(stream, None)
    if first is None:
        return None
    try:
        envelope = msgpack.unpackb(first.metadata)
        meta, num_tensors = envelope["meta"], int(envelope["tensors"])
        if not isinstance(meta, dict):
            raise TypeError("meta is not a map")
    except Exception as e:
        raise BadRequest(f"malformed message header: {e}") from None
    if not 0 <= num_tensors <= 16:
        raise BadRequest(f"a message may hold at most 16 tensors, got {num_tensors}")

    tensors, chunks, remaining, total = [], [], 0, 0
    message = first
    while True:
        for part in message.tensors:
            total += len(part.buffer)
            if total > max_bytes:
                raise BadRequest(f"request is larger than this server accepts ({max_bytes} bytes)")
            if remaining == 0:  # this part opens a new tensor
                if len(tensors) == num_tensors:
                    raise BadRequest("message holds more tensor parts than its header announced")
                _check_declared(part, max_bytes)
                chunks, remaining = [part], max(part.chunks, 1)
            else:
                chunks.append(part)
            remaining -= 1
            if remaining == 0:
                if sum(len(chunk.buffer) for chunk in chunks) <= CHUNK_BYTES:
                    tensors.append(_joined(chunks))
                else:  # copying many megabytes takes a while: not on the event loop, which serves everyone
                    tensors.append(await asyncio.to_thread(_joined, chunks))
        if len(tensors) == num_tensors and remaining == 0:
            return tensors, meta
        message = await anext(stream, None)
        if message is None:
            raise BadRequest("stream ended in the middle of a message")
        if not message.tensors:
            raise BadRequest("a message part without tensors in the middle of a message")


def _joined(chunks: list[runtime_pb2.Tensor]) -> torch.Tensor:
    """The tensor whose parts are `chunks` (the first carries its dtype and shape)."""
    whole = runtime_pb2.Tensor()
    whole.CopyFrom(chunks[0])
    whole.buffer = b"".join(chunk.buffer for chunk in chunks)
    return deserialize(whole)


def _check_declared(part: runtime_pb2.Tensor, max_bytes: int) -> None:
    """Refuse a tensor by what its first part declares (dtype, shape, number of parts), before reading the rest."""
    dtype = DTYPES.get(part.dtype)
    if dtype is None:
        raise BadRequest(f"unsupported tensor dtype {part.dtype!r}; supported: {', '.join(DTYPES)}")
    if len(part.size) > 8 or any(size < 0 for size in part.size):
        raise BadRequest(f"tensor shape {tuple(part.size)} is not a shape of at most 8 dimensions")
    declared = math.prod(part.size) * dtype.itemsize
    if declared > max_bytes:
        raise BadRequest(f"a tensor of shape {tuple(part.size)} and dtype {part.dtype} is larger than this server accepts "
                         f"({max_bytes} bytes)")  # fmt: skip
    if part.chunks > declared // MIN_CHUNK_BYTES + 1:
        raise BadRequest(f"a tensor of {declared} bytes in {part.chunks} parts: parts must hold {MIN_CHUNK_BYTES} bytes or more")
