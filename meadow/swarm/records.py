"""What a server announces in the DHT, and the key layout. The only module that knows how keys are spelled."""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path

from pydantic import Field

from meadow.wire.schemas import PROTOCOL_VERSION, Schema


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


class ServerInfo(Schema):
    """One server's announcement for each block of its span."""

    state: ServerState
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    throughput: float = 0.0  # tokens/s through the whole span when batching many tokens (prefill, forward)
    inference_rps: float = 0.0  # single-token inference steps/s through one block
    cache_tokens_left: int = 0
    open_sessions: int = Field(default=0, ge=0)  # inference sessions open now: the server's load, for routing
    dtype: str = "float32"
    quant: str = "none"  # the blocks' linear layers: none, int8 (LLM.int8()) or nf4 (models/quant.py ranks them)
    version: int = PROTOCOL_VERSION
    public_name: str | None = None
    adapters: tuple[str, ...] = ()


class ModelInfo(Schema):
    """A model the swarm serves, announced by its servers under MODELS_KEY (subkey = the model's dht_prefix)."""

    num_blocks: int = Field(gt=0)
    name: str  # what to call the model on a monitor: its checkpoint folder's or file's name


def model_name(path: Path) -> str:
    """What a monitor calls a checkpoint: a folder's name, or a GGUF file's name without its extension."""
    return path.stem if path.suffix == ".gguf" else path.name


# Block keys say nothing about which models exist, so servers also list their model here: a monitor reads it first.
MODELS_KEY = "_meadow.models"


def dht_prefix_for(model: str | Path) -> str:
    """Swarm name of a model: a GGUF file's stem (also for a folder holding one and no config.json), a hub id
    ("org/name" -> "org--name"), the id of a folder in the HF cache, or else a folder's name; flattened to
    [A-Za-z0-9_-]. Servers and clients given the same model agree."""
    path = Path(model)
    if path.is_dir() and not (path / "config.json").exists() and len(files := list(path.glob("*.gguf"))) == 1:
        path = files[0]
    if path.suffix == ".gguf":
        name = path.stem
    elif path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        name = path.parent.parent.name.removeprefix("models--")
    elif path.exists():
        name = path.resolve().name
    else:
        name = str(model).replace("/", "--")
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model"


def block_key(dht_prefix: str, index: int) -> str:
    return f"{dht_prefix}.{index}"
