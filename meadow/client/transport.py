"""Talking to one server: a forward call and an inference stream, every reply checked. Async; the sync API wraps it."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Sequence, TypeVar

import numpy as np
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from meadow.wire import (
    RPC_FORWARD, RPC_INFERENCE, BackwardRequest, BadRequest, ForwardRequest, MeadowError, OpenSession, RemoteError,
    Reply, Request, pack, unpack,
)  # fmt: skip
from meadow.wire.stream import open_stream
from meadow.wire.tensors import TRAVEL_DTYPES

T = TypeVar("T")
MAX_REPLY_BYTES = 2**34  # replies come from servers we chose; the size cap guards servers, not clients


class BadReply(MeadowError):
    """A server's reply is malformed: undecodable, or not the tensors the request asks for (count, shape, dtype), or
    values that are not finite. The server failed: another one may do better."""

    what = "bad reply"

    def __init__(self, message: str, peer: PeerID | str):
        super().__init__(f"{self.what} from {peer}: {message}")
        self.peer = peer


def check_reply(
    tensors: Sequence[torch.Tensor], expected: Sequence[torch.Tensor] | None, peer: PeerID
) -> list[torch.Tensor]:
    """`tensors` if they have the count, shapes and dtypes of `expected` (None: any) and only finite values;
    BadReply otherwise. Every reply a client uses passes through here: what a stranger returns is checked in one place."""
    if expected is not None and len(tensors) != len(expected):
        raise BadReply(f"{len(tensors)} tensors, expected {len(expected)}", peer)
    for index, got in enumerate(tensors):
        like = expected[index] if expected is not None else got
        if got.shape != like.shape or got.dtype != like.dtype:
            raise BadReply(f"tensor {index} is {_describe(got)}, expected {_describe(like)}", peer)
        if got.is_floating_point() and not _all_finite(got):
            raise BadReply(f"tensor {index} holds NaN or infinite values", peer)
    return list(tensors)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. numpy's check of a small CPU tensor costs half of torch's (two dispatched ops) when
    caches are cold, as they are for the one reply per server per generated token."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16) and not tensor.requires_grad:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


def from_wire(
    tensors: list[torch.Tensor], expected: Sequence[torch.Tensor] | None, wire: str | None
) -> list[torch.Tensor]:
    """A reply's hidden states (or their gradient, the first tensor) come back in the wire format's dtype; the caller
    gets them in the dtype it sent. Anything else is left for check_reply to judge."""
    if wire is None or not expected or not tensors or not expected[0].is_floating_point():
        return tensors
    if tensors[0].dtype != TRAVEL_DTYPES[wire]:
        return tensors
    return [tensors[0].to(expected[0].dtype), *tensors[1:]]


def is_server_failure(error: BaseException) -> bool:
    """True if another server may succeed where this one failed (it died, hung, left, moved, or answered nonsense).
    A BadRequest is the client's own fault: every server would refuse it, so it is raised at once."""
    if isinstance(error, RemoteError):
        return error.kind != "BadRequest"
    if isinstance(error, BadReply):
        return True
    return isinstance(error, (TimeoutError, asyncio.TimeoutError, ConnectionError, OSError, EOFError, asyncio.IncompleteReadError)) or (
        type(error).__name__ in ("P2PHandlerError", "P2PDaemonError", "ControlFailure")
    )


async def read_reply(
    responses: AsyncIterator[runtime_pb2.ExpertResponse], peer: PeerID, timeout: float | None
) -> list[torch.Tensor]:
    """The tensors of the next reply on `responses`; the server's error re-raised as a RemoteError."""
    try:
        message = await asyncio.wait_for(unpack(responses, MAX_REPLY_BYTES), timeout)
        if message is None:
            ended = "the stream ended before its reply: the server closed it, or the connection to it was lost"
            raise RemoteError(ended, kind="ConnectionError", peer=str(peer))
        tensors, meta = message
        reply = Reply.from_wire(meta)
    except BadRequest as e:  # what the wire layer calls a bad request is, coming from a server, a bad reply
        raise BadReply(str(e), peer) from None
    if reply.error is not None:
        raise RemoteError(reply.error, kind=reply.error_kind or "MeadowError", peer=str(peer))
    return tensors


async def call(
    p2p: P2P,
    peer: PeerID,
    rpc: str,
    request: Request,
    tensors: list[torch.Tensor],
    timeout: float,
    expected: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One request, one reply (rpc_forward, rpc_backward): the reply's tensors, checked to be like `expected` (the
    outputs or gradients the request asks for; None: any, but finite)."""
    activations = (0, -1) if isinstance(request, BackwardRequest) else (0,)  # hidden states, and their gradient
    messages = pack(tensors, request.to_wire(), runtime_pb2.ExpertRequest, request.wire, activations)
    opening = open_stream(p2p, peer, rpc, _iterate(messages), runtime_pb2.ExpertResponse)
    responses = await asyncio.wait_for(opening, timeout)
    try:
        reply = await read_reply(responses, peer, timeout)
    finally:
        await responses.aclose()
    return check_reply(from_wire(reply, expected, request.wire), expected, peer)


async def forward(
    p2p: P2P, peer: PeerID, request: ForwardRequest, tensors: list[torch.Tensor], timeout: float
) -> torch.Tensor:
    (output,) = await call(p2p, peer, RPC_FORWARD, request, tensors, timeout, expected=tensors[:1])
    return output


class InferenceStream:
    """One open rpc_inference stream to one server: requests go through a queue; a reader task puts every reply
    in order into another, so waiting for a reply can time out without leaving the stream half-read."""

    def __init__(self, p2p: P2P, peer: PeerID):
        self.p2p, self.peer = p2p, peer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.replies: asyncio.Queue = asyncio.Queue()  # outputs, or the exception that ended the stream
        self.responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self.reader: asyncio.Task | None = None
        self.closed = False
        self.wire: str | None = None  # the session's wire format, set when it opens

    async def open(self, request: OpenSession, timeout: float, tensors: list[torch.Tensor] = ()) -> None:
        """Open the session; `tensors` are its tuning tensors (deep prompts, LoRA weights), if any."""
        try:
            self.wire = request.wire
            self._send(list(tensors), request.to_wire(), activations=())  # tuning tensors travel exactly
            self.responses = await asyncio.wait_for(
                open_stream(self.p2p, self.peer, RPC_INFERENCE, self._requests(), runtime_pb2.ExpertResponse), timeout
            )
            await read_reply(self.responses, self.peer, timeout)
            self.reader = asyncio.ensure_future(self._read_replies())
        except BaseException:
            await self.close()
            raise

    async def step(self, tensors: list[torch.Tensor], timeout: float, meta: dict | None = None) -> torch.Tensor:
        """Send one step (`meta`: its Step fields) and wait for its output, which must be like its hidden states."""
        if self.closed:
            raise RemoteError("this inference stream is closed", kind="ConnectionError", peer=str(self.peer))
        self._send(tensors, meta or {})
        return await self.output(timeout, like=tensors[0])

    async def output(self, timeout: float, like: torch.Tensor | None = None) -> torch.Tensor:
        """The next step's output (of the shape and dtype of `like`, if given); after an error or timeout the stream
        is out of step, so it is closed."""
        try:
            return self._checked(await self._next(timeout), like)
        except BaseException:
            await self.close()
            raise

    async def pushed_output(self, grace: float, like: torch.Tensor | None = None) -> torch.Tensor | None:
        """The output of a step the previous server pushed to this one, if it comes within `grace` seconds; None
        otherwise (the stream stays usable: send the step yourself)."""
        try:
            reply = await self._next(grace)
        except asyncio.TimeoutError:
            return None
        try:
            return self._checked(reply, like)
        except BadReply:
            await self.close()
            raise

    def _checked(self, reply: list[torch.Tensor], like: torch.Tensor | None) -> torch.Tensor:
        if len(reply) != 1:
            raise BadReply(f"{len(reply)} tensors, expected 1", self.peer)
        expected = None if like is None else [like]
        (output,) = check_reply(from_wire(reply, expected, self.wire), expected, self.peer)
        return output

    async def _next(self, timeout: float) -> list[torch.Tensor]:
        if self.closed and self.replies.empty():
            raise RemoteError("this inference stream is closed", kind="ConnectionError", peer=str(self.peer))
        if self.replies.empty():
            reply = await _within(timeout, self.replies.get())
        else:  # already here (a pushed output often is): no timer, no task
            reply = self.replies.get_nowait()
        if isinstance(reply, BaseException):
            self.replies.put_nowait(reply)  # the stream has ended: every later wait gets the same error
            raise reply
        return reply

    async def _read_replies(self) -> None:
        try:
            while True:
                self.replies.put_nowait(await read_reply(self.responses, self.peer, timeout=None))
        except Exception as e:
            self.replies.put_nowait(e)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.put_nowait(None)  # ends our request generator, so hivemind's writer task finishes
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.wait((self.reader,))
        if self.responses is not None:
            try:
                await self.responses.aclose()
            except Exception:
                pass  # the connection may already be gone; there is nothing left to release

    def _send(self, tensors: list[torch.Tensor], meta: dict, activations: Sequence[int] = (0,)) -> None:
        for message in pack(tensors, meta, runtime_pb2.ExpertRequest, self.wire, activations):
            self.queue.put_nowait(message)

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (message := await self.queue.get()) is not None:
            yield message


async def _within(timeout: float, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result, or asyncio.TimeoutError after `timeout` seconds. asyncio.timeout (Python 3.11+) waits in
    the caller's task; wait_for, before Python 3.12, runs the awaitable in a task of its own: one per reply read."""
    if not hasattr(asyncio, "timeout"):
        return await asyncio.wait_for(awaitable, timeout)
    async with asyncio.timeout(timeout):
        return await awaitable


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


async def _iterate(items):
    for item in items:
        yield item
