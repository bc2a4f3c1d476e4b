"""Falcon decoder block, all of transformers' layouts: the 7B one (multi-query attention, one input_layernorm,
attention and MLP in parallel), the "new decoder architecture" of 40B/180B (num_kv_heads groups, ln_attn and ln_mlp),
and the sequential one (parallel_attn=False); rotary positions or ALiBi, biases as the config says.

Module names are transformers' own, so a layer's tensors load as they are and peft's LoRA names fit. Checked
numerically against transformers in tests/test_families_alibi.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from meadow.models.alibi import alibi_slopes, attend_parts_alibi
from meadow.models.attention import KVCache, Part, attend_parts, packed_parts
from meadow.models.bloom import LORA_PATHS, layer_norm
from meadow.models.client_parts import ClientParts, TensorReader
from meadow.models.config import BlockConfig, UnsupportedModelError
from meadow.models.family import Family, renamed
from meadow.models.linear import project
from meadow.models.rotary import STATIC_ROPE_TYPES, Rotary

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora


@dataclass(frozen=True, kw_only=True)
class FalconConfig(BlockConfig):
    """A Falcon block's hyperparameters, read from an HF FalconConfig."""

    layer_norm_epsilon: float
    bias: bool = False  # on query_key_value, dense and the MLP (LayerNorms always have one)
    alibi: bool = False  # ALiBi instead of rotary positions
    parallel_attn: bool = True  # x + attention(norm(x)) + mlp(norm'(x)), else sequential as in Llama
    two_norms: bool = False  # ln_attn and ln_mlp (new decoder architecture), else input_layernorm
    activation: str = "gelu"
    rope_type: str = "default"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, hf: Any) -> "FalconConfig":
        """Build from a transformers FalconConfig; UnsupportedModelError for layouts transformers cannot run."""
        new = bool(hf.new_decoder_architecture)
        num_ln = hf.num_ln_in_parallel_attn or (2 if new else 1)
        if new and not hf.parallel_attn:
            raise UnsupportedModelError("Falcon's new decoder architecture runs attention and MLP in parallel only")
        if not new and num_ln != 1:
            raise UnsupportedModelError("Falcon's num_ln_in_parallel_attn=2 needs new_decoder_architecture")
        if new:
            kv_heads = hf.num_kv_heads
        else:
            kv_heads = 1 if hf.multi_query else hf.num_attention_heads
        rope = hf.rope_parameters or {}
        config = cls(
            model_type=hf.model_type,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.ffn_hidden_size,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=kv_heads,
            head_dim=hf.hidden_size // hf.num_attention_heads,
            num_hidden_layers=hf.num_hidden_layers,
            vocab_size=hf.vocab_size,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            max_position_embeddings=hf.max_position_embeddings,
            layer_norm_epsilon=hf.layer_norm_epsilon,
            bias=bool(hf.bias),
            alibi=bool(hf.alibi),
            parallel_attn=new or bool(hf.parallel_attn),
            two_norms=new and num_ln == 2,
            activation=hf.activation,
            rope_type=rope.get("rope_type", "default"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            hf_config=hf,
        )
        if not config.alibi and config.rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {config.rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        return config


class FalconBlock(nn.Module):
    """One Falcon layer: x + attention(norm(x)) + mlp(norm(x)) (one or two norms), or sequential attention then MLP."""

    def __init__(self, config: FalconConfig, layer_idx: int = 0) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        if config.two_norms:
            self.ln_attn, self.ln_mlp = nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(hidden, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        if not config.parallel_attn:
            self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.self_attention = FalconAttention(config)
        self.mlp = FalconMLP(config)
        self.two_norms, self.parallel = config.two_norms, config.parallel_attn

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
        """As LlamaBlock.forward (with ALiBi, position_ids are unused: positions are cache positions)."""
        parts = packed_parts(x, key_mask, cache, start, parts)
        attention_in = self.ln_attn(x) if self.two_norms else self.input_layernorm(x)
        attention = self.self_attention(attention_in, position_ids, parts, lora)
        if not self.parallel:
            h = x + attention
            return h + self.mlp(self.post_attention_layernorm(h), lora)
        mlp_in = self.ln_mlp(x) if self.two_norms else attention_in
        return x + (self.mlp(mlp_in, lora) + attention)  # transformers' order of additions


class FalconAttention(nn.Module):
    """Attention with kv heads in groups: query_key_value's output is, per kv head, its group's query heads then
    one key and one value head. That one layout covers multi-query (1 group), the new decoder (num_kv_heads groups)
    and multi-head attention (a group per head: BLOOM's interleaved (head, 3, D))."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.group = self.n_head // self.n_kv_head
        hidden = config.hidden_size
        self.query_key_value = nn.Linear(hidden, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.dense = nn.Linear(hidden, hidden, bias=config.bias)
        if config.alibi:
            self.slopes, self.rotary = alibi_slopes(self.n_head), None  # a plain attribute: .to(bfloat16) keeps it
        else:
            self.slopes, self.rotary = None, Rotary(self.head_dim, config.rope_type, config.rope_theta, config.hf_config)

    def forward(self, x: Tensor, position_ids: Tensor, parts: list[Part], lora: BlockLora | None = None) -> Tensor:
        B, T, _ = x.shape
        qkv = project(self.query_key_value, x, lora, "query_key_value")
        qkv = qkv.view(-1, self.n_kv_head, self.group + 2, self.head_dim)
        q = qkv[:, :, : self.group].reshape(-1, self.n_head, self.head_dim)
        k, v = qkv[:, :, self.group], qkv[:, :, self.group + 1]
        if self.rotary is not None:
            q, k = self.rotary(q, k, position_ids)
            y = attend_parts(q, k, v, parts)
        else:
            if self.slopes.device != x.device:
                self.slopes = self.slopes.to(x.device)
            # Falcon scales the ALiBi bias with the scores, by 1 / sqrt(D), and rounds it to bfloat16 first
            y = attend_parts_alibi(q, k, v, parts, self.slopes, 1 / math.sqrt(self.head_dim), round_to_bfloat16=True)
        return project(self.dense, y.view(B, T, -1), lora, "dense")


class FalconMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))); GELU (exact) unless the config names another activation."""

    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.act = activation(config.activation)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        hidden = self.act(project(self.dense_h_to_4h, x, lora, "dense_h_to_4h"))
        return project(self.dense_4h_to_h, hidden, lora, "dense_4h_to_h")


def linear_shapes(config: BlockConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a block, by its HF leaf name."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    return {"query_key_value": (hidden, qkv), "dense": (hidden, hidden),
            "dense_h_to_4h": (hidden, ffn), "dense_4h_to_h": (ffn, hidden)}  # fmt: skip


def load_client_parts(read: TensorReader, config: FalconConfig) -> ClientParts:
    """Embeddings, ln_f and the LM head (the embedding matrix when tied)."""
    names = ["transformer.word_embeddings.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    tensors = read(names)
    norm = layer_norm(read, "transformer.ln_f", config)
    return ClientParts.with_head(tensors["transformer.word_embeddings.weight"], norm, tensors.get("lm_head.weight"))


FAMILY = Family(
    name="falcon",
    config_from_hf=FalconConfig.from_hf,
    block=FalconBlock,
    layer_state=renamed({}),  # transformers' module names, as in bloom.py
    load_client_parts=load_client_parts,
    linear_shapes=linear_shapes,
    lora_paths=LORA_PATHS,
    layer_prefix="transformer.h.{}.",
    gguf_architectures=("falcon",),
)


def activation(name: str) -> nn.Module:
    """The MLP's activation: exact GELU (every released Falcon), else the one transformers names so."""
    if name == "gelu":
        return nn.GELU()
    # imported here: transformers.activations pulls in its modeling code, seconds of import that servers can skip
    from transformers.activations import get_activation

    return get_activation(name)
