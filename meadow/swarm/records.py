"""What a server announces in the DHT, and the key layout. The only module that knows how keys are spelled."""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path

from pydantic import Field, model_validator

from meadow.wire.schemas import PROTOCOL_VERSION, Schema

# Bounds on what a server may announce: anyone can announce, so absurd numbers (inf, 1e308) or megabytes of text are
# refused rather than fed to routing. Far above any one machine today: 10M tokens/s, 10M steps/s, 1G cache tokens.
MAX_SPEED = 1e7
MAX_CACHE_TOKENS = 2**30
MAX_BLOCKS = 2**16
MAX_NAME = 256


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


class ServerInfo(Schema):
    """One server's announcement for each block of its span."""

    state: ServerState
    start: int = Field(ge=0, lt=MAX_BLOCKS)
    end: int = Field(gt=0, le=MAX_BLOCKS)
    # tokens/s through the whole span when batching many tokens (prefill, forward)
    throughput: float = Field(default=0.0, ge=0, le=MAX_SPEED, allow_inf_nan=False)
    inference_rps: float = Field(default=0.0, ge=0, le=MAX_SPEED, allow_inf_nan=False)  # 1-token steps/s, one block
    cache_tokens_left: int = Field(default=0, ge=0, le=MAX_CACHE_TOKENS)
    open_sessions: int = Field(default=0, ge=0, le=MAX_CACHE_TOKENS)  # inference sessions open now: load, for routing
    dtype: str = Field(default="float32", max_length=MAX_NAME)
    quant: str = Field(default="none", max_length=MAX_NAME)  # linear layers: none, int8 (LLM.int8()) or nf4 (models/quant.py)
    version: int = PROTOCOL_VERSION
    public_name: str | None = Field(default=None, max_length=MAX_NAME)
    adapters: tuple[str, ...] = Field(default=(), max_length=MAX_NAME)
    fingerprint: str = Field(default="", max_length=MAX_NAME)  # of the checkpoint served (models/fingerprint.py)

    @model_validator(mode="after")
    def _non_empty_span(self):
        if self.end <= self.start or any(len(name) > MAX_NAME for name in self.adapters):
            raise ValueError(f"empty span {self.start}:{self.end} or an adapter name over {MAX_NAME} characters")
        return self


class ModelInfo(Schema):
    """A model the swarm serves, announced by each of its servers under MODELS_KEY (subkey = the server's, as for
    its blocks)."""

    dht_prefix: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_NAME)  # its swarm name
    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    name: str = Field(max_length=MAX_NAME)  # what a monitor calls the model: its checkpoint folder's or file's name


class LedgerHead(Schema):
    """Where a server's receipt ledger stands (meadow/points/ledger.py), announced under LEDGERS_KEY: anyone who
    fetches the ledger checks it against this, so a rewritten or truncated history shows."""

    entries: int = Field(ge=0, lt=2**63)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the last entry (or the genesis hash of an empty ledger)
    tokens: int = Field(ge=0, lt=2**63)
    work: int = Field(ge=0, lt=2**63)  # parameter-tokens the receipts claim, before any weighting


def model_name(path: Path) -> str:
    """What a monitor calls a checkpoint: a folder's name, or a GGUF file's name without its extension."""
    return path.stem if path.suffix == ".gguf" else path.name


# Block keys say nothing about which models exist, so servers also list their model here: a monitor reads it first.
MODELS_KEY = "_meadow.models"
LEDGERS_KEY = "_meadow.ledgers"  # one LedgerHead per server (subkey: its owner marker)


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
