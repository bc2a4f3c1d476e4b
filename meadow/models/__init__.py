"""Block math per model family and loading of only the wanted tensors from HF checkpoints and GGUF files.

Tiny random checkpoints for tests and benchmarks are in meadow.models.tiny (not imported here: it pulls in
transformers' modeling code, which takes seconds to import and servers never need)."""

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
    "resolve_model_path",
]
