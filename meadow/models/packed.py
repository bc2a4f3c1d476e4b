"""A server's float32 linear layers on a CPU, kept in oneDNN's prepacked layout.

torch sends a CPU float32 matmul to MKL, which runs its AVX2 kernels on AMD CPUs even where they have AVX-512. oneDNN
(also inside torch) picks the widest instructions the CPU has, and reads a weight it packed beforehand in its own
blocked layout faster still. On the 2-core AMD EPYC where this project is measured, one core, the bench model's
weights: a product with 1 row takes 0.57-0.79 of MKL's time, with 2 to 128 rows 0.31-0.50 (`python -m
benchmarks.layout`); a server's pass of 8 decoding steps through 4 blocks, 13.7 -> 6.8 ms (a one-off measurement).

The packed weight replaces the plain one, so a block takes no more memory.

oneDNN's kernel rounds more than MKL's: ~2x per product (its sums run in one long chain), and through the blocks the
difference grows. On the 30-block default model (`python benchmarks/precision.py`, 16 to 512 tokens) training
gradients came 4.6e-5 to 2.6e-4 (relative) from transformers', past the 1e-4 they must match within; transformers'
own float32 gradients are 1e-5 to 4e-5 from float64's. So training runs unpacked: a product under autograd, and any
product inside `unpacked_products()`, unpacks the weight (exactly) and runs torch's own product, the one transformers
runs (gradients then 0 to 3.6e-6 from transformers'); the unpacked copy is let go at once. Inference stays
packed: its logits came 1.2e-4 to 9.1e-4 from transformers', as far as transformers' float32 logits are from
float64's (5.2e-5 to 1.05e-3); `meadow serve --exact` (stop_packing) packs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from meadow.models.quant import let_go_of_checkpoint, replace_layers


_packing = True  # `meadow serve --exact` turns it off for the server's process: transformers' numbers bit for bit


def stop_packing() -> None:
    """Leave every linear layer this process loads from now on as it is (torch's own products, no oneDNN)."""
    global _packing
    _packing = False


def packs(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether linear layers of this dtype on this device get packed: float32 on a CPU, where this torch can, unless
    this process stopped packing."""
    return _packing and dtype == torch.float32 and torch.device(device).type == "cpu" and _onednn_packs()


@functools.cache
def _onednn_packs() -> bool:
    """Whether this torch packs and runs a float32 linear layer with oneDNN: not every build can (one without
    oneDNN, or where the op is missing); there, layers stay as they are."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            PackedLinear(nn.Linear(8, 8).requires_grad_(False))(torch.randn(2, 8))
        return True
    except Exception:  # a missing op or kernel on this platform
        return False


def packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and packs(module.weight.dtype, module.weight.device)


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight is kept only in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> Tensor:
        """The weight in the usual layout: unpacked on each access (a copy, equal to the original)."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _PackedProduct.apply(x, self)
        if _unpacked.on:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Unpacked(threading.local):
    on = False  # per thread: what other threads run meanwhile (others' inference) stays packed


_unpacked = _Unpacked()


@contextlib.contextmanager
def unpacked_products():
    """Within it, on this thread, packed layers compute as a plain nn.Linear would (torch's product, no oneDNN):
    for the forward a training request's backward recomputes, which must equal the one it kept or the client ran."""
    before, _unpacked.on = _unpacked.on, True
    try:
        yield
    finally:
        _unpacked.on = before


def pack_block(block: nn.Module) -> nn.Module:
    """Replace the block's packable linear layers by PackedLinear ones, in place (a quantized block has none).
    Returns the block."""
    if replace_layers(block, packable, PackedLinear):
        let_go_of_checkpoint(block, replaced=lambda module: isinstance(module, PackedLinear))
    return block


class _PackedProduct(torch.autograd.Function):
    """A packed layer's output, differentiable w.r.t. its input only (the layer is frozen), computed as a plain
    nn.Linear would (see the module's docstring). Forward and backward each unpack the weight for their one product
    and let it go: an autograd graph that kept an unpacked copy per layer would hold the whole span twice, once per
    training request the server keeps a graph for."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: PackedLinear) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight, layer.bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output @ ctx.layer.weight, None
