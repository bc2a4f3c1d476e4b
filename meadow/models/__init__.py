"""Block math per model family and loading of only the wanted tensors from HF checkpoints and GGUF files.

Tiny random checkpoints for tests and benchmarks are in meadow.models.tiny (not imported here: it pulls in
transformers' modeling code, which takes seconds to import and servers never need)."""

from meadow.models.attention import KVCache, Part
from meadow.models.checkpoint import (
    load_block,
    load_blocks,
    load_client_parts,
    load_config,
    load_hf_config,
    load_tokenizer,
    resolve_model_path,
)
from meadow.models.client_parts import ClientParts
from meadow.models.config import BlockConfig, UnsupportedModelError
from meadow.models.default import default_model_path
from meadow.models.family import Family
from meadow.models.llama import LlamaBlock, LlamaConfig
from meadow.models.norms import RMSNorm
from meadow.models.reference import load_reference_model
from meadow.models.registry import (
    SUPPORTED_GGUF_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    family_for,
    family_of,
    linear_shapes,
    make_block,
)

__all__ = [
    "SUPPORTED_GGUF_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "BlockConfig",
    "ClientParts",
    "Family",
    "KVCache",
    "LlamaBlock",
    "LlamaConfig",
    "Part",
    "RMSNorm",
    "UnsupportedModelError",
    "load_block",
    "load_blocks",
    "load_client_parts",
    "load_config",
    "load_hf_config",
    "load_tokenizer",
    "default_model_path",
    "family_for",
    "family_of",
    "linear_shapes",
    "make_block",
    "load_reference_model",
    "resolve_model_path",
]
