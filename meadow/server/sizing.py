"""How many blocks a server started without a span can hold: its free memory over what one block takes, weights and
a full KV cache. Pure arithmetic on a block's shape (a block made on the meta device: no weights are read)."""

from __future__ import annotations

import psutil
import torch
from torch import nn

from meadow.models import BlockConfig, make_block

# bytes per weight of a quantized linear layer: int8 (LLM.int8() keeps a float scale per row) and nf4 (4 bits, with
# double quantization a little over 4.1 bits of constants; rounded up for the float outliers and allocator slack)
QUANT_BYTES = {"int8": 1.05, "nf4": 0.6}
PROCESS_BYTES = 1 << 30  # what the server needs beside its blocks: torch, Python, p2pd, one float block while loading
SPARE = 0.1  # of the free memory left unused: activations of batched steps, and the rest of the machine


class NotEnoughMemory(RuntimeError):
    """Not even one block fits in the memory this server may use."""


def block_bytes(config: BlockConfig, dtype: torch.dtype, quant: str = "none", cache_tokens: int = 0) -> int:
    """One block's weights held as `quant` / `dtype` would be, plus `cache_tokens` slots of its KV cache."""
    with torch.device("meta"):
        block = make_block(config)
    linear = sum(module.weight.numel() for module in block.modules() if isinstance(module, nn.Linear))
    # weights a quantized block packs itself (GPT-OSS's experts: see quant.quantize_block), and their bytes
    packable = [module for module in block.modules() if hasattr(module, "compress")] if quant != "none" else []
    packed = [(getattr(module, name).numel(), module.packed_bytes) for module in packable for name in module.packed]
    other = sum(parameter.numel() for parameter in block.parameters()) - linear - sum(n for n, _ in packed)
    per_weight = QUANT_BYTES.get(quant, dtype.itemsize)
    cache = 2 * cache_tokens * config.num_key_value_heads * config.head_dim * dtype.itemsize  # keys and values
    return int(linear * per_weight + sum(n * size for n, size in packed) + other * dtype.itemsize + cache)


def free_memory(device: torch.device) -> int:
    """Bytes this process could still take: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def blocks_that_fit(free: int, per_block: int, total: int, device: torch.device) -> int:
    """As many blocks as `free` bytes hold (at most `total`) after the process's own needs and a spare margin."""
    usable = free * (1 - SPARE) - (PROCESS_BYTES if device.type == "cpu" else 0)
    fit = min(total, int(usable // per_block))
    if fit < 1:
        raise NotEnoughMemory(
            f"one block needs {per_block / 2**20:.0f} MiB (weights and KV cache) and {device} has {free / 2**30:.1f} GiB "
            "free: use --quant int8 or nf4, fewer --cache-tokens, or another machine"
        )
    return fit
