"""Decoding steps handed from server to server: the output of one server of a chain goes straight to the next
(rpc_push, a stream each server keeps open to each next server) instead of back to the client and out again, which
saves a client round trip per hop. A client that does not get a pushed step's output in time sends the step itself,
so a push that never arrives only costs that saving; each step is served once, from whichever copy comes first."""

from __future__ import annotations

import asyncio
import logging
from functools import lru_cache

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from meadow.wire import RPC_PUSH, BadRequest, Push, PushTarget, ServerBusy, pack
from meadow.wire.stream import open_stream

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


class Pusher:
    """This server's open push streams, one per next server: a pushed step is one message on it, answered only if
    refused. A unary call per push (request and reply) cost twice the CPU of a message on an open stream, counting
    both processes and both p2pd (benchmarks/p2p_message_cost.py: 0.91-0.99 ms against 0.34-0.46). Failures are only
    logged: the client sends a step itself when its push does not arrive."""

    def __init__(self, p2p: P2P, idle_seconds: float = 60.0, max_queued: int = 64):
        self.p2p, self.idle_seconds, self.max_queued = p2p, idle_seconds, max_queued
        self.queues: dict[PeerID, asyncio.Queue] = {}  # messages waiting for each peer's stream

    def push(self, targets: tuple[PushTarget, ...], position: int, inputs: Inputs, wire: str | None = None) -> None:
        """Hand a step's output to the first of `targets` (with the rest, for it to pass on), its hidden states in
        the client's `wire` format."""
        target, rest = targets[0], targets[1:]
        meta = Push(session_id=target.session_id, position=position, push_to=rest).to_wire()
        try:
            messages = pack(list(inputs), meta, runtime_pb2.ExpertRequest, wire)
            peer = peer_id(target.peer)
        except Exception as e:
            logger.debug(f"push to {target.peer} failed: {e!r}")
            return
        if len(messages) != 1:
            return  # too big for one message: pushing is for decoding steps; the client passes this one on
        queue = self.queues.get(peer)
        if queue is None:
            queue = self.queues[peer] = asyncio.Queue(self.max_queued)
            asyncio.ensure_future(self._stream(peer, queue))
        if queue.full():
            logger.debug(f"push to {target.peer} dropped: {self.max_queued} pushes wait for its stream")
            return
        queue.put_nowait(messages[0])

    async def _stream(self, peer: PeerID, queue: asyncio.Queue) -> None:
        """Send `queue`'s messages to `peer` on one stream, until it breaks or stays idle for idle_seconds."""

        async def messages():
            while True:
                try:
                    async with asyncio.timeout(self.idle_seconds):  # unlike wait_for, no task per message
                        message = await queue.get()
                except TimeoutError:
                    return
                yield message

        try:
            replies = await open_stream(self.p2p, peer, RPC_PUSH, messages(), runtime_pb2.ExpertResponse)
            async for reply in replies:  # only refusals come back
                logger.debug(f"push to {peer} refused: {reply.metadata!r}")
        except Exception as e:
            logger.debug(f"push stream to {peer} ended: {e!r}")
        finally:
            if self.queues.get(peer) is queue:
                del self.queues[peer]
