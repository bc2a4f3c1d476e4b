"""BLOOM decoder block: ALiBi attention with a fused query_key_value, LayerNorms with bias, tanh-GELU MLP; the client
runs the embedding LayerNorm (word_embeddings_layernorm), ln_f and the head tied to the embeddings.

Module names are transformers' own, so a layer's tensors load as they are and peft's LoRA names fit. Checked
numerically against transformers in tests/test_families_alibi.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from meadow.models.alibi import alibi_slopes, attend_parts_alibi
from meadow.models.attention import KVCache, Part, packed_parts
from meadow.models.client_parts import ClientParts, TensorReader
from meadow.models.config import BlockConfig
from meadow.models.family import Family, renamed
from meadow.models.linear import project

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora

# where peft finds each linear layer inside a layer, by the leaf name LoRA targets (peft's defaults for BLOOM)
LORA_PATHS = {"query_key_value": "self_attention.query_key_value", "dense": "self_attention.dense",
              "dense_h_to_4h": "mlp.dense_h_to_4h", "dense_4h_to_h": "mlp.dense_4h_to_h"}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class BloomConfig(BlockConfig):
    """A BLOOM block's hyperparameters, read from an HF BloomConfig."""

    layer_norm_epsilon: float
    residual_after_norm: bool = False  # apply_residual_connection_post_layernorm: the residual is the normed input

    @classmethod
    def from_hf(cls, hf: Any) -> "BloomConfig":
        """Build from a transformers BloomConfig."""
        return cls(
            model_type=hf.model_type,
            hidden_size=hf.hidden_size,
            intermediate_size=4 * hf.hidden_size,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_attention_heads,
            head_dim=hf.hidden_size // hf.num_attention_heads,
            num_hidden_layers=hf.num_hidden_layers,
            vocab_size=hf.vocab_size,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            max_position_embeddings=getattr(hf, "seq_length", None) or 2048,  # ALiBi has no limit; a context to offer
            layer_norm_epsilon=hf.layer_norm_epsilon,
            residual_after_norm=bool(hf.apply_residual_connection_post_layernorm),
            hf_config=hf,
        )


class BloomBlock(nn.Module):
    """One BLOOM layer: input_layernorm -> attention -> residual -> post_attention_layernorm -> MLP -> residual."""

    def __init__(self, config: BloomConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)
        self.residual_after_norm = config.residual_after_norm

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
        """As LlamaBlock.forward; position_ids are unused: ALiBi positions are cache positions (see alibi.py)."""
        parts = packed_parts(x, key_mask, cache, start, parts)
        normed = self.input_layernorm(x)
        h = (normed if self.residual_after_norm else x) + self.self_attention(normed, parts, lora)
        normed = self.post_attention_layernorm(h)
        return (normed if self.residual_after_norm else h) + self.mlp(normed, lora)


class BloomAttention(nn.Module):
    """Multi-head attention with ALiBi; q, k, v come from one linear layer, interleaved per head (head, 3, D)."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        # a plain attribute, not a buffer: not in the checkpoint, and module.to(bfloat16) must not round it
        self.slopes = alibi_slopes(self.n_head)

    def forward(self, x: Tensor, parts: list[Part], lora: BlockLora | None = None) -> Tensor:
        B, T, _ = x.shape
        qkv = project(self.query_key_value, x, lora, "query_key_value").view(-1, self.n_head, 3, self.head_dim)
        q, k, v = qkv.unbind(2)
        if self.slopes.device != x.device:
            self.slopes = self.slopes.to(x.device)
        y = attend_parts_alibi(q, k, v, parts, self.slopes)
        return project(self.dense, y.view(B, T, -1), lora, "dense")


class BloomMLP(nn.Module):
    """dense_4h_to_h(gelu_tanh(dense_h_to_4h(x))), with biases."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        hidden = F.gelu(project(self.dense_h_to_4h, x, lora, "dense_h_to_4h"), approximate="tanh")  # bloom_gelu
        return project(self.dense_4h_to_h, hidden, lora, "dense_4h_to_h")


def linear_shapes(config: BlockConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a block, by its HF leaf name."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    return {"query_key_value": (hidden, 3 * hidden), "dense": (hidden, hidden),
            "dense_h_to_4h": (hidden, ffn), "dense_4h_to_h": (ffn, hidden)}  # fmt: skip


def layer_norm(read: TensorReader, prefix: str, config: BloomConfig) -> nn.LayerNorm:
    """A frozen LayerNorm with the weight and bias stored under `prefix`."""
    tensors = read([f"{prefix}.weight", f"{prefix}.bias"])
    norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, device="meta")
    norm.weight = nn.Parameter(tensors[f"{prefix}.weight"], requires_grad=False)
    norm.bias = nn.Parameter(tensors[f"{prefix}.bias"], requires_grad=False)
    return norm


def load_client_parts(read: TensorReader, config: BloomConfig) -> ClientParts:
    """Embeddings and their LayerNorm, ln_f and the LM head (the embedding matrix unless the model unties it)."""
    names = ["transformer.word_embeddings.weight"] + ([] if config.tie_word_embeddings else ["lm_head.weight"])
    tensors = read(names)
    return ClientParts.with_head(
        tensors["transformer.word_embeddings.weight"],
        layer_norm(read, "transformer.ln_f", config),
        tensors.get("lm_head.weight"),
        embed_norm=layer_norm(read, "transformer.word_embeddings_layernorm", config),
    )


FAMILY = Family(
    name="bloom",
    config_from_hf=BloomConfig.from_hf,
    block=BloomBlock,
    layer_state=renamed({}),  # our module names are transformers': a layer's tensors load as they are
    load_client_parts=load_client_parts,
    linear_shapes=linear_shapes,
    lora_paths=LORA_PATHS,
    layer_prefix="transformer.h.{}.",
    gguf_architectures=("bloom",),
)
