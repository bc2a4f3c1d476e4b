"""The FastAPI app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions over one distributed model, the
swarm's state at /api/swarm, and the chat (/) and monitor (/monitor) pages."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from transformers import PreTrainedTokenizerBase

from meadow.api.errors import APIError, api_error, install_error_handlers
from meadow.api.generation import TextGeneration, Waiting
from meadow.api.schemas import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
)
from meadow.api.swarm_view import PointsView, read_swarm
from meadow.client.chat_prompt import chat_prompt_ids, stop_strings

STATIC = Path(__file__).parent / "static"


class _GenerationResponse(StreamingResponse):
    """Server-sent events of one generation, which is stopped (and its server sessions closed) however the response
    ends: finished, failed, or the client went away."""

    def __init__(self, events: AsyncIterator[dict], generation: TextGeneration):
        super().__init__(_sse(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
    except Exception as e:  # the status line is long gone: the error travels as an event, as OpenAI's does
        yield f"data: {json.dumps(api_error(e).body())}\n\n"
    yield "data: [DONE]\n\n"


def create_app(model, tokenizer: PreTrainedTokenizerBase, model_id: str) -> FastAPI:
    """The API for `model` (a DistributedModelForCausalLM), named `model_id` in requests."""
    app = FastAPI(title="Meadow", docs_url=None, redoc_url=None)  # their pages would load scripts from a CDN
    install_error_handlers(app)
    context_length = getattr(model.config, "max_position_embeddings", None) or 2048
    created = int(time.time())

    def check_model(name: str) -> None:
        if name != model_id:
            message = f"The model `{name}` does not exist: this API serves `{model_id}`"
            raise APIError(404, message, param="model", code="model_not_found")

    def budget(prompt_tokens: int, requested: int | None, default: int, param: str) -> int:
        """max_tokens for the request: what it asked for, or the default cut to the context left."""
        if prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param=param)
        room = context_length - prompt_tokens
        if room < 1 or (requested is not None and requested > room):
            asked = f"{prompt_tokens} tokens in the prompt"
            if requested:
                asked = f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the completion)"
            raise APIError(
                400, f"This model's maximum context length is {context_length} tokens, but you requested {asked}. "
                "Shorten the prompt or ask for fewer tokens.", param=param, code="context_length_exceeded",
            )  # fmt: skip
        return requested if requested is not None else min(default, room)

    async def start(prompt_ids: torch.Tensor, sampling, http: Request) -> TextGeneration:
        """The generation, once its first token is out or once it waits for room on full servers (a streamed
        response then says so at once); a client that goes away meanwhile stops it there."""
        generation = TextGeneration(model, tokenizer, prompt_ids, sampling)
        watcher = asyncio.create_task(_close_when_gone(generation, http))
        try:
            await generation.start()
        except asyncio.CancelledError:  # the API is shutting down
            generation.close()
            raise
        except Exception as e:
            raise api_error(e) from None
        finally:
            watcher.cancel()
        return generation

    def usage(generation: TextGeneration) -> dict:
        done = generation.outcome.completion_tokens
        prompt = generation.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def meadow_info(generation: TextGeneration) -> dict:
        return {"servers": generation.outcome.servers, "seconds": round(generation.outcome.seconds, 3)}

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "meadow"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        check_model(request.model)
        prompt_ids = chat_prompt_ids(tokenizer, [message.as_dict() for message in request.messages])
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = budget(prompt_ids.shape[1], requested, DEFAULT_CHAT_TOKENS, "messages")
        generation = await start(prompt_ids, request.sampling(max_tokens, stop_strings(tokenizer)), http)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}

        if not request.stream:
            text = await _collect(generation, http)
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": generation.outcome.finish_reason}
            extra = {"usage": usage(generation), "meadow": meadow_info(generation)}
            return {**head, "object": "chat.completion", "choices": [choice], **extra}

        async def chunks() -> AsyncIterator[dict]:
            def chunk(delta: dict, finish_reason: str | None = None) -> dict:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            yield chunk({"role": "assistant", "content": ""})
            async for piece in generation.deltas(tell_waits=True):
                if isinstance(piece, Waiting):  # an extra field, as the last chunk's: OpenAI's clients let it pass
                    yield {**chunk({}), "meadow": {"waiting": piece.reason}}
                else:
                    yield chunk({"content": piece})
            yield {**chunk({}, generation.outcome.finish_reason), "meadow": meadow_info(generation)}
            if request.include_usage:
                yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(generation)}

        return _GenerationResponse(chunks(), generation)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        check_model(request.model)
        prompt = request.prompt
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        if any(not 0 <= i < model.config.vocab_size for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {model.config.vocab_size})", param="prompt")
        prompt_ids = torch.tensor([ids], dtype=torch.long)
        max_tokens = budget(prompt_ids.shape[1], request.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt")
        generation = await start(prompt_ids, request.sampling(max_tokens), http)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model_id}

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if not request.stream:
            text = await _collect(generation, http)
            extra = {"usage": usage(generation), "meadow": meadow_info(generation)}
            return {**head, "choices": [choice(text, generation.outcome.finish_reason)], **extra}

        async def chunks() -> AsyncIterator[dict]:
            async for piece in generation.deltas(tell_waits=True):
                if isinstance(piece, Waiting):
                    yield {**head, "choices": [choice("", None)], "meadow": {"waiting": piece.reason}}
                else:
                    yield {**head, "choices": [choice(piece, None)]}
            yield {**head, "choices": [choice("", generation.outcome.finish_reason)], "meadow": meadow_info(generation)}
            if request.include_usage:
                yield {**head, "choices": [], "usage": usage(generation)}

        return _GenerationResponse(chunks(), generation)

    @app.get("/api/swarm")
    def swarm() -> JSONResponse:  # a plain def: FastAPI runs it on a worker thread, as the DHT calls block
        model.sequence.revive_network()  # a dead DHT process would never answer
        return JSONResponse(read_swarm(model.sequence.dht))

    points = PointsView(model.sequence)

    @app.get("/api/points")
    def points_per_server(mine: bool = False) -> JSONResponse:  # a plain def, on a worker thread: it waits on ledgers
        if mine and points.me is None:  # the chat page asks only for the user's own: without an identity, none
            return JSONResponse({"me": None})
        return JSONResponse(points.read())

    @app.get("/", include_in_schema=False)
    def chat_page() -> FileResponse:
        return FileResponse(STATIC / "chat.html")

    @app.get("/monitor", include_in_schema=False)
    def monitor_page() -> FileResponse:
        return FileResponse(STATIC / "monitor.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _close_when_gone(generation: TextGeneration, http: Request) -> None:
    """Stop `generation` once its client has gone away (run as a task, cancelled when no longer needed)."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
    generation.close()


async def _collect(generation: TextGeneration, http: Request) -> str:
    """The whole reply of a request that is not streamed; generating stops if its client goes away meanwhile."""
    watcher = asyncio.create_task(_close_when_gone(generation, http))
    try:
        return "".join([text async for text in generation.deltas()])
    except Exception as e:
        raise api_error(e) from None
    finally:
        watcher.cancel()
