"""Llama-family decoder block (Llama 2/3, Mistral, Qwen2): config, KV cache, block, rotary helpers.

Checked numerically against transformers' own implementation in tests/test_models.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora

# HF module names -> ours, one layer's prefix at a time ("self_attn.q_proj.weight" -> "attention.q_proj.weight").
# Leaf names (q_proj, ..., down_proj) stay HF's so that peft LoRA adapters name our modules too.
HF_TO_MEADOW = {
    "input_layernorm": "attention_norm",
    "self_attn": "attention",
    "post_attention_layernorm": "ffn_norm",
    "mlp": "feed_forward",
}

# rope types whose frequencies do not depend on the sequence length, so they can be computed once
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class BlockConfig:
    """The shape and hyperparameters one decoder block needs, read from an HF config."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    attention_bias: bool  # bias on q/k/v projections
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both; Qwen2 has q/k/v only)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_type: str = "default"
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" / "sliding_attention"; empty = all full
    # the HF config itself, for rope scalings computed by transformers' helpers; not part of equality
    hf_config: Any = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf(cls, hf: Any) -> "BlockConfig":
        """Build from a transformers config of a Llama, Mistral or Qwen2 model."""
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rope = hf.rope_parameters or {}
        if hf.model_type == "qwen2":
            qkv_bias, out_bias = True, False
        else:
            qkv_bias = out_bias = bool(getattr(hf, "attention_bias", False))
        sliding_window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None)
        if layer_types is None:  # Mistral: one window for every layer
            kind = "full_attention" if sliding_window is None else "sliding_attention"
            layer_types = [kind] * hf.num_hidden_layers
        return cls(
            model_type=hf.model_type,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            attention_bias=qkv_bias,
            num_hidden_layers=hf.num_hidden_layers,
            vocab_size=hf.vocab_size,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            max_position_embeddings=hf.max_position_embeddings,
            attention_out_bias=out_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hidden_act=hf.hidden_act,
            rope_type=rope.get("rope_type", "default"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            sliding_window=sliding_window,
            layer_types=tuple(layer_types),
            hf_config=hf,
        )


class KVCache(nn.Module):
    """Preallocated keys/values of one block for one session."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_length(self) -> int:
        return self.k_cache.shape[2]

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv, T, D) at positions [start, start+T); return views of [0, start+T)."""
        end = start + k.shape[2]
        if start < 0 or end > self.max_length:
            raise ValueError(f"cache positions [{start}, {end}) do not fit a cache of length {self.max_length}")
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


@dataclass
class Part:
    """One sequence group of a packed batch (several sessions' tokens run through a block at once): `batch` rows of
    `length` tokens, the next batch x length tokens of the flattened input, at cache positions [start, start+length).
    key_mask (batch, start + length) is True for real keys (None: nothing padded); no cache: start is 0."""

    batch: int
    length: int
    start: int = 0
    key_mask: Tensor | None = None
    cache: KVCache | None = None


class LlamaBlock(nn.Module):
    """One decoder layer: attention_norm -> attention -> residual -> ffn_norm -> MLP -> residual."""

    def __init__(self, config: BlockConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        position_ids: Tensor,
        key_mask: Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        lora: BlockLora | None = None,
        parts: list[Part] | None = None,
    ) -> Tensor:
        """x (B, T, hidden); position_ids (B, T) rotary positions; key_mask (B, S) True = real key.

        Without a cache S = T; with one, this step's keys go to [start, start+T) and S = start+T.
        `lora` adds low-rank updates to the linear layers it names (models/lora.py).
        `parts` packs several sequence groups, each with its own cache and mask, into x (1, N, hidden):
        everything but attention runs on all N tokens at once (key_mask, cache and start are then unused).
        """
        h = x + self.attention(self.attention_norm(x), position_ids, key_mask, cache, start, lora, parts)
        return h + self.feed_forward(self.ffn_norm(h), lora)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, config: BlockConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden, qkv_bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, hidden, bias=config.attention_out_bias)
        sliding = layer_idx < len(config.layer_types) and config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        # a plain attribute, not a buffer: module.to(bfloat16) must not round the frequencies
        # (HF computes cos/sin in float32); moved to the input's device on first use
        self.inv_freq, self.rope_scaling = rope_frequencies(config)

    def forward(
        self,
        x: Tensor,
        position_ids: Tensor,
        key_mask: Tensor | None,
        cache: KVCache | None,
        start: int,
        lora: BlockLora | None = None,
        parts: list[Part] | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        if parts is None:
            parts = [Part(B, T, start if cache is not None else 0, key_mask, cache)]
        # projections and rotary run on every token at once, (N, heads, head_dim); attention per part
        q = project(self.q_proj, x, lora, "q_proj").view(-1, self.n_head, self.head_dim)
        k = project(self.k_proj, x, lora, "k_proj").view(-1, self.n_kv_head, self.head_dim)
        v = project(self.v_proj, x, lora, "v_proj").view(-1, self.n_kv_head, self.head_dim)

        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rotary_cos_sin(position_ids.reshape(1, -1), self.inv_freq, self.rope_scaling, x.dtype)
        cos, sin = cos.view(-1, 1, self.head_dim), sin.view(-1, 1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        outputs, offset = [], 0
        for part in parts:
            n = part.batch * part.length
            q_part, k_part, v_part = (
                t[offset : offset + n].view(part.batch, part.length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v)
            )
            outputs.append(self.attend(q_part, k_part, v_part, part).transpose(1, 2).reshape(n, -1))
            offset += n
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return project(self.o_proj, y.view(B, T, self.n_head * self.head_dim), lora, "o_proj")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, part: Part) -> Tensor:
        """Attention of one part's queries (b, heads, t, D) over its cached and new keys/values."""
        T, start, key_mask = q.shape[2], part.start, part.key_mask
        if part.cache is not None:
            k, v = part.cache.update(start, k, v)
        gqa = self.n_head != self.n_kv_head  # each kv head serves n_head / n_kv_head query heads; SDPA needs no copies

        if key_mask is None and self.sliding_window is None and (start == 0 or T == 1):
            # plain causal (or one new token that sees everything): let SDPA pick its fastest kernel
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        mask = attention_mask(T, k.shape[2], start, key_mask, self.sliding_window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        hidden = F.silu(project(self.gate_proj, x, lora, "gate_proj")) * project(self.up_proj, x, lora, "up_proj")
        return project(self.down_proj, hidden, lora, "down_proj")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 like HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def project(layer: nn.Linear, x: Tensor, lora: BlockLora | None, name: str) -> Tensor:
    """layer(x) plus the LoRA updates that `lora` holds for the layer called `name`, if any."""
    y = layer(x)
    for update in lora.get(name, ()) if lora else ():
        y = y + update(x)
    return y


def linear_shapes(config: BlockConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a block, by its HF leaf name."""
    hidden, q, kv, ffn = (
        config.hidden_size,
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
        config.intermediate_size,
    )
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}  # fmt: skip


def attention_mask(
    T: int, S: int, start: int, key_mask: Tensor | None, sliding_window: int | None, device: torch.device
) -> Tensor:
    """Boolean (B or 1, 1, T, S) mask, True = attend. Query i sits at key index start + i."""
    q_idx = torch.arange(start, start + T, device=device)[:, None]
    k_idx = torch.arange(S, device=device)[None, :]
    mask = k_idx <= q_idx
    if sliding_window is not None:
        mask = mask & (k_idx > q_idx - sliding_window)
    if key_mask is not None:
        # every query also sees itself, so that a padded row never softmaxes over nothing (NaN that
        # would leak into real rows through 0 * NaN in later layers)
        mask = mask & (key_mask[:, None, None, :].bool() | (k_idx == q_idx))
    else:
        mask = mask[None, None]
    return mask


def rope_frequencies(config: BlockConfig) -> tuple[Tensor, float]:
    """Rotary inverse frequencies (float32, CPU) and the cos/sin scale for this config's rope type."""
    # on CPU even when the block is built on the meta device for loading: the table is tiny and not in the checkpoint
    with torch.device("cpu"):
        if config.rope_type == "default":
            exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
            return 1.0 / (config.rope_theta**exponents), 1.0
        if config.rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"rope type {config.rope_type!r} is not supported; supported: {STATIC_ROPE_TYPES}")
        if config.hf_config is None:
            raise ValueError(f"rope type {config.rope_type!r} needs BlockConfig.hf_config (build it with from_hf)")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[config.rope_type](config.hf_config)
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
