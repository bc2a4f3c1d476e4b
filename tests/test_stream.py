"""open_stream, on two real hivemind peers on 127.0.0.1: its replies end as soon as the stream is gone, though our
requests have not run out (an open inference session's never do), and an error in sending them is raised."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from meadow.wire.stream import open_stream

WAIT = 30.0  # seconds; hivemind's own iterate_protobuf_handler waits forever in the first test


async def two_peers() -> tuple[P2P, P2P]:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False)
    client = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, initial_peers=await server.get_visible_maddrs()
    )
    return server, client


async def serve_work(server: P2P, received: asyncio.Event) -> None:
    """A handler that answers each request, and takes forever over the second (a server busy with a prefill)."""

    async def work(requests, context):
        count = 0
        async for _ in requests:
            count += 1
            if count == 2:
                received.set()
                await asyncio.sleep(3600)
            yield runtime_pb2.ExpertResponse()

    await server.add_protobuf_handler("work", work, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)


def test_the_replies_end_when_the_peer_dies_while_it_works_on_a_request_and_ours_are_still_open():
    async def scenario():
        server, client = await two_peers()
        received, more = asyncio.Event(), asyncio.Queue()
        await serve_work(server, received)

        async def requests():
            yield runtime_pb2.ExpertRequest()
            yield runtime_pb2.ExpertRequest()
            await more.get()  # an open session: the client may send another step at any time

        replies = await open_stream(client, server.peer_id, "work", requests(), runtime_pb2.ExpertResponse)
        try:
            assert await asyncio.wait_for(anext(replies), WAIT) is not None  # the first request's reply
            waiting = asyncio.ensure_future(anext(replies, "ended"))
            await asyncio.wait_for(received.wait(), WAIT)
            os.kill(server._child.pid, signal.SIGKILL)  # the server's p2p daemon dies, as with its whole machine
            return await asyncio.wait_for(waiting, WAIT)
        finally:
            await replies.aclose()
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(scenario()) == "ended"


async def all_of(replies) -> list:
    return [reply async for reply in replies]


def test_an_error_in_sending_the_requests_is_raised_by_the_replies():
    async def scenario():
        server, client = await two_peers()
        await serve_work(server, asyncio.Event())

        async def requests():
            yield runtime_pb2.ExpertRequest()
            raise ValueError("the next step cannot be sent")

        replies = await open_stream(client, server.peer_id, "work", requests(), runtime_pb2.ExpertResponse)
        try:
            return await asyncio.wait_for(all_of(replies), WAIT)
        finally:
            await client.shutdown()
            await server.shutdown()

    with pytest.raises(ValueError, match="the next step cannot be sent"):
        asyncio.run(scenario())
