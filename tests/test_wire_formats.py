"""Wire formats through a real 2-server swarm: float32 stays exact, each lossy format adds no more error than its
rounding explains, servers answer in the format asked for, and refuse an unknown format or a malformed 8-bit payload
clearly while serving on.

Error bounds, relative (||got - expected|| / ||expected||; logits per token, the input gradient as a whole): one
rounding to float16 moves a value by at most 2^-11 (4.9e-4) of itself, to bfloat16 by 2^-8 (3.9e-3); blockwise8 moves
Gaussian-like hidden states by under 2% per token (last test). Hidden states are rounded 3 times on the way through 2
servers (client -> server 1 -> client -> server 2 -> client; what the client sends to server 2 is what it got back),
gradients as often on the way back, and the blocks and head may amplify an error about 2x. Bounds: 3 roundings x 2:
float16 3e-3, bfloat16 2.5e-2, blockwise8 0.12. Measured here: logits 1.1e-3, 1.3e-2, 6.1e-2; gradient 7e-4, 6e-3,
4.4e-2 (the inputs are fixed and every format is deterministic, so these do not vary from run to run).
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from conftest import start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.client import transport
from meadow.client.config import ClientConfig
from meadow.client.event_loop import run
from meadow.wire import (
    RPC_FORWARD, BadRequest, BlockRange, ForwardRequest, RemoteError, default_wire, deserialize, serialize,
)  # fmt: skip
from meadow.wire.tensors import BLOCKWISE_MIN_VALUES

HIDDEN = 64
ROWS, LENGTH = 8, 32  # 8 x 32 x 64 = 16384 values: a forward big enough for blockwise8 to quantize
BOUNDS = {"float16": 3e-3, "bfloat16": 2.5e-2, "blockwise8": 0.12}


@pytest.fixture(scope="module")
def setup(checkpoints):
    path = checkpoints("llama", num_layers=4, hidden_size=HIDDEN)
    swarm = start_swarm(path, ["0:2", "2:4"])
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield model, local
        model.sequence.close()
    finally:
        swarm.stop()


def use_wire(model, wire: str | None) -> None:
    model.sequence.config = dataclasses.replace(model.sequence.config, wire=wire)


def per_token_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def logits_and_grad(model, input_ids):
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), embeds.grad


@pytest.fixture(scope="module")
def reference(setup):
    _, local = setup
    input_ids = torch.randint(0, local.config.vocab_size, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    return input_ids, logits_and_grad(local, input_ids)


def test_float32_wire_is_exact(setup, reference):
    model, _ = setup
    input_ids, (expected, expected_grad) = reference
    use_wire(model, "float32")
    logits, grad = logits_and_grad(model, input_ids)
    assert (logits - expected).abs().max() <= 1e-4
    assert ((grad - expected_grad).abs().max() / expected_grad.abs().max()) <= 1e-4


def test_default_wire_is_each_servers_dtype(setup):
    model, _ = setup
    use_wire(model, None)
    assert {model.sequence.wire_for(peer) for peer in model.sequence.servers} == {"float32"}  # float32 servers
    assert (default_wire("bfloat16"), default_wire("float16"), default_wire("float64")) == ("bfloat16", "float16", "float32")


@pytest.mark.parametrize("wire", list(BOUNDS))
def test_lossy_formats_add_bounded_error(setup, reference, wire):
    model, _ = setup
    input_ids, (expected, expected_grad) = reference
    use_wire(model, wire)
    logits, grad = logits_and_grad(model, input_ids)
    assert 0 < per_token_error(logits, expected) <= BOUNDS[wire]  # > 0: the format really was applied
    assert relative_error(grad, expected_grad) <= BOUNDS[wire]


def test_float16_wire_keeps_greedy_tokens(setup):
    model, local = setup
    prompt = torch.randint(0, local.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    use_wire(model, "float16")
    got = model.generate(prompt, max_new_tokens=12, do_sample=False)
    use_wire(model, "float32")
    assert torch.equal(got, model.generate(prompt, max_new_tokens=12, do_sample=False))
    assert torch.equal(got, local.generate(prompt, max_new_tokens=12, do_sample=False))


def raw_forward(model, meta: dict, tensors: list[runtime_pb2.Tensor]):
    """One rpc_forward of hand-made messages to the server of blocks 0:2; its reply's tensors."""
    sequence = model.sequence
    (peer,) = [peer for peer, info in sequence.servers.items() if info.start == 0]
    message = runtime_pb2.ExpertRequest(metadata=msgpack.packb({"meta": meta, "tensors": len(tensors)}), tensors=tensors)

    async def call():
        responses = await sequence.p2p.iterate_protobuf_handler(
            peer, RPC_FORWARD, transport._iterate([message]), runtime_pb2.ExpertResponse
        )
        try:
            return await transport.read_reply(responses, peer, 30)
        finally:
            await responses.aclose()

    return run(call())


def request(wire: str | None = "float32", hidden: torch.Tensor | None = None, **encoding):
    hidden = torch.randn(ROWS, LENGTH, HIDDEN) if hidden is None else hidden
    meta = ForwardRequest(blocks=BlockRange(start=0, end=2)).to_wire() | {"wire": wire}
    exact = [serialize(torch.arange(LENGTH).repeat(ROWS, 1)), serialize(torch.ones(ROWS, LENGTH, dtype=torch.bool))]
    return meta, [serialize(hidden, **encoding)] + exact


@pytest.mark.parametrize("wire, dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_servers_reply_in_the_requested_format(setup, wire, dtype):
    model, _ = setup
    (output,) = raw_forward(model, *request(wire))
    assert output.dtype == dtype and output.shape == (ROWS, LENGTH, HIDDEN)


def test_unknown_wire_format_is_refused_clearly(setup):
    model, _ = setup
    with pytest.raises(RemoteError, match="unknown wire format 'float8'") as caught:
        raw_forward(model, *request("float8"))
    assert caught.value.kind == "BadRequest"
    with pytest.raises(ValueError, match="unknown wire format"):
        ClientConfig(wire="float8")
    (output,) = raw_forward(model, *request())  # still serving
    assert torch.isfinite(output).all()


def blockwise(mutate) -> runtime_pb2.Tensor:
    proto = serialize(torch.randn(ROWS, LENGTH, HIDDEN), wire="blockwise8")
    assert proto.compression == runtime_pb2.BLOCKWISE_8BIT
    buffer = bytearray(proto.buffer)
    mutate(proto, buffer)
    proto.buffer = bytes(buffer)
    return proto


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda proto, buffer: buffer.pop(), "needs 17440 bytes, got 17439"),
        (lambda proto, buffer: proto.size.__setitem__(0, 2**20), "larger than this server accepts"),  # before reading it
        (lambda proto, buffer: buffer.__setitem__(0, 5), "header says \\(5, 256\\)"),
        (lambda proto, buffer: buffer.__setitem__(slice(16, 20), b"\xff\xff\xff\x7f"), "NaN"),
        (lambda proto, buffer: setattr(proto, "dtype", "int64"), "float dtype"),
    ],
)
def test_malformed_blockwise_payload_is_refused(setup, mutate, message):
    model, _ = setup
    meta, tensors = request()
    with pytest.raises(RemoteError, match=message):
        raw_forward(model, meta, [blockwise(mutate)] + tensors[1:])
    (output,) = raw_forward(model, meta, [blockwise(lambda proto, buffer: None)] + tensors[1:])
    assert torch.isfinite(output).all()  # a well-formed one is served, by a server still up


def test_blockwise8_roundtrip_error_and_size():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, LENGTH, 576, generator=generator)
    proto = serialize(hidden, wire="blockwise8")
    assert len(proto.buffer) <= hidden.numel() * 1.02 + 1100  # 1 byte a value, the absmax and codebook besides
    assert per_token_error(deserialize(proto), hidden) <= 0.03
    hidden[..., 7] = 50.0  # an outlier channel, as real LLM hidden states have
    assert per_token_error(deserialize(serialize(hidden, wire="blockwise8")), hidden) <= 0.03
    small = serialize(torch.randn(BLOCKWISE_MIN_VALUES - 1), wire="blockwise8")  # a decoding step: bfloat16
    assert small.compression == runtime_pb2.NONE and small.dtype == "bfloat16"
    with pytest.raises(BadRequest, match="float16's range"):
        serialize(torch.full((4,), 1e5), wire="float16")
