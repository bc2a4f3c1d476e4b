"""Decoding steps handed from server to server: the output of one server of a chain goes straight to the next
(rpc_push) instead of back to the client and out again, which saves a client round trip per hop. The client still
sends every step itself as well, so a push that never arrives only costs that saving; each step is served once,
from whichever copy of its input comes first."""

from __future__ import annotations

import asyncio
import logging
from functools import lru_cache

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from meadow.wire import RPC_PUSH, BadRequest, Push, PushTarget, ServerBusy, pack

logger = logging.getLogger(__name__)
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden, position_ids, key_mask


PUSH_WINDOW = 64  # a pushed step may start at most this many tokens after the session's position (a few steps ahead)
MAX_PUSHED_TOKENS = 4  # pushes carry decoding steps only: at most this many new tokens per row
# a session pushes every step to the same few peers, and decoding base58 showed in the event loop's profile
peer_id = lru_cache(maxsize=1024)(PeerID.from_base58)


def check_push(inputs: Inputs, position: int, batch_size: int, served: int, max_length: int) -> None:
    """BadRequest if a step pushed for `position` does not fit the session it names (opened for `batch_size` rows and
    `max_length` tokens, `served` stored so far): it is refused before the session sees it, so a bad or hostile push
    never ends the session of the client who opened it."""
    batch, length = inputs[0].shape[:2]
    if batch != batch_size:
        raise BadRequest(f"pushed step has {batch} rows, the session was opened for batch size {batch_size}")
    if length > MAX_PUSHED_TOKENS:
        raise BadRequest(f"pushed step of {length} tokens: pushes carry decoding steps of at most {MAX_PUSHED_TOKENS}")
    if position + length > max_length:
        raise BadRequest(f"pushed step at {position}:{position + length} exceeds the session's max_length {max_length}")
    if position > served + PUSH_WINDOW:
        raise BadRequest(f"pushed step at position {position}, over {PUSH_WINDOW} tokens past the session's {served}")


class Inbox:
    """Inputs pushed to one session by the previous server, by the session position they start at."""

    def __init__(self, limit: int = 8):
        self.limit = limit  # a pusher cannot make us hold more than this many steps
        self.items: dict[int, tuple[Inputs, tuple[PushTarget, ...]]] = {}
        self.changed = asyncio.Event()

    def put(self, position: int, inputs: Inputs, push_to: tuple[PushTarget, ...], served: int) -> None:
        """Keep a pushed step; one for a position already served (`served` tokens are stored) is dropped."""
        if position < served:
            return
        if len(self.items) >= self.limit and position not in self.items:
            raise ServerBusy(f"this session already holds {self.limit} pushed steps")
        self.items[position] = (inputs, push_to)
        self.changed.set()

    async def get(self, position: int) -> tuple[Inputs, tuple[PushTarget, ...]]:
        """The pushed step that starts at `position`, once it is here."""
        while position not in self.items:
            self.changed.clear()
            await self.changed.wait()
        for stale in [p for p in self.items if p < position]:
            del self.items[stale]
        return self.items.pop(position)


async def push(
    p2p: P2P, targets: tuple[PushTarget, ...], position: int, inputs: Inputs, wire: str | None = None, timeout: float = 10.0
) -> None:
    """Hand a step's output to the first of `targets` (with the rest, for it to pass on), its hidden states in the
    client's `wire` format. Failures are only logged: the client sends the step too."""
    target, rest = targets[0], targets[1:]
    meta = Push(session_id=target.session_id, position=position, push_to=rest).to_wire()
    try:
        messages = pack(list(inputs), meta, runtime_pb2.ExpertRequest, wire)
        if len(messages) != 1:
            return  # too big for one message: pushing is for decoding steps; the client passes this one on
        peer = peer_id(target.peer)
        reply = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer, RPC_PUSH, messages[0], runtime_pb2.ExpertResponse), timeout
        )
        if reply.tensors or reply.metadata:  # only errors carry anything
            logger.debug(f"push to {target.peer} refused: {reply.metadata!r}")
    except Exception as e:
        logger.debug(f"push to {target.peer} failed: {e!r}")
