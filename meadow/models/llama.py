"""Llama-family decoder block (Llama 2/3, Mistral with its sliding window, Qwen2, Qwen3): config, block, attention,
MLP, and the names of its tensors in HF checkpoints. Shared pieces (KV cache, packed parts, masks, rotary, norms) live
in attention.py, rotary.py and norms.py.

Checked numerically against transformers' own implementation in tests/test_models.py and tests/test_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from meadow.models.attention import KVCache, Part, attend_parts, packed_parts
from meadow.models.client_parts import ClientParts, TensorReader
from meadow.models.config import BlockConfig, UnsupportedModelError
from meadow.models.family import Family, renamed
from meadow.models.linear import project
from meadow.models.norms import RMSNorm
from meadow.models.rotary import STATIC_ROPE_TYPES, Rotary

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
# the gated MLP's activations, by HF's names (transformers' ACT2FN computes these the same way)
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu}
# where peft finds each linear layer inside a layer (HF names), by the leaf name LoRA targets
LORA_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(BlockConfig):
    """A Llama-family block's hyperparameters, read from an HF config of Llama, Mistral, Qwen2 or Qwen3."""

    rms_norm_eps: float
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both; Qwen2 has q/k/v only)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_type: str = "default"
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" / "sliding_attention"; empty = all full
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys, before rotary

    @classmethod
    def from_hf(cls, hf: Any, **extra: Any) -> "LlamaConfig":
        """Build from a transformers config of a Llama, Mistral, Qwen2 or Qwen3 model (`extra`: a subclass's
        fields); UnsupportedModelError for options without block math here."""
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
        config = cls(
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
            qk_norm=hf.model_type in ("qwen3", "qwen3_moe"),
            hf_config=hf,
            **extra,
        )
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        if config.rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {config.rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        return config


class LlamaBlock(nn.Module):
    """One decoder layer: attention_norm -> attention -> residual -> ffn_norm -> MLP -> residual."""

    def __init__(
        self, config: LlamaConfig, layer_idx: int = 0, feed_forward: nn.Module | None = None,
        attention: nn.Module | None = None,
    ) -> None:  # fmt: skip
        """`feed_forward` replaces the SwiGLU MLP (Mixtral's mixture of experts), `attention` the attention (Phi-3's
        fused projection)."""
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = attention if attention is not None else Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = feed_forward if feed_forward is not None else FeedForward(config)

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
        parts = packed_parts(x, key_mask, cache, start, parts)
        h = x + self.attention(self.attention_norm(x), position_ids, parts, lora)
        return h + self.feed_forward(self.ffn_norm(h), lora)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions (and Qwen3's per-head q/k norms, a sliding window)."""

    scale: float | None = None  # of the scores q.k; None: 1 / sqrt(head_dim) (Gemma sets its own)
    softcap: float | None = None  # scores bounded by softcap * tanh(scores / softcap) (Gemma 2)
    norm = RMSNorm  # of each head's queries and keys, with qk_norm

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
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
        if config.qk_norm:
            self.q_norm = self.norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.norm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        sliding = layer_idx < len(config.layer_types) and config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        self.rotary = self.rotary_for(config)
        self.sinks: Tensor | None = None  # a logit per head that the softmax counts as one more key's (GPT-OSS)

    def rotary_for(self, config: LlamaConfig) -> Rotary:
        """This layer's rotary table (Gemma 3's sliding layers have their own)."""
        return Rotary(self.head_dim, config.rope_type, config.rope_theta, config.hf_config)

    def forward(self, x: Tensor, position_ids: Tensor, parts: list[Part], lora: BlockLora | None = None) -> Tensor:
        """x (B, T, hidden), the tokens of `parts` packed (B = 1) or one part; returns (B, T, hidden)."""
        B, T, _ = x.shape
        # projections and rotary run on every token at once, (N, heads, head_dim); attention per part
        q, k, v = self.projected(x, lora)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, k, position_ids)
        y = attend_parts(q, k, v, parts, self.sliding_window, self.scale, self.softcap, self.sinks)
        return project(self.o_proj, y.view(B, T, self.n_head * self.head_dim), lora, "o_proj")


    def projected(self, x: Tensor, lora: BlockLora | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (N, heads, head_dim), keys and values (N, kv_heads, head_dim) of x's N tokens."""
        q = project(self.q_proj, x, lora, "q_proj").view(-1, self.n_head, self.head_dim)
        k = project(self.k_proj, x, lora, "k_proj").view(-1, self.n_kv_head, self.head_dim)
        v = project(self.v_proj, x, lora, "v_proj").view(-1, self.n_kv_head, self.head_dim)
        return q, k, v


class FeedForward(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with Gemma's gelu."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        hidden = self.act(project(self.gate_proj, x, lora, "gate_proj")) * project(self.up_proj, x, lora, "up_proj")
        return project(self.down_proj, hidden, lora, "down_proj")


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




def load_client_parts(read: TensorReader, config: LlamaConfig) -> ClientParts:
    """Embeddings, final RMSNorm and LM head; the head shares the embedding matrix when the model ties them."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    tensors = read(names)
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    norm.weight = nn.Parameter(tensors["model.norm.weight"], requires_grad=False)
    # tied (Qwen2-style): the head is the embedding matrix, and checkpoints usually omit lm_head.weight
    return ClientParts.with_head(tensors["model.embed_tokens.weight"], norm, tensors.get("lm_head.weight"))


FAMILY = Family(
    name="llama",
    config_from_hf=LlamaConfig.from_hf,
    block=LlamaBlock,
    layer_state=renamed(HF_TO_MEADOW),
    load_client_parts=load_client_parts,
    linear_shapes=linear_shapes,
    lora_paths=LORA_PATHS,
    gguf_architectures=("llama", "qwen2", "qwen3"),  # llama.cpp's names ("llama" also for Mistral-style models)
)
