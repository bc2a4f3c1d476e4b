"""Block math per model family and loading of only the wanted tensors from HF checkpoints and GGUF files."""

from meadow.models.checkpoint import (
    SUPPORTED_MODEL_TYPES,
    ClientParts,
    UnsupportedModelError,
    load_block,
    load_blocks,
    load_client_parts,
    load_config,
    load_hf_config,
    load_tokenizer,
    resolve_model_path,
)
from meadow.models.default import default_model_path
from meadow.models.gguf import SUPPORTED_GGUF_ARCHITECTURES
from meadow.models.llama import BlockConfig, KVCache, LlamaBlock, RMSNorm
from meadow.models.reference import load_reference_model
from meadow.models.tiny import make_tiny_checkpoint, make_tiny_gguf

__all__ = [
    "SUPPORTED_GGUF_ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "BlockConfig",
    "ClientParts",
    "KVCache",
    "LlamaBlock",
    "RMSNorm",
    "UnsupportedModelError",
    "load_block",
    "load_blocks",
    "load_client_parts",
    "load_config",
    "load_hf_config",
    "load_tokenizer",
    "default_model_path",
    "load_reference_model",
    "make_tiny_checkpoint",
    "make_tiny_gguf",
    "resolve_model_path",
]
