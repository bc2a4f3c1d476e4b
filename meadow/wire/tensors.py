"""Tensors on the wire: strict (de)serialization, wire formats, and framing of large messages into parts.

hivemind's `runtime_pb2.Tensor` is the container and `split_for_streaming` cuts big buffers into chunks.
We serialize ourselves because hivemind's default sends bfloat16 as float32 (twice the bytes) and its
deserializer trusts the sender: here every field is checked, since a server reads bytes from strangers.

Wire formats (schemas.WIRE_FORMATS) apply to hidden states and their gradients only. float32/float16/bfloat16: the
tensor travels cast to that dtype, and the receiver gets it in that dtype. blockwise8: a tensor of at least
BLOCKWISE_MIN_VALUES values travels as hivemind's BlockwiseQuantization (bitsandbytes' dynamic 8-bit code, one
absmax per block of 4096 values) and is decoded to the dtype it was sent from; a smaller one travels as bfloat16.
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator, Sequence, TypeVar

import msgpack
import numpy as np
import torch
from hivemind.compression import BlockwiseQuantization, CompressionInfo
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from meadow.wire.errors import BadRequest
from meadow.wire.schemas import check_wire_format

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
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# blockwise8 quantizes tensors of at least this many values. Below ~1000 values its fixed cost (a 256-entry float32
# codebook, 1 KiB, and a header) makes it bigger than bfloat16; at 16384 values (4 blocks) that cost is 6% of the
# payload, the 16 KiB saved over bfloat16 take over 1 ms at 100 Mbit/s, and (de)quantizing takes ~0.15 ms on a CPU
# core. A decoding step (batch x hidden values) stays 16-bit; prefills, forward and backward passes are quantized.
BLOCKWISE_MIN_VALUES = 16384
BLOCK_SIZE = 4096  # hivemind's BlockwiseQuantization block (one float32 absmax per block)
CODEBOOK_SIZE = 256
TRAVEL_DTYPES = {  # the dtype a float tensor travels in, by wire format (blockwise8: when too small to quantize)
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "blockwise8": torch.bfloat16,
}  # fmt: skip

Message = TypeVar("Message", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def serialize(tensor: torch.Tensor, wire: str | None = None) -> runtime_pb2.Tensor:
    """A tensor as a protobuf message; a float tensor in the `wire` format if one is given (else as it is).
    BadRequest if its values do not fit the format (beyond float16's range)."""
    tensor = tensor.detach().cpu()
    if wire is not None and tensor.dtype in FLOAT_DTYPES:
        check_wire_format(wire)
        if wire == "blockwise8" and tensor.numel() >= BLOCKWISE_MIN_VALUES:
            try:
                return BlockwiseQuantization().compress(tensor, CompressionInfo.from_tensor(tensor))
            except ImportError as e:
                raise BadRequest(f"this peer cannot encode the blockwise8 wire format ({e}); use another") from e
        travel = TRAVEL_DTYPES[wire]
        too_big = tensor.numel() and tensor.dtype != travel and tensor.abs().max() > torch.finfo(travel).max
        if travel == torch.float16 and too_big:
            raise BadRequest("hidden states exceed float16's range (65504): use the bfloat16 or float32 wire format")
        tensor = tensor.to(travel)
    tensor = tensor.contiguous()
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
    if any(size < 0 for size in proto.size):
        raise BadRequest(f"negative tensor size {tuple(proto.size)}")
    shape = torch.Size(proto.size)
    if proto.compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT:
        return _dequantize_blockwise(proto, shape, dtype)
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise BadRequest("of compressed tensors, only 8-bit blockwise ones (wire format blockwise8) are supported")
    expected = shape.numel() * dtype.itemsize
    if len(proto.buffer) != expected:
        raise BadRequest(f"tensor of shape {tuple(shape)} and dtype {proto.dtype} needs {expected} bytes, got {len(proto.buffer)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(proto.buffer), dtype=dtype).reshape(shape)


def _dequantize_blockwise(proto: runtime_pb2.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """hivemind's BlockwiseQuantization layout: int64 absmax count, int64 codebook size, float32 absmax, float32
    codebook, one uint8 code per value. Every size is checked against `shape` before anything is allocated (hivemind's
    own `extract` trusts them, and fails on numpy 2)."""
    if dtype not in FLOAT_DTYPES:
        raise BadRequest(f"an 8-bit blockwise tensor must decode to a float dtype, not {proto.dtype}")
    numel, buffer = shape.numel(), proto.buffer
    blocks = -(-numel // BLOCK_SIZE)
    expected = 16 + 4 * (blocks + CODEBOOK_SIZE) + numel
    if numel == 0 or len(buffer) != expected:
        raise BadRequest(f"an 8-bit blockwise tensor of shape {tuple(shape)} needs {expected} bytes, got {len(buffer)}")
    header = tuple(int(n) for n in np.frombuffer(buffer, dtype=np.int64, count=2))
    if header != (blocks, CODEBOOK_SIZE):
        raise BadRequest(f"an 8-bit blockwise tensor of shape {tuple(shape)} needs {blocks} absmax values and a "
                         f"{CODEBOOK_SIZE}-entry codebook; its header says {header}")  # fmt: skip
    scales = torch.frombuffer(bytearray(buffer[16 : expected - numel]), dtype=torch.float32)
    if not torch.isfinite(scales).all():
        raise BadRequest("an 8-bit blockwise tensor's absmax or codebook holds NaN or infinity")
    codes = torch.frombuffer(bytearray(buffer[expected - numel :]), dtype=torch.uint8).reshape(shape)
    try:
        from bitsandbytes.functional import dequantize_blockwise
    except Exception as e:  # not installed, or its native library fails to load
        raise BadRequest(f"this peer cannot decode the blockwise8 wire format (bitsandbytes: {e}); use another") from e
    absmax, codebook = scales[:blocks], scales[blocks:]
    values = dequantize_blockwise(codes, absmax=absmax, code=codebook, blocksize=BLOCK_SIZE, nested=False)
    return values.to(dtype)


def pack(
    tensors: Sequence[torch.Tensor],
    meta: dict,
    message_type: type[Message],
    wire: str | None = None,
    activations: Sequence[int] = (0,),
) -> list[Message]:
    """One logical message -> protobuf messages under hivemind's size cap. The first carries `meta`. The tensors at
    indices `activations` (hidden states, their gradients) travel in the `wire` format; the others as they are."""
    encoded = {index % len(tensors) for index in activations} if tensors else set()
    parts: list[runtime_pb2.Tensor] = []
    for index, tensor in enumerate(tensors):
        proto = serialize(tensor, wire if index in encoded else None)
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


async def drain_requests(requests: AsyncIterator, timeout: float = 5.0) -> None:
    """Let the client close the stream first. We read what it still sends (its end-of-stream marker at least), then
    wait for it to close, which makes hivemind cancel this handler. Closing first resets the stream, and the client
    may lose our reply unread: "server closed the stream" or BrokenPipeError, about once in 300 calls, seen here."""

    async def consume_then_wait():
        async for _ in requests:
            pass
        await asyncio.sleep(timeout)  # cancelled as soon as the client closes

    try:
        await asyncio.wait_for(consume_then_wait(), timeout)
    except Exception:
        pass  # a client that never closes gets its stream closed after `timeout`
