"""What every generating route shares: the generations of a request stopped (their server sessions closed) however
its response ends, whole replies collected, several streams merged."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from meadow.api.errors import api_error
from meadow.api.generation import Delta, TextGeneration


class GenerationResponse(StreamingResponse):
    """A streamed reply (`lines` of text: server-sent events, or lines of JSON) to a request whose `generations` are
    stopped (and their server sessions closed) however the response ends: finished, failed, or the client went away."""

    def __init__(self, lines: AsyncIterator[str], generations: list[TextGeneration], media_type: str):
        super().__init__(lines, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.generations = generations

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close(self.generations)


def close(generations: list[TextGeneration]) -> None:
    for generation in generations:
        generation.close()


async def close_when_gone(generations: list[TextGeneration], http: Request) -> None:
    """Stop `generations` once their client has gone away (run as a task, cancelled when no longer needed)."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
    close(generations)


async def collect_replies(generations: list[TextGeneration], http: Request) -> list[list[Delta]]:
    """The whole replies of a request that is not streamed, piece by piece; generating stops if its client goes away
    meanwhile, or if one of them fails."""

    async def collect(generation: TextGeneration) -> list[Delta]:
        return [piece async for piece in generation.deltas()]

    watcher = asyncio.create_task(close_when_gone(generations, http))
    try:
        return await asyncio.gather(*(collect(generation) for generation in generations))
    except Exception as e:
        close(generations)
        raise api_error(e) from None
    finally:
        watcher.cancel()


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """The items of several streams as they come, each as (its stream's index, item), and (index, None) once that
    stream ends; an error in one ends them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, None))
        except Exception as e:
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= item is None
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
