"""Servers' float32 linear layers on a CPU packed for oneDNN (meadow.models.packed): the same results as nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meadow.models import load_blocks, load_config
from meadow.models.packed import PackedLinear, pack_block, unpacked_products
from meadow.models.tiny import make_tiny_checkpoint
from meadow.server.server import serving_blocks
from meadow.server.throughput import random_block
from meadow.wire import BlockRange

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def linears(block: nn.Module, kind: type) -> list[str]:
    return [name for name, module in block.named_modules() if type(module) is kind]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (3, 5), (2, 64)])
def test_a_packed_linear_computes_what_nn_linear_does(bias: bool, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(384, 160, bias=bias).requires_grad_(False)  # sums of 256 terms or more: oneDNN rounds otherwise
    packed = PackedLinear(linear)
    x = torch.randn(*shape, 384)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed(x.transpose(0, 1)), linear(x.transpose(0, 1)), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.weight, linear.weight)  # unpacked exactly

    # a training request's products are nn.Linear's own, exactly (oneDNN's rounding differs), and so are the
    # gradients w.r.t. the inputs that go through the layer
    x.requires_grad_()
    output, expected_output = packed(x), linear(x)
    assert torch.equal(output, expected_output)
    grad, expected_grad = (torch.autograd.grad(y.square().sum(), x)[0] for y in (output, expected_output))
    assert torch.equal(grad, expected_grad)
    with torch.no_grad(), unpacked_products():  # as a backward's recomputed forward runs
        assert torch.equal(packed(x), expected_output)


def test_a_training_graph_through_a_packed_linear_holds_no_copy_of_its_weight() -> None:
    """A server keeps training requests' graphs for their backward: each must not hold the span's weights again."""
    packed = PackedLinear(nn.Linear(256, 512).requires_grad_(False))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t, lambda t: t):
        output = packed(torch.randn(3, 256, requires_grad=True))
    assert sum(saved) < packed.in_features * packed.out_features * 4
    assert output.grad_fn is not None


def test_a_servers_cpu_blocks_are_packed_and_compute_what_the_plain_ones_do(tmp_path) -> None:
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=3)
    config = load_config(path)
    plain = load_blocks(path, config, 1, 3, torch.float32, progress=False)
    served = serving_blocks(path, config, BlockRange(start=1, end=3), torch.float32, torch.device("cpu"), "none")
    for block, plain_block in zip(served, plain):
        assert linears(block, PackedLinear) == linears(plain_block, nn.Linear) != []
        assert linears(block, nn.Linear) == []
    x, positions = torch.randn(2, 5, config.hidden_size), torch.arange(5).expand(2, 5)
    with torch.inference_mode():
        for block, plain_block in zip(served, plain):
            torch.testing.assert_close(block(x, positions), plain_block(x, positions), rtol=1e-5, atol=1e-5)
    # the speed a server announces is measured on blocks like the ones it serves
    assert linears(random_block(config, torch.float32, torch.device("cpu")), PackedLinear) != []


def test_blocks_in_other_dtypes_stay_as_they_are(tmp_path) -> None:
    path = make_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=1)
    block = load_blocks(path, load_config(path), 0, 1, torch.bfloat16, progress=False)[0]
    assert linears(pack_block(block), PackedLinear) == []


def test_a_training_request_through_packed_blocks_gets_the_plain_blocks_gradients_exactly(tmp_path) -> None:
    """Through many blocks oneDNN's rounding grows past what training may differ from a local run (packed.py), so a
    packed span trains as a plain one: the same output and gradients, bit for bit, from its kept graph and from a
    backward that recomputes the forward block by block."""
    from meadow.server.span import Span

    path = make_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=3, hidden_size=256, intermediate_size=512)
    config, blocks = load_config(path), BlockRange(start=0, end=3)  # sums of 256 terms or more: oneDNN rounds otherwise
    cpu = torch.device("cpu")
    plain = Span(load_blocks(path, config, 0, 3, torch.float32, progress=False), 0, config, torch.float32, cpu)
    packed = Span(serving_blocks(path, config, blocks, torch.float32, cpu, "none"), 0, config, torch.float32, cpu)
    generator = torch.Generator().manual_seed(0)
    hidden, grad_output = (torch.randn(2, 40, config.hidden_size, generator=generator) for _ in range(2))
    positions, key_mask = torch.arange(40).repeat(2, 1), torch.ones(2, 40, dtype=torch.bool)
    key_mask[0, :7] = False

    expected_output, graph = plain.run_keeping_graph(hidden, positions, key_mask, blocks)
    (expected,) = plain.backward(hidden, positions, key_mask, blocks, grad_output, graph=graph)
    output, graph = packed.run_keeping_graph(hidden, positions, key_mask, blocks)
    assert torch.equal(output, expected_output)
    assert torch.equal(packed.backward(hidden, positions, key_mask, blocks, grad_output, graph=graph)[0], expected)
    assert torch.equal(packed.backward(hidden, positions, key_mask, blocks, grad_output)[0], expected)  # recomputed


def test_an_exact_server_gives_transformers_logits_bit_for_bit(checkpoints) -> None:
    """`meadow serve --exact` keeps torch's own products: a client's logits equal a local run's exactly, where a
    packed server's differ by oneDNN's rounding (sums of 256 terms or more)."""
    from transformers import AutoModelForCausalLM

    from conftest import start_swarm
    from meadow import AutoDistributedModelForCausalLM

    path = checkpoints("llama", num_layers=2, hidden_size=256, intermediate_size=512)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = torch.randint(4, local.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    swarm = start_swarm(path, ["0:2"], "--exact")
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers) as model, torch.no_grad():
            assert torch.equal(model(input_ids).logits, local(input_ids).logits)
    finally:
        swarm.stop()
