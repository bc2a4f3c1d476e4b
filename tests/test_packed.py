"""Servers' float32 linear layers on a CPU packed for oneDNN (meadow.models.packed): the same results as nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meadow.models import load_blocks, load_config
from meadow.models.packed import PackedLinear, pack_block
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
    linear = nn.Linear(96, 160, bias=bias).requires_grad_(False)
    packed = PackedLinear(linear)
    x = torch.randn(*shape, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed(x.transpose(0, 1)), linear(x.transpose(0, 1)), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.weight, linear.weight)  # unpacked exactly

    # a training request's gradients w.r.t. the inputs go through the layer
    x.requires_grad_()
    grad = torch.autograd.grad(packed(x).square().sum(), x)[0]
    expected = torch.autograd.grad(linear(x).square().sum(), x)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


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
