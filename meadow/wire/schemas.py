"""Typed metadata of every request and reply. Unknown fields are ignored so that newer peers can talk to older ones."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from meadow.wire.errors import BadRequest

PROTOCOL_VERSION = 1


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
    version: int = PROTOCOL_VERSION
    blocks: BlockRange


class ForwardRequest(Request):
    """rpc_forward: tensors are hidden (B, T, H), position_ids (B, T), key_mask (B, T)."""


class OpenSession(Request):
    """First message of rpc_inference: reserve a KV cache for batch_size x max_length tokens."""

    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)


class Reply(Schema):
    """Metadata of every reply; `error` set means the request failed and `error_kind` names why."""

    error: str | None = None
    error_kind: str | None = None


# P2P handler names; every server registers them, clients call them by name.
RPC_INFO = "meadow.rpc_info"
RPC_FORWARD = "meadow.rpc_forward"
RPC_INFERENCE = "meadow.rpc_inference"
