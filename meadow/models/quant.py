"""Quantized weights for served blocks, through bitsandbytes: LLM.int8() ("int8") or 4-bit NormalFloat with double
quantization and a float compute dtype ("nf4"). Only a block's linear layers are quantized; norms stay as they are,
and the client's embeddings and head are never touched. LoRA updates (served adapters, a client's own weights) are
added to a layer's output by models.linear.project, so they work on quantized layers unchanged, gradients included.

bitsandbytes is imported only when a quant is used: a client that merely ranks servers' quants does not need it."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

QUANTS: tuple[str, ...] = ("none", "int8", "nf4")  # best (closest to the checkpoint) first
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold: activation columns above it are multiplied in 16 bits

K, V = TypeVar("K"), TypeVar("V")


class QuantUnavailable(RuntimeError):
    """A quant this platform cannot run: bitsandbytes is missing or broken, or lacks the kernel on this device."""


def check_quant_name(quant: str) -> None:
    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}; known: {', '.join(QUANTS)}")


def quant_at_least(quant: str, min_quant: str) -> bool:
    """True if `quant` is `min_quant` or better (none > int8 > nf4). A quant this version does not know (announced
    by a newer server) is never ranked above anything."""
    check_quant_name(min_quant)
    return quant in QUANTS and QUANTS.index(quant) <= QUANTS.index(min_quant)


def with_quant_at_least(servers: Mapping[K, V], min_quant: str | None) -> dict[K, V]:
    """The servers (values with a `.quant`, like ServerInfo) whose quant is `min_quant` or better; all if None."""
    if min_quant is None:
        return dict(servers)
    return {peer: info for peer, info in servers.items() if quant_at_least(info.quant, min_quant)}


def check_quant(quant: str, dtype: torch.dtype, device: str | torch.device) -> None:
    """ValueError for an unknown quant; QuantUnavailable if it cannot run here. A small layer is quantized and run
    on `device` in `dtype`, so a server finds out at start, not at its first request."""
    check_quant_name(quant)
    if quant == "none":
        return
    try:
        import bitsandbytes
    except Exception as e:  # not installed, or its native library fails to load
        raise QuantUnavailable(f"--quant {quant} needs bitsandbytes, which cannot be imported here "
                               f"({type(e).__name__}: {e}); install it, or serve with --quant none") from e  # fmt: skip
    try:
        quantized = quantize_linear(nn.Linear(128, 128, dtype=dtype), quant, device)
        with torch.inference_mode():
            quantized(torch.randn(2, 128, dtype=dtype, device=device))
    except Exception as e:  # a missing kernel, an unsupported device or dtype
        where = f"{torch.device(device)} in {str(dtype).removeprefix('torch.')}"
        raise QuantUnavailable(f"--quant {quant} cannot run on {where} with bitsandbytes {bitsandbytes.__version__} "
                               f"({type(e).__name__}: {e}); serve with --quant none") from e  # fmt: skip


def quantize_block(block: nn.Module, quant: str, device: str | torch.device) -> nn.Module:
    """Replace the block's nn.Linear modules in place by bitsandbytes ones on `device`, one layer at a time, each
    float weight let go once replaced (a memory-mapped checkpoint's pages once the whole block is done); then move
    the rest (norms) to `device`. The block's weights should be on the CPU: bitsandbytes quantizes while moving them
    from there. Returns the block."""
    check_quant_name(quant)
    if quant != "none":
        quantized = lambda linear: quantize_linear(linear, quant, device)
        replace_layers(block, lambda module: type(module) is nn.Linear, quantized)
        for module in block.modules():
            if hasattr(module, "compress"):  # weights that are no linear layer's: GPT-OSS's experts (MXFP4)
                module.compress()
        let_go_of_checkpoint(block, replaced=_is_quantized)
    return block.to(device)


def replace_layers(block: nn.Module, chosen: Callable[[nn.Module], bool], new: Callable[[nn.Module], nn.Module]) -> bool:
    """Replace every `chosen` submodule of the block by `new`(it), in place, one at a time. Whether there was any."""
    # names only: holding the modules in a list would keep every float weight alive until the end
    names = [name for name, module in block.named_modules() if chosen(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        setattr(parent, child, new(getattr(parent, child)))
    return bool(names)


def let_go_of_checkpoint(block: nn.Module, replaced: Callable[[nn.Module], bool]) -> None:
    """Once some of a block's layers have been `replaced` by new ones holding their own copies of the weights: copy
    the parameters of the other layers too, and give the freed memory back. A loader's tensors may be views of the
    checkpoint's memory map (safetensors): the norms, kept as they are, would keep the whole map alive, and with it
    every float weight just read from it, resident."""
    for module in block.modules():
        if not replaced(module):
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.clone()
    release_freed_memory()


def release_freed_memory() -> None:
    """Give the heap pages freed by the float weights back to the OS. glibc keeps them otherwise, and a server then
    stays as big as if unquantized: measured on 4 blocks of hidden 2048, int8 857 -> 575 MiB, nf4 552 -> 484 MiB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def quantize_linear(linear: nn.Linear, quant: str, device: str | torch.device) -> nn.Module:
    """A frozen bitsandbytes layer with `linear`'s weights quantized on `device`; it computes in the weight's dtype."""
    import bitsandbytes as bnb

    weight, bias = linear.weight.detach().to("cpu"), linear.bias
    shape = dict(input_features=linear.in_features, output_features=linear.out_features, bias=bias is not None)
    if quant == "int8":
        layer = bnb.nn.Linear8bitLt(**shape, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        # bitsandbytes' CPU training path dequantizes the weights on every call; its inference path is LLM.int8()
        # proper (int8 matmul with 16-bit outliers), faster, and has a backward for the inputs too
        layer.eval()
    elif quant == "nf4":
        layer = bnb.nn.Linear4bit(**shape, compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=layer)  # fmt: skip
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weights at the first inference call for a kernel that
        # computes in bfloat16 whatever the compute dtype, and has no backward: gradients through the layer would
        # then be silently missing. Keep the layout that every call (inference or training) computes correctly.
        layer.support_avx512bf16_for_cpu = False
    else:
        raise ValueError(f"quantize_linear: quant must be int8 or nf4, got {quant!r}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", copy=True), requires_grad=False)  # a copy: see quantize_block
    return layer.to(device).requires_grad_(False)


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


# bitsandbytes logs a warning on every int8 call of a float32 or bfloat16 layer (its activations are quantized via
# float16: that is LLM.int8()), and one at import about an optional CPU kernel for the bfloat16 nf4 path not used here
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
