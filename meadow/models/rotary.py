"""Rotary position embeddings (HF's "rotate_half" layout), shared by the families that use them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# rope types whose frequencies do not depend on the sequence length, so they can be computed once
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(
    head_dim: int, rope_type: str, rope_theta: float, hf_config: Any = None, layer_type: str | None = None
) -> tuple[Tensor, float]:
    """Rotary inverse frequencies (float32, CPU) and the cos/sin scale for a rope type; scaled types are computed by
    transformers' own helpers from `hf_config` (from its `rope_parameters[layer_type]` when given: Gemma 3's)."""
    # on CPU even when the block is built on the meta device for loading: the table is tiny and not in the checkpoint
    with torch.device("cpu"):
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            return 1.0 / (rope_theta**exponents), 1.0
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; supported: {STATIC_ROPE_TYPES}")
        if hf_config is None:
            raise ValueError(f"rope type {rope_type!r} needs the HF config (BlockConfig.hf_config)")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # here: a server of plain rope skips ~0.5 s

        by_layer_type = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, **by_layer_type)
        return inv_freq.float(), float(scaling)


def rotary_cos_sin(position_ids: Tensor, inv_freq: Tensor, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, T, D) for apply_rotary, computed in float32 then cast, as HF does."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D): HF's "rotate_half" layout, not interleaved."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Rotary:
    """A block's rotary table: rotates packed queries and keys (N, heads, D) at their positions."""

    def __init__(
        self, head_dim: int, rope_type: str = "default", rope_theta: float = 10000.0, hf_config: Any = None,
        layer_type: str | None = None,
    ):  # fmt: skip
        # a plain attribute, not a buffer: module.to(bfloat16) must not round the frequencies
        # (HF computes cos/sin in float32); moved to the input's device on first use
        self.head_dim = head_dim
        self.inv_freq, self.scaling = rope_frequencies(head_dim, rope_type, rope_theta, hf_config, layer_type)

    def __call__(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """q (N, heads, D), k (N, kv_heads, D) of the tokens at position_ids (any shape of N elements)."""
        if self.inv_freq.device != q.device:
            self.inv_freq = self.inv_freq.to(q.device)
        cos, sin = rotary_cos_sin(position_ids.reshape(1, -1), self.inv_freq, self.scaling, q.dtype)
        cos, sin = cos.view(-1, 1, self.head_dim), sin.view(-1, 1, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
