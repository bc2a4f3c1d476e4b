"""The whole model run locally by transformers: the reference the swarm must match (demo, bench, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from meadow.models.checkpoint import resolve_model_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_reference_model(model: str | Path, dtype: torch.dtype = torch.float32) -> "PreTrainedModel":
    """transformers' own model for a checkpoint folder or a GGUF file (transformers dequantizes GGUF itself)."""
    # imported here: transformers' modeling code takes seconds to import, and servers never need it
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)  # a checkpoint folder, or a GGUF file (also when given the folder holding it)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
