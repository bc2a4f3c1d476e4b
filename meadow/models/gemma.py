"""Gemma decoder blocks (Gemma 1, Gemma 2 and Gemma 3's text models): Llama's attention and gated MLP with Gemma's
differences. Norms scale by (1 + weight) in float32; the MLP is GeGLU (tanh GELU); the client multiplies the embeddings
by sqrt(hidden_size). Gemma 2 and 3 add a norm on the attention's output and on the MLP's, scale the scores by
query_pre_attn_scalar ** -0.5, and give every other (Gemma 2) or most (Gemma 3) layers a sliding window. Gemma 2 caps
the attention scores and the final logits with tanh; Gemma 3 norms each head's queries and keys, and its sliding layers
have their own rotary base. Gemma 3's image models (4B to 27B) are served as their text model (MULTIMODAL_FAMILY).

Module names are transformers' own (a layer's tensors load as they are, peft's LoRA paths are Llama's). Checked
numerically against transformers in tests/test_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from meadow.models import llama
from meadow.models.attention import KVCache, Part, packed_parts
from meadow.models.client_parts import ClientParts, TensorReader
from meadow.models.config import UnsupportedModelError
from meadow.models.family import Family, renamed
from meadow.models.llama import ACTIVATIONS, LlamaConfig
from meadow.models.norms import GemmaRMSNorm
from meadow.models.rotary import STATIC_ROPE_TYPES, Rotary

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(LlamaConfig):
    """A Gemma block's hyperparameters: Llama's fields, and what Gemma 2 and 3 add."""

    query_scale: float | None = None  # multiplies the scores q.k (None: 1 / sqrt(head_dim), Gemma 1)
    attn_softcap: float | None = None  # Gemma 2's cap on attention scores
    sandwich_norms: bool = False  # Gemma 2 and 3: norms on the attention's and the MLP's outputs too
    sliding_rope_theta: float | None = None  # Gemma 3: the sliding layers' rotary base (plain rope)

    @classmethod
    def from_hf(cls, hf: Any, **extra: Any) -> "GemmaConfig":
        """Build from a transformers config of Gemma, Gemma 2 or Gemma 3 (text, or the text part of a multimodal
        one); UnsupportedModelError for options without block math here."""
        if hf.model_type == "gemma3":  # the image model: Meadow serves its text model, its images are refused
            return replace(cls.from_hf(hf.get_text_config(), **extra), model_type="gemma3")
        later = hf.model_type != "gemma"
        if getattr(hf, "use_bidirectional_attention", False):
            raise UnsupportedModelError("bidirectional attention (Gemma 3's embedding models) is not supported")
        rope = hf.rope_parameters or {}
        sliding_rope_theta = None
        if hf.model_type == "gemma3_text":  # one set of rope parameters per layer type
            sliding = rope.get("sliding_attention") or {}
            if sliding.get("rope_type", "default") != "default":
                raise UnsupportedModelError(f"rope type {sliding['rope_type']!r} on sliding layers is not supported")
            sliding_rope_theta, rope = float(sliding.get("rope_theta", 10000.0)), rope.get("full_attention") or {}
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        activation = hf.hidden_activation if later else (getattr(hf, "hidden_activation", None) or hf.hidden_act)
        config = cls(
            model_type=hf.model_type,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=hf.head_dim,
            num_hidden_layers=hf.num_hidden_layers,
            vocab_size=hf.vocab_size,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            max_position_embeddings=hf.max_position_embeddings,
            rms_norm_eps=hf.rms_norm_eps,
            attention_bias=bool(hf.attention_bias),
            attention_out_bias=bool(hf.attention_bias),
            hidden_act=activation,
            rope_type=rope.get("rope_type", "default"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            sliding_window=getattr(hf, "sliding_window", None) if later else None,
            layer_types=tuple(layer_types),
            qk_norm=hf.model_type == "gemma3_text",
            query_scale=hf.query_pre_attn_scalar**-0.5 if later else None,
            # Gemma 3's config carries the field, but transformers applies it to Gemma 2 only
            attn_softcap=getattr(hf, "attn_logit_softcapping", None) if hf.model_type == "gemma2" else None,
            sandwich_norms=later,
            sliding_rope_theta=sliding_rope_theta,
            hf_config=hf,
            **extra,
        )
        if config.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"hidden activation {config.hidden_act!r} is not supported")
        if config.rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {config.rope_type!r} is not supported; supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        return config


class GemmaBlock(nn.Module):
    """One decoder layer. Gemma 1: input_layernorm -> attention -> residual -> post_attention_layernorm -> MLP ->
    residual. Gemma 2 and 3: input_layernorm -> attention -> post_attention_layernorm -> residual ->
    pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> residual."""

    def __init__(self, config: GemmaConfig, layer_idx: int = 0) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = llama.FeedForward(config)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

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
        """As LlamaBlock.forward."""
        parts = packed_parts(x, key_mask, cache, start, parts)
        attended = self.self_attn(self.input_layernorm(x), position_ids, parts, lora)
        if not self.sandwich_norms:
            h = x + attended
            return h + self.mlp(self.post_attention_layernorm(h), lora)
        h = x + self.post_attention_layernorm(attended)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), lora))


class Attention(llama.Attention):
    """Llama's attention with Gemma's norms of queries and keys, scale, score cap and per-layer rotary base."""

    norm = GemmaRMSNorm

    def __init__(self, config: GemmaConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.scale, self.softcap = config.query_scale, config.attn_softcap

    def rotary_for(self, config: GemmaConfig) -> Rotary:
        if config.sliding_rope_theta is None:
            return super().rotary_for(config)
        if self.sliding_window is not None:  # Gemma 3: rope parameters by layer type
            return Rotary(self.head_dim, "default", config.sliding_rope_theta)
        return Rotary(self.head_dim, config.rope_type, config.rope_theta, config.hf_config, layer_type="full_attention")


def load_client_parts(read: TensorReader, config: GemmaConfig, model: str = "model.", head: str = "") -> ClientParts:
    """Embeddings (times sqrt(hidden_size)), the final norm and the LM head (the embedding matrix unless untied), whose
    logits Gemma 2 caps; under `model` and `head` in the checkpoint (a multimodal one's text model's names)."""
    names = {"embed": f"{model}embed_tokens.weight", "norm": f"{model}norm.weight", "head": f"{head}lm_head.weight"}
    tensors = read([names["embed"], names["norm"], *([] if config.tie_word_embeddings else [names["head"]])])
    norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
    norm.weight = nn.Parameter(tensors[names["norm"]], requires_grad=False)
    softcap = getattr(config.hf_config, "final_logit_softcapping", None)
    return ClientParts.with_head(tensors[names["embed"]], norm, tensors.get(names["head"]),
                                 embed_scale=config.hidden_size**0.5, logit_softcap=softcap)  # fmt: skip


FAMILY = Family(
    name="gemma",
    config_from_hf=GemmaConfig.from_hf,
    block=GemmaBlock,
    layer_state=renamed({}),  # our module names are transformers'
    load_client_parts=load_client_parts,
    linear_shapes=llama.linear_shapes,
    lora_paths=llama.LORA_PATHS,
)

# Gemma 3's image-and-text models (4B, 12B, 27B: Gemma3ForConditionalGeneration): their text model, whose tensors
# transformers saves under language_model.model. (and its model holds under model.language_model.)
MULTIMODAL_FAMILY = replace(
    FAMILY,
    name="gemma3",
    load_client_parts=partial(load_client_parts, model="language_model.model.", head="language_model."),
    layer_prefix="language_model.model.layers.{}.",
    module_prefix="model.language_model.layers.{}.",
)
