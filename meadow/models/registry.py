"""Every architecture Meadow runs: HF model_type (and llama.cpp GGUF architecture) -> its Family. Adding a family is
one module (see llama.py) and one line here."""

from __future__ import annotations

from torch import nn

from meadow.models import bloom, falcon, gemma, gpt_oss, llama, mixtral, phi3
from meadow.models.config import BlockConfig, UnsupportedModelError
from meadow.models.family import Family

FAMILIES: dict[str, Family] = {
    "llama": llama.FAMILY,
    "mistral": llama.FAMILY,
    "qwen2": llama.FAMILY,
    "qwen3": llama.FAMILY,
    "mixtral": mixtral.FAMILY,
    "qwen3_moe": mixtral.FAMILY,
    "bloom": bloom.FAMILY,
    "falcon": falcon.FAMILY,
    "phi3": phi3.FAMILY,
    "gpt_oss": gpt_oss.FAMILY,
    **{model_type: gemma.FAMILY for model_type in gemma.MODEL_TYPES},
    "gemma3": gemma.MULTIMODAL_FAMILY,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)
GGUF_ARCHITECTURES: dict[str, Family] = {arch: f for f in FAMILIES.values() for arch in f.gguf_architectures}
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(GGUF_ARCHITECTURES)


def family_for(model_type: str | None) -> Family:
    """The family of an HF model_type; UnsupportedModelError listing the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def check_gguf_architecture(arch: str | None) -> None:
    """UnsupportedModelError, listing the supported ones, for a GGUF architecture Meadow cannot read."""
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )


def family_of(config: BlockConfig) -> Family:
    return family_for(config.model_type)


def make_block(config: BlockConfig, layer_idx: int = 0) -> nn.Module:
    """An (uninitialised unless built on a real device) block of the config's family."""
    return family_of(config).block(config, layer_idx)


def linear_shapes(config: BlockConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a block that LoRA can target, by its leaf name."""
    return family_of(config).linear_shapes(config)
