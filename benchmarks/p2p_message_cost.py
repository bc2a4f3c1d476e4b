"""CPU per message through hivemind's P2P on loopback: a unary call (request and reply, as rpc_push makes) against one
message on an already open stream (as a session's steps and replies travel).

    PYTHONPATH=. python benchmarks/p2p_message_cost.py [--messages 2000]

Two P2P nodes in this process, each with its own p2pd; the CPU time of this process and both daemons is divided by
the number of messages. The message is a decoding step of the bench model (hidden 768, float32) as the wire packs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from meadow.bench import cpu_seconds
from meadow.wire import pack


async def measure(messages: int) -> None:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False)
    client = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, initial_peers=await server.get_visible_maddrs()
    )
    received = 0

    async def unary(request, context) -> runtime_pb2.ExpertResponse:
        nonlocal received
        received += 1
        return runtime_pb2.ExpertResponse()

    async def stream(requests, context):
        nonlocal received
        async for _ in requests:
            received += 1
        yield runtime_pb2.ExpertResponse()

    await server.add_protobuf_handler("unary", unary, runtime_pb2.ExpertRequest)
    await server.add_protobuf_handler("stream", stream, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
    step = [torch.randn(1, 1, 768), torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool)]
    message = pack(step, b"", runtime_pb2.ExpertRequest)[0]

    async def unary_calls(count: int) -> None:
        for _ in range(count):
            await client.call_protobuf_handler(server.peer_id, "unary", message, runtime_pb2.ExpertResponse)

    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    replies = await client.iterate_protobuf_handler(server.peer_id, "stream", requests(), runtime_pb2.ExpertResponse)
    end = asyncio.ensure_future(replies.__anext__())

    async def stream_messages(count: int) -> None:
        for _ in range(count):
            target = received + 1
            queue.put_nowait(message)
            while received < target:
                await asyncio.sleep(0)

    processes = [os.getpid()]  # with its children: both p2pd
    for name, send in (("unary call (request + reply)", unary_calls), ("message on an open stream", stream_messages)):
        await send(50)  # warm-up
        cpu, wall = cpu_seconds(processes), time.perf_counter()
        await send(messages)
        cpu, wall = cpu_seconds(processes) - cpu, time.perf_counter() - wall
        print(f"{name}: {cpu / messages * 1e3:.3f} ms CPU per message (this process and both p2pd), "
              f"{wall / messages * 1e3:.3f} ms wall")  # fmt: skip
    queue.put_nowait(None)
    await end
    await client.shutdown()
    await server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    asyncio.run(measure(parser.parse_args().messages))


if __name__ == "__main__":
    main()
