"""The server's RPCs. Every request is validated here, once; a bad one gets a clear error reply and
nothing else changes, so one client's mistake never reaches another client's session."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Hashable

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from meadow.models import BlockConfig, linear_shapes
from meadow.server.compute_loop import ComputeLoop
from meadow.server.graph_cache import GraphCache
from meadow.server.memory import CacheBudget, Held
from meadow.server.push import Inbox, Inputs, Pusher, check_push
from meadow.server.span import Pieces, Session, Span, row_groups
from meadow.server.tuning import FLOAT_DTYPES, TuningInputs, check_tuning
from meadow.swarm.allow_list import NotAllowed, guard
from meadow.wire import (
    PROTOCOL_VERSION,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_LEAVE_LINE,
    RPC_PUSH,
    BackwardRequest,
    BadRequest,
    ForwardRequest,
    MeadowError,
    OpenSession,
    Push,
    Reply,
    Request,
    ServerBusy,
    ServerLeaving,
    Step,
    WrongServer,
    deserialize,
    drain_requests,
    pack,
    serialize,
    unpack,
)

logger = logging.getLogger(__name__)
Requests = AsyncIterator[runtime_pb2.ExpertRequest]
Responses = AsyncIterator[runtime_pb2.ExpertResponse]
DECODING_LENGTH = 4  # steps of at most this many new tokens per row are decoding steps: they join every batched pass


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server."""

    max_batch_tokens: int = 8192  # batch x new tokens in one forward or inference step
    max_length: int = 8192  # longest inference session
    max_batch_size: int = 256
    idle_timeout: float = 300.0  # seconds an inference session may wait between steps before it is closed
    # a session idle this long is closed when others need its KV cache (0: never); its client rebuilds it on its return
    reclaim_idle: float = 15.0
    max_prompt_tokens: int = 256  # longest deep prompt (prefix) a client may send
    max_lora_rank: int = 64  # highest rank of a client's own LoRA weights
    graph_cache_bytes: int = 1 << 30  # activations of training clients' forward passes kept for their backward
    chunk_tokens: int = 256  # prefill, forward and training tokens per batched pass: what decoding may wait behind
    max_peer_cache_share: float = 0.75  # of the KV cache token slots, the most one peer may hold
    max_peer_sessions: int = 128  # inference sessions one peer may hold open at once
    max_peer_requests: int = 16  # forward/backward requests of one peer being read or run at once


class BlockHandler:
    """Serves rpc_info, rpc_leave_line, rpc_forward, rpc_backward, rpc_inference and rpc_push for the server's current
    Span (None while it loads or moves). All compute goes through one ComputeLoop, which batches every client's work."""

    def __init__(self, config: BlockConfig, budget: CacheBudget, limits: Limits, info: Callable[[], dict]):
        self.config, self.budget, self.limits, self.info = config, budget, limits, info
        self.span: Span | None = None
        self.compute = ComputeLoop(limits.chunk_tokens, limits.max_batch_tokens)
        self.requests: Counter[Hashable] = Counter()  # forward/backward requests being read or run, by peer
        self.streams: Counter[Hashable] = Counter()  # inference streams open or opening, by peer
        self.pushers: Counter[Hashable] = Counter()  # push streams open to us, by peer
        self.graphs = GraphCache(limits.graph_cache_bytes)  # training clients' forward graphs, for their backward
        self.max_request_bytes = self._max_request_bytes(hosted=1)
        self.leaving: asyncio.Future[str] | None = None  # resolved (with the reason) when the current span's sessions must end
        self.sessions: set[object] = set()  # open sessions that have not yet been told why they end
        self.inboxes: dict[str, tuple[Inbox, Session]] = {}  # sessions that accept pushed steps, by session id
        # sessions waiting for their next step: since when (loop time), their slots, and the future that closes them
        self.idle: dict[Session, tuple[float, Held, asyncio.Future]] = {}
        budget.when_short = self.reclaim_idle
        self.points = None  # a PointsService (meadow/points/service.py): requesters' points set their priority

    def serve(self, span: Span) -> None:
        """Start serving `span`; sessions opened from now on belong to it."""
        self.span, self.leaving = span, asyncio.get_running_loop().create_future()
        self.max_request_bytes = self._max_request_bytes(len(span.blocks))

    def release(self, reason: str) -> None:
        """Stop serving the current span: refuse new requests and end every open session with a ServerLeaving
        reply saying `reason`, so that its client fails over at once instead of after a timeout."""
        self.span = None
        self.graphs.clear()
        if self.leaving is not None and not self.leaving.done():
            self.leaving.set_result(reason)

    async def sessions_told(self, timeout: float = 1.0) -> bool:
        """Wait (up to `timeout`) until every session ended by `release` has been sent its reply."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return not self.sessions

    def _max_request_bytes(self, hosted: int) -> int:
        """The biggest legal request: hidden states and their gradient in float32 plus positions and mask, the
        longest deep prompts and the highest-rank LoRA on every linear layer of every hosted block, with slack."""
        config, limits = self.config, self.limits
        tokens = limits.max_batch_tokens * (config.hidden_size * 8 + 16)
        prompts = hosted * limits.max_prompt_tokens * config.hidden_size * 4
        lora = hosted * sum(i + o for i, o in linear_shapes(config).values()) * limits.max_lora_rank * 4
        return tokens + prompts + lora + 65536

    async def register(self, p2p: P2P, allowed: frozenset[PeerID] | None = None) -> None:
        """Serve our RPCs on `p2p`; in a private swarm, only to the `allowed` peers (others get NotAllowed)."""
        self.pusher = Pusher(p2p)  # to push decoding steps on to the next server of a chain

        def refusal(error: NotAllowed) -> runtime_pb2.ExpertResponse:
            return pack([], Reply(error=str(error), error_kind=type(error).__name__).to_wire(), runtime_pb2.ExpertResponse)[0]

        def refuse_info(error: NotAllowed):
            raise error  # rpc_info's reply has no error field: hivemind sends the caller the message

        await p2p.add_protobuf_handler(RPC_INFO, guard(self.rpc_info, allowed, refuse_info), runtime_pb2.ExpertUID)
        leave_line = guard(self.rpc_leave_line, allowed, refuse_info)
        await p2p.add_protobuf_handler(RPC_LEAVE_LINE, leave_line, runtime_pb2.ExpertUID)
        requests, sessions = self.limits.max_peer_requests, self.limits.max_peer_sessions
        for name, handler in (
            (RPC_PUSH, self._per_peer(self.rpc_push, self.pushers, sessions, "push streams")),
            (RPC_FORWARD, self._per_peer(self.rpc_forward, self.requests, requests, "requests in progress")),
            (RPC_BACKWARD, self._per_peer(self.rpc_backward, self.requests, requests, "requests in progress")),
            (RPC_INFERENCE, self._per_peer(self.rpc_inference, self.streams, sessions, "inference sessions")),
        ):
            await p2p.add_protobuf_handler(
                name, guard(handler, allowed, refusal), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=msgpack.packb(self.info()))

    async def rpc_leave_line(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        self.budget.leave(context.remote_id, request.uid)
        return runtime_pb2.ExpertInfo()

    async def rpc_forward(self, requests: Requests, context: P2PContext) -> Responses:
        try:
            tensors, (span, request) = await self._receive(requests, ForwardRequest)
            (hidden, position_ids, key_mask), tuning, _ = self._check_run(span, request, tensors)
            chunk, peer = self.limits.chunk_tokens, context.remote_id
            if request.graph_id is None:
                output = await self._request(span.forward_pieces(hidden, position_ids, key_mask, request.blocks, tuning, chunk), span, peer)
            else:
                output, graphs = await self._request(
                    span.graph_pieces(hidden, position_ids, key_mask, request.blocks, tuning, chunk), span, peer
                )
                for i, graph in enumerate(graphs):  # one per group of rows, as the backward will run them
                    self.graphs.put((peer, request.graph_id, i), graph)
            for response in pack([output], Reply().to_wire(), runtime_pb2.ExpertResponse, request.wire):
                yield response
        except MeadowError as e:
            yield self._error(e, context)
        await drain_requests(requests)

    async def rpc_backward(self, requests: Requests, context: P2PContext) -> Responses:
        try:
            tensors, (span, request) = await self._receive(requests, BackwardRequest)
            (hidden, position_ids, key_mask), tuning, (grad_output,) = self._check_run(span, request, tensors, "grad_output")
            if grad_output.shape != hidden.shape or grad_output.dtype not in FLOAT_DTYPES:
                raise BadRequest(f"grad_output must be a float tensor of shape {tuple(hidden.shape)}, got "
                                 f"{grad_output.dtype} {tuple(grad_output.shape)}")  # fmt: skip
            if not torch.isfinite(grad_output).all():
                raise BadRequest("grad_output contains NaN or infinity")
            chunk, peer = self.limits.chunk_tokens, context.remote_id
            groups = len(row_groups(*hidden.shape[:2], chunk))
            keys = [(peer, request.graph_id, i) for i in range(groups)]
            graphs = [None if request.graph_id is None else self.graphs.pop(key) for key in keys]
            pieces = span.backward_pieces(hidden, position_ids, key_mask, request.blocks, grad_output, tuning, graphs, chunk)
            grads = await self._request(pieces, span, peer)
            for response in pack(grads, Reply().to_wire(), runtime_pb2.ExpertResponse, request.wire):
                yield response
        except MeadowError as e:
            yield self._error(e, context)
        await drain_requests(requests)

    async def _request(self, pieces: Pieces, span: Span, peer: Hashable):
        """A forward or backward request's result from the compute loop."""
        return await self.compute.run(pieces, span, peer, self.priority(peer))

    def _per_peer(self, handler: Callable, counts: Counter, limit: int, what: str) -> Callable:
        """`handler` (a streaming RPC) that one peer may run at most `limit` times at once; beyond, ServerBusy. It
        holds from the first byte read, so no peer makes the server buffer more than `limit` requests at once."""

        async def bounded(requests: Requests, context: P2PContext) -> Responses:
            peer = context.remote_id
            if counts[peer] >= limit:
                yield self._error(ServerBusy(f"you already have {counts[peer]} {what} here, the most one peer may"), context)
                await drain_requests(requests)
                return
            counts[peer] += 1
            try:
                async with aclosing(handler(requests, context)) as replies:  # its own clean-up runs now, not at GC
                    async for reply in replies:
                        yield reply
            finally:
                counts[peer] -= 1
                if not counts[peer]:
                    del counts[peer]

        return bounded

    def priority(self, peer: Hashable) -> int:
        """Where a peer's work goes in the compute queue: higher first, by the points of the owner it belongs to (0
        for anonymous peers and without points)."""
        return self.points.priority(peer) if self.points is not None else 0

    async def rpc_inference(self, requests: Requests, context: P2PContext) -> Responses:
        me, registered = object(), None  # registered: our session id in self.inboxes
        try:
            message = await unpack(requests, self.max_request_bytes)
            if message is None:
                return
            span, request = self._check_request(OpenSession.from_wire(message[1]))
            leaving = self.leaving
            if request.max_length > self.limits.max_length:
                raise BadRequest(f"max_length {request.max_length} exceeds this server's limit {self.limits.max_length}")
            if request.batch_size > self.limits.max_batch_size:
                raise BadRequest(f"batch size {request.batch_size} exceeds this server's limit {self.limits.max_batch_size}")
            tuning = self._check_tuning(span, request, message[0])
            if request.session_id is not None and request.session_id in self.inboxes:
                raise BadRequest(f"session id {request.session_id!r} is already in use here")
            peer = context.remote_id
            tokens = request.batch_size * request.max_length
            with self.budget.reserve(tokens, peer, request.ticket, self.priority(peer)) as held:
                # zeroing a big KV cache takes a while: not on the event loop
                session = await asyncio.get_running_loop().run_in_executor(
                    None, Session.open, span, request.blocks, request.batch_size, request.max_length, tuning
                )
                inbox = Inbox()
                if request.session_id is not None:
                    if request.session_id in self.inboxes:  # taken while the cache was made
                        raise BadRequest(f"session id {request.session_id!r} is already in use here")
                    registered = request.session_id
                    self.inboxes[registered] = (inbox, session)
                self.sessions.add(me)
                yield pack([], Reply().to_wire(), runtime_pb2.ExpertResponse)[0]  # the session is open
                steps = self._serve_steps(requests, session, held, span, inbox, peer, leaving, request.wire)
                async for output in steps:
                    for response in pack([output], Reply().to_wire(), runtime_pb2.ExpertResponse, request.wire):
                        yield response
        except MeadowError as e:
            yield self._error(e, context)
            self.sessions.discard(me)  # the client has its answer: a leaving server need not wait for the drain
            await drain_requests(requests)
        finally:
            self.sessions.discard(me)
            if registered is not None:
                del self.inboxes[registered]

    async def _serve_steps(
        self,
        requests: Requests,
        session: Session,
        held: Held,
        span: Span,
        inbox: Inbox,
        peer: Hashable,
        leaving: asyncio.Future,
        wire: str | None,
    ) -> AsyncIterator[torch.Tensor]:
        """A session's steps in position order, each from the client or pushed by the previous server, whichever
        comes first, run by the compute loop; yields each step's output and pushes it on (in the session's `wire`
        format) if the step asks."""
        receive: asyncio.Future | None = None  # the client's next message, read across pushed steps
        try:
            while True:
                if receive is None:
                    receive = asyncio.ensure_future(unpack(requests, self.max_request_bytes))
                pushed = await self._next_step(receive, inbox, session, held, leaving)
                if pushed is not None:
                    inputs, targets = pushed
                    if wire is not None:  # as if the client had sent it: the pusher encoded it in its own format
                        inputs = (deserialize(serialize(inputs[0], wire)), *inputs[1:])
                else:
                    message, receive = receive.result(), None
                    if message is None:
                        return  # the client closed the session
                    inputs, step = self._check_step(*message)
                    if step.position is not None and step.position < session.position:
                        if step.resent:
                            continue  # already served from a push: its reply has gone
                        session.rewind(step.position)  # drafts the client rejected (speculative decoding)
                    if step.position not in (None, session.position):
                        raise BadRequest(
                            f"step at position {step.position}, the session holds {session.position} tokens: a step may "
                            "rewind to an earlier position, never skip ahead"
                        )
                    if step.max_length is not None and step.max_length > session.max_length:
                        await self._grow(session, held, step.max_length, session.position + inputs[0].shape[1])
                    targets = step.push_to
                position = session.position
                decoding = inputs[0].shape[1] <= DECODING_LENGTH
                pieces = session.step_pieces(*inputs, self.limits.chunk_tokens)
                output = await self.compute.run(pieces, span, peer, self.priority(peer), decoding, session)
                if targets:
                    self.pusher.push(targets, position, (output, inputs[1], inputs[2]), wire)
                yield output
        finally:
            self.compute.forget(session)
            if receive is not None and not receive.done():
                receive.cancel()
                await asyncio.wait((receive,))  # let it unwind before anyone reads the stream again

    async def _grow(self, session: Session, held: Held, max_length: int, needed: int) -> None:
        """Let `session` hold `max_length` tokens per row, or as many as our limit allows if its step (`needed` tokens
        with those before it) fits in that: its slots first (ServerBusy if there is no room), then its cache, copied
        into a bigger one off the event loop."""
        if needed > self.limits.max_length:
            raise BadRequest(f"the session needs {needed} tokens, past this server's limit {self.limits.max_length}")
        max_length = min(max_length, self.limits.max_length)  # the client's slack past our limit: not needed yet
        if max_length <= session.max_length:
            return
        self.budget.grow(held, session.batch_size * (max_length - session.max_length))
        await asyncio.get_running_loop().run_in_executor(None, session.grow, max_length)

    def _check_step(self, tensors: list[torch.Tensor], meta: dict) -> tuple[Inputs, Step]:
        if len(tensors) != 3:
            raise BadRequest(f"expected 3 tensors (hidden, position_ids, key_mask), got {len(tensors)}")
        return self._check_inputs(tensors), Step.from_wire(meta)

    async def _next_step(
        self, receive: asyncio.Future, inbox: Inbox, session: Session, held: Held, leaving: asyncio.Future
    ):
        """Wait for the client's next message (returns None: read it from `receive`) or a step pushed to `session` for
        its position (returns it). ServerLeaving as soon as the server leaves, BadRequest if nothing comes for the idle
        timeout, ServerBusy if the session is closed meanwhile to give its room to others (`reclaim_idle`)."""
        if leaving.done():
            raise ServerLeaving(leaving.result())
        loop = asyncio.get_running_loop()
        pushed, reclaimed = asyncio.ensure_future(inbox.get(session.position)), loop.create_future()
        self.idle[session] = (loop.time(), held, reclaimed)
        try:
            await asyncio.wait(
                (receive, pushed, leaving, reclaimed), timeout=self.limits.idle_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
        finally:
            del self.idle[session]
            if not pushed.done():
                pushed.cancel()
        if leaving.done():  # even if a step came in too: the client will resend it elsewhere
            raise ServerLeaving(leaving.result())
        if pushed.done() and not pushed.cancelled():
            return pushed.result()
        if receive.done():
            return None
        if reclaimed.done():
            raise ServerBusy(
                f"session idle for {reclaimed.result():.0f} s closed: others needed its KV cache (send its tokens "
                "again)"
            )
        raise BadRequest(f"session idle for over {self.limits.idle_timeout:.0f} s; it was closed")

    def reclaim_idle(self, slots: int) -> None:
        """Others need `slots` more KV-cache slots than are free: close sessions idle for `limits.reclaim_idle`
        seconds or more, longest idle first, until they free that many (their clients rebuild them if they return)."""
        if self.limits.reclaim_idle <= 0:
            return
        now = asyncio.get_running_loop().time()
        for since, held, reclaimed in sorted(self.idle.values(), key=lambda idle: idle[0]):
            if slots <= 0 or now - since < self.limits.reclaim_idle:
                break
            slots -= held.tokens  # a session closed already frees its slots in a moment too
            if not reclaimed.done():
                logger.info(f"closing a session idle for {now - since:.0f} s: others need its {held.tokens} slots")
                reclaimed.set_result(now - since)

    async def rpc_push(self, requests: Requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Decoding steps' inputs, pushed into our sessions by a server before us in clients' chains: one message
        each on a stream it keeps open. A refused push is answered with its error; the others with nothing."""
        async for request in requests:
            try:
                await self._take_push(request)
            except MeadowError as e:
                yield self._error(e, context)

    async def _take_push(self, request: runtime_pb2.ExpertRequest) -> None:
        message = await unpack(_single(request), self.max_request_bytes)
        if message is None:
            raise BadRequest("empty push")
        tensors, meta = message
        pushed = Push.from_wire(meta)
        if pushed.version != PROTOCOL_VERSION:
            raise BadRequest(f"peer speaks protocol {pushed.version}, this server speaks {PROTOCOL_VERSION}")
        if pushed.session_id not in self.inboxes:
            raise BadRequest("no session with this id here (it ended, or never began)")
        if len(tensors) != 3:
            raise BadRequest(f"expected 3 tensors (hidden, position_ids, key_mask), got {len(tensors)}")
        inbox, session = self.inboxes[pushed.session_id]
        inputs = self._check_inputs(tensors)
        check_push(inputs, pushed.position, session.batch_size, session.position, session.max_length)
        inbox.put(pushed.position, inputs, pushed.push_to, session.position)

    async def _receive(
        self, requests: Requests, schema: type[ForwardRequest]
    ) -> tuple[list[torch.Tensor], tuple[Span, ForwardRequest]]:
        """The one message of a forward or backward request: its tensors, the span that serves it and its metadata."""
        message = await unpack(requests, self.max_request_bytes)
        if message is None:
            raise BadRequest("empty request")
        tensors, meta = message
        return tensors, self._check_request(schema.from_wire(meta))

    def _check_request(self, request: Request) -> tuple[Span, Request]:
        if request.version != PROTOCOL_VERSION:
            raise BadRequest(f"client speaks protocol {request.version}, this server speaks {PROTOCOL_VERSION}")
        span = self.span
        if span is None:
            raise WrongServer(f"blocks {request.blocks} requested, this server holds no blocks right now (loading or moving)")
        hosted = span.range
        if not (hosted.start <= request.blocks.start and request.blocks.end <= hosted.end):
            raise WrongServer(f"blocks {request.blocks} requested, this server holds blocks {hosted}")
        return span, request

    def _check_run(
        self, span: Span, request: ForwardRequest, tensors: list[torch.Tensor], *extra: str
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], TuningInputs, list[torch.Tensor]]:
        """Split a forward/backward request's tensors into the checked inputs, tuning, and `extra` ones at the end."""
        names = ["hidden", "position_ids", "key_mask"] + ["deep prompts"] * request.prompts
        names += ["LoRA weights"] * bool(request.lora) + list(extra)
        if len(tensors) != len(names):
            raise BadRequest(f"expected {len(names)} tensors ({', '.join(names)}), got {len(tensors)}")
        inputs = self._check_inputs(tensors[:3])
        tuning = self._check_tuning(span, request, tensors[3 : len(names) - len(extra)])
        if tuning.prompts is not None and tuning.prompts.shape[1] > inputs[0].shape[1]:
            raise BadRequest(f"deep prompts of {tuning.prompts.shape[1]} tokens for {inputs[0].shape[1]} tokens")
        return inputs, tuning, tensors[len(names) - len(extra) :]

    def _check_tuning(self, span: Span, request: ForwardRequest | OpenSession, tensors: list[torch.Tensor]) -> TuningInputs:
        limits = self.limits
        return check_tuning(
            request, request.blocks, tensors, span.config, span.adapters, span.first,
            limits.max_prompt_tokens, limits.max_lora_rank,
        )  # fmt: skip

    def _check_inputs(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, position_ids, key_mask = tensors
        hidden_size = self.config.hidden_size
        if hidden.ndim != 3 or hidden.shape[-1] != hidden_size or hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise BadRequest(f"hidden states must have shape (batch, length, {hidden_size}), got {tuple(hidden.shape)}")
        if hidden.dtype not in FLOAT_DTYPES:
            raise BadRequest(f"hidden states must be float32, float16 or bfloat16, got {hidden.dtype}")
        batch, length = hidden.shape[:2]
        if batch * length > self.limits.max_batch_tokens:
            raise BadRequest(f"{batch}x{length} tokens exceed this server's limit of {self.limits.max_batch_tokens} per request")
        if position_ids.shape != (batch, length) or position_ids.dtype not in (torch.int64, torch.int32):
            raise BadRequest(f"position_ids must be int64 of shape {(batch, length)}, got {position_ids.dtype} {tuple(position_ids.shape)}")
        if key_mask.shape != (batch, length) or key_mask.dtype != torch.bool:
            raise BadRequest(f"key_mask must be bool of shape {(batch, length)}, got {key_mask.dtype} {tuple(key_mask.shape)}")
        if position_ids.min() < 0 or position_ids.max() >= 2**24:
            raise BadRequest("position_ids must lie in [0, 2**24)")
        if not torch.isfinite(hidden).all():
            raise BadRequest("hidden states contain NaN or infinity")
        return hidden, position_ids.long(), key_mask

    @staticmethod
    def _error(error: MeadowError, context: P2PContext) -> runtime_pb2.ExpertResponse:
        # a full server is told so again each second by every client that waits for room: not worth a line each
        level = logging.DEBUG if isinstance(error, ServerBusy) else logging.INFO
        logger.log(level, f"refused a request from {context.remote_id}: {error}")
        reply = Reply(error=str(error), error_kind=type(error).__name__)
        return pack([], reply.to_wire(), runtime_pb2.ExpertResponse)[0]


async def _single(message):
    yield message
