"""A stream of protobuf messages to a peer's handler that ends as soon as the peer's side is gone.

hivemind's `P2P.iterate_protobuf_handler`, once the other side closes the stream, waits for our requests to run out
before it ends the replies. The requests of an open inference session or push stream run out only when we close it,
so a server killed while it computed a step left its client waiting for its own timeout: 30 s for a prefill."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from google.protobuf.message import Message
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon import P2PHandlerError


async def open_stream(
    p2p: P2P, peer: PeerID, handler: str, requests: AsyncIterator[Message], reply_type: type[Message]
) -> AsyncIterator[Message]:
    """Send `requests` to `peer`'s `handler` (then hivemind's end-of-stream message) while yielding its replies. The
    replies end when the stream is closed; an error in sending them is raised then."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer, handler)

    async def send() -> None:
        try:
            async for request in requests:
                await P2P.send_protobuf(request, writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        except BaseException:
            writer.close()  # wakes the reader below, which raises this
            raise

    async def replies() -> AsyncIterator[Message]:
        sending = asyncio.create_task(send())
        try:
            while True:
                try:
                    reply, error = await P2P.receive_protobuf(reply_type, reader)
                except asyncio.IncompleteReadError:  # closed: by the peer, its daemon, or our failed send
                    if sending.done() and not sending.cancelled() and sending.exception() is not None:
                        raise sending.exception() from None
                    return
                if error is not None:
                    raise P2PHandlerError(f"{handler} at {peer} failed: {error.message}")
                yield reply
        finally:
            sending.cancel()
            writer.close()

    return replies()
