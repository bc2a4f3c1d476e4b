"""What crosses the wire between clients and servers: tensors, framing, request schemas, errors."""

from meadow.wire.errors import BadRequest, MeadowError, RemoteError, ServerBusy, ServerLeaving, WrongServer
from meadow.wire.schemas import (
    PROTOCOL_VERSION,
    MAX_LORA_RANK,
    WIRE_FORMATS,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_LEAVE_LINE,
    RPC_PUSH,
    BackwardRequest,
    BlockRange,
    ForwardRequest,
    LoraEntry,
    OpenSession,
    Push,
    PushTarget,
    Reply,
    Request,
    Step,
    Tuning,
    check_wire_format,
    default_wire,
)
from meadow.wire.tensors import deserialize, drain_requests, pack, serialize, unpack
