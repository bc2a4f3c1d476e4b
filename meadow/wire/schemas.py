"""Typed metadata of every request and reply. Unknown fields are ignored so that newer peers can talk to older ones."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meadow.wire.errors import BadRequest

PROTOCOL_VERSION = 3  # 2: wire formats, step rewinds (Step.resent), receipts; 3: sessions grow (Step.max_length)

# How hidden states and their gradients travel (wire/tensors.py): exact float32, 16-bit floats, or 8-bit blockwise
# quantization for large payloads. Token ids, positions and masks always travel exactly.
WIRE_FORMATS: tuple[str, ...] = ("float32", "float16", "bfloat16", "blockwise8")


def check_wire_format(wire: str | None) -> str | None:
    if wire is not None and wire not in WIRE_FORMATS:
        raise ValueError(f"unknown wire format {wire!r}; known: {', '.join(WIRE_FORMATS)}")
    return wire


def default_wire(server_dtype: str) -> str:
    """The wire format for a server that computes in `server_dtype`: its own dtype, which loses nothing, since the
    server casts its inputs to that dtype anyway and its outputs hold no more precision; float32 if unknown."""
    return server_dtype if server_dtype in ("float32", "float16", "bfloat16") else "float32"


class Schema(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def from_wire(cls, data: dict):
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise BadRequest(f"invalid {cls.__name__}: {e.errors(include_url=False)}") from None

    def to_wire(self) -> dict:
        return self.model_dump(mode="json")


class BlockRange(Schema):
    """Blocks [start, end) of a model."""

    start: int = Field(ge=0)
    end: int

    @model_validator(mode="after")
    def _non_empty(self):
        if self.end <= self.start:
            raise ValueError(f"empty block range {self.start}:{self.end}")
        return self

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class Request(Schema):
    """Every request names its blocks, and the wire format in which it sends hidden states (and their gradients)
    and wants them back; None (older clients): as they are."""

    version: int = PROTOCOL_VERSION
    blocks: BlockRange
    wire: str | None = None

    @field_validator("wire")
    @classmethod
    def _known_wire(cls, wire: str | None) -> str | None:
        return check_wire_format(wire)


MAX_LORA_RANK = 256


class LoraEntry(Schema):
    """One low-rank update a client sends for one linear layer of one block. Its weights travel flattened in a
    single tensor with every other entry's, in order: A (rank, in_features), then B (out_features, rank)."""

    block: int = Field(ge=0)
    module: str  # a linear layer of the block, by its HF leaf name: q_proj, k_proj, ..., down_proj
    rank: int = Field(gt=0, le=MAX_LORA_RANK)
    scale: float = Field(allow_inf_nan=False)


class Tuning(Schema):
    """What a client adds to the served blocks. Tensors follow the request's own, in this order:
    deep prompts (blocks, batch or 1, prefix length, hidden) if `prompts`, then the flat LoRA weights if `lora`."""

    adapter: str | None = None  # a LoRA adapter this server loaded with --adapters
    prompts: bool = False
    lora: tuple[LoraEntry, ...] = ()


class ForwardRequest(Request, Tuning):
    """rpc_forward: tensors are hidden (B, T, H), position_ids (B, T), key_mask (B, T), then the tuning tensors.
    The reply holds the output hidden states (B, T, H). A training client names the pass (`graph_id`): the server
    may keep its autograd graph for the backward of the same name, which then need not recompute it."""

    graph_id: str | None = Field(default=None, max_length=64)


class BackwardRequest(ForwardRequest):
    """rpc_backward: the forward's tensors plus the gradient w.r.t. its output (B, T, H), last. The reply holds the
    gradients w.r.t. the hidden states, then w.r.t. the deep prompts and the LoRA weights if they were sent."""


class OpenSession(Request, Tuning):
    """First message of rpc_inference: reserve a KV cache for batch_size x max_length tokens. Its tuning tensors
    (deep prompts, LoRA weights) hold for the whole session. With a `session_id`, the previous server of the chain
    may push this session's inputs to it directly (rpc_push). A full server answers ServerBusy; one that asks again
    with the same `ticket` keeps its place in the server's line for room."""

    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    session_id: str | None = Field(default=None, min_length=8, max_length=64)
    ticket: str | None = Field(default=None, min_length=8, max_length=64)


class PushTarget(Schema):
    """A later server of a chain and the id of the client's session there."""

    peer: str = Field(max_length=128)  # base58 peer id
    session_id: str = Field(min_length=8, max_length=64)


class Step(Schema):
    """Metadata of every rpc_inference message after the first: the session position of the step's first token (below
    the session's position, the session rewinds to it: speculative decoding drops rejected drafts), whether the client
    sends a step it also had pushed (`resent`: skipped if already served from the push), and the servers after this one,
    in chain order, to which the output should be pushed at once rather than waiting for the client to pass it on. A
    `max_length` above the session's grows its KV cache to it before the step (ServerBusy if there is no room)."""

    position: int | None = Field(default=None, ge=0)
    resent: bool = False
    max_length: int | None = Field(default=None, gt=0)
    push_to: tuple[PushTarget, ...] = Field(default=(), max_length=64)


class Push(Step):
    """rpc_push: a step's input handed over by the previous server of the chain, for one of this server's sessions.
    Tensors: hidden (B, T, H), position_ids (B, T), key_mask (B, T)."""

    version: int = PROTOCOL_VERSION
    session_id: str = Field(min_length=8, max_length=64)
    position: int = Field(ge=0)


class Reply(Schema):
    """Metadata of every reply; `error` set means the request failed and `error_kind` names why."""

    error: str | None = None
    error_kind: str | None = None


# P2P handler names; every server registers them, clients call them by name.
RPC_INFO = "meadow.rpc_info"
RPC_FORWARD = "meadow.rpc_forward"
RPC_INFERENCE = "meadow.rpc_inference"
RPC_BACKWARD = "meadow.rpc_backward"
RPC_PUSH = "meadow.rpc_push"
RPC_LEAVE_LINE = "meadow.rpc_leave_line"  # a session waits no more for room here: the request's uid is its ticket
