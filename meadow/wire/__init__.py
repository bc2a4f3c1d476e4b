"""What crosses the wire between clients and servers: tensors, framing, request schemas, errors."""

from meadow.wire.errors import BadRequest, MeadowError, RemoteError, ServerBusy, ServerLeaving, WrongServer
from meadow.wire.schemas import (
    PROTOCOL_VERSION,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    BlockRange,
    ForwardRequest,
    OpenSession,
    Reply,
    Request,
)
from meadow.wire.tensors import deserialize, pack, serialize, unpack
