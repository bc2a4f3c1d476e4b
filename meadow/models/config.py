"""What every family's block config holds (shapes the server and client need), and the error for architectures
Meadow has no block math for. Each family's module adds its own fields in a subclass (llama.LlamaConfig, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any


# fields about the whole model rather than one block's shape
MODEL_FIELDS = ("num_hidden_layers", "vocab_size", "tie_word_embeddings", "max_position_embeddings", "layer_types",
                "hf_config")  # fmt: skip


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its options) is not one Meadow has block math for."""


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """The shapes every family's blocks share, read from an HF config: what servers size KV caches, deep prompts and
    LoRA weights by. The KV cache of a block is (batch, num_key_value_heads, length, head_dim) in every family."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    # the HF config itself, for what transformers' helpers compute from it (rope scalings); not part of equality
    hf_config: Any = field(default=None, compare=False, hash=False, repr=False)

    def block_shape(self) -> str:
        """Every field one block's math depends on (not the model's depth or vocabulary), e.g. for cache keys."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name not in MODEL_FIELDS)


# model types whose transformers config holds config.json's values as they are when rope is unscaled (LlamaConfig only
# fills in defaults for missing fields): servers read these without importing transformers' config classes, ~1 s of
# CPU at start. tests/test_models.py checks that both ways give the same BlockConfig.
PLAIN_MODEL_TYPES = ("llama",)


def plain_hf_config(values: dict[str, Any]) -> SimpleNamespace | None:
    """config.json's values as attributes, like the config transformers would make of them, for the model types and
    options where the two hold the same values; None where transformers must read it. A family's config_from_hf that
    finds a field missing raises AttributeError: the caller then reads the config with transformers too."""
    rope = values.get("rope_parameters")
    plain = (
        values.get("model_type") in PLAIN_MODEL_TYPES
        and "rope_scaling" not in values and "rope_theta" not in values  # an older spelling transformers converts
        and isinstance(rope, dict) and set(rope) == {"rope_type", "rope_theta"} and rope["rope_type"] == "default"
        # what LlamaConfig validates: an invalid config goes to transformers, for its error
        and all(type(values.get(key)) is int and values[key] > 0 for key in ("hidden_size", "num_attention_heads"))
        and values["hidden_size"] % values["num_attention_heads"] == 0
    )  # fmt: skip
    return SimpleNamespace(**values) if plain else None
