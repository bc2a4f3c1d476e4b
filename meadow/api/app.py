"""The FastAPI app: OpenAI's /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings over one distributed
model (its /v1/responses in responses.py, Ollama's routes in ollama.py), the swarm's state at /api/swarm, and the chat
(/) and monitor (/monitor) pages."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Sequence

import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from transformers import PreTrainedTokenizerBase

from meadow.api.embeddings import embed
from meadow.api.errors import APIError, api_error, install_error_handlers
from meadow.api.generation import Delta, Sampling, TextGeneration, Waiting
from meadow.api.kept_sessions import KeptSessions
from meadow.api.logprobs import answer_entries, chat_format, completion_format
from meadow.api.ollama import OLLAMA_PATHS, add_ollama_routes
from meadow.api.response_store import ResponseStore
from meadow.api.responses import add_responses_routes
from meadow.api.schemas import (
    DEFAULT_CHAT_TOKENS, DEFAULT_COMPLETION_TOKENS, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
    effort_variables,
)
from meadow.api.streaming import GenerationResponse, close, close_when_gone, collect_replies, merged
from meadow.api.swarm_view import PointsView, read_swarm
from meadow.api.tool_calls import Call, CallPiece, CallReader, dialect_of, read_reply, tool_prompt_ids
from meadow.client.chat_prompt import stop_strings
from meadow.client.config import RESERVE_TOKENS
from meadow.client.reasoning import ThinkingReader, opens_thinking, split_reasoning, thinks

STATIC = Path(__file__).parent / "static"
# pages served from this machine, on any port: front ends and tools run locally (a page from elsewhere must be let in)
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def _base64(vector: torch.Tensor) -> str:
    """A vector as OpenAI's base64 encoding gives it: its float32s, little-endian."""
    return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()


async def _sse(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
    except Exception as e:  # the status line is long gone: the error travels as an event, as OpenAI's does
        yield f"data: {json.dumps(api_error(e).body())}\n\n"
    yield "data: [DONE]\n\n"


def create_app(
    model, tokenizer: PreTrainedTokenizerBase, model_id: str, api_key: str | None = None, origins: Sequence[str] = (),
    served: Sequence[str] = (), stored: ResponseStore | None = None, kept: KeptSessions | None = None,
    reserve_tokens: int = RESERVE_TOKENS,
) -> FastAPI:  # fmt: skip
    """The API for `model` (a DistributedModelForCausalLM), named `model_id` in requests. With `api_key`, /v1 and /api
    answer only requests that carry it (`Authorization: Bearer KEY`, as OpenAI's clients send it); the pages and their
    files stay open, and ask the user for it. Web pages on this machine (and from `origins`; "*": any) may call it
    from a browser, as Ollama lets them. Beside other models' apps (model_router.py): `served` names all the models
    (for a request that names another), and they share the Responses API's `stored` responses. Requests go on in the
    `kept` sessions of earlier ones where their prompts begin alike (kept_sessions.py). A request's session reserves
    `reserve_tokens` of its reply up front (0: all of max_tokens) and grows as the reply is written."""
    served = list(served) or [model_id]
    app = FastAPI(title="Meadow", docs_url=None, redoc_url=None)  # their pages would load scripts from a CDN
    app.add_middleware(
        CORSMiddleware, allow_origin_regex=LOCAL_ORIGINS, allow_origins=list(origins), allow_methods=["*"],
        allow_headers=["*"],
    )  # fmt: skip
    install_error_handlers(app, OLLAMA_PATHS)

    def require_key(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        if authorization is None:
            raise APIError(401, "This API needs a key: send `Authorization: Bearer KEY`", code="invalid_api_key")
        if not secrets.compare_digest(authorization.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    keyed = [Depends(require_key)]
    context_length = getattr(model.config, "max_position_embeddings", None) or 2048
    dialect = dialect_of(tokenizer.chat_template)  # how the model writes tool calls
    thinking = thinks(tokenizer.chat_template)  # a reasoning model: its think block is given apart
    created = int(time.time())

    def unknown_model(name: str) -> APIError:
        message = f"The model `{name}` does not exist: this API serves {', '.join(f'`{m}`' for m in served)}"
        return APIError(404, message, param="model", code="model_not_found")

    def check(request) -> None:
        """What pydantic cannot check: the model's name, and token ids in its vocabulary."""
        if request.model != model_id:
            raise unknown_model(request.model)
        if any(not 0 <= token < model.config.vocab_size for token in getattr(request, "logit_bias", None) or {}):
            raise APIError(400, f"logit_bias token ids must be in [0, {model.config.vocab_size})", param="logit_bias")

    def token_ids(items: list[str | list[int]], param: str) -> list[list[int]]:
        """Each item's token ids: a text tokenized, or token ids checked against the vocabulary."""
        rows = [item if isinstance(item, list) else tokenizer(item)["input_ids"] for item in items]
        if any(not 0 <= i < model.config.vocab_size for row in rows for i in row):
            raise APIError(400, f"{param} token ids must be in [0, {model.config.vocab_size})", param=param)
        return rows

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

    async def start(prompts: list[torch.Tensor], sampling: Sampling, n: int, http: Request) -> list[TextGeneration]:
        """`n` generations for each prompt (choice j sampled with seed + j), once each has its first token out or waits
        for room on full servers (a streamed response then says so at once); a client that goes away meanwhile stops
        them there, and if one fails, all stop."""
        samplings = [replace(sampling, seed=None if sampling.seed is None else sampling.seed + j) for j in range(n)]
        generations = [
            TextGeneration(model, tokenizer, ids, s, kept, reserve_tokens) for ids in prompts for s in samplings
        ]
        watcher = asyncio.create_task(close_when_gone(generations, http))
        try:
            await asyncio.gather(*(generation.start() for generation in generations))
        except asyncio.CancelledError:  # the API is shutting down
            close(generations)
            raise
        except Exception as e:
            close(generations)
            raise api_error(e) from None
        finally:
            watcher.cancel()
        return generations

    def usage(generations: list[TextGeneration], n: int, inside: bool | None = None) -> dict:
        """The tokens read and written; of a chat's (`inside`: whether its prompt opened a think block), how many were
        a reasoning model's thinking."""
        done = sum(generation.outcome.completion_tokens for generation in generations)
        prompt = sum(generation.prompt_tokens for generation in generations[::n])  # each prompt counted once
        cached = sum(generation.cached_tokens for generation in generations[::n])  # (the first choice's, OpenAI's)
        counts = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                  "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
        if inside is not None:
            thought = sum(generation.reasoning_tokens(inside) for generation in generations) if thinking else 0
            counts["completion_tokens_details"] = {"reasoning_tokens": thought}
        return counts

    def meadow_info(generations: list[TextGeneration]) -> dict:
        """The servers that served the choices, and how long the slowest took."""
        servers = {str(server): server for generation in generations for server in generation.outcome.servers}
        seconds = max(generation.outcome.seconds for generation in generations)
        return {"servers": list(servers.values()), "seconds": round(seconds, 3)}

    entry = {"id": model_id, "object": "model", "created": created, "owned_by": "meadow"}

    @app.get("/v1/models", dependencies=keyed)
    def list_models() -> dict:
        return {"object": "list", "data": [entry]}

    @app.get("/v1/models/{name:path}", dependencies=keyed)
    def retrieve_model(name: str) -> dict:
        if name != model_id:
            raise unknown_model(name)
        return entry

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        check(request)
        box = request.speaking(dialect)
        messages = [message.as_dict() for message in request.messages]
        variables = {**effort_variables(request.reasoning_effort, thinking, "reasoning_effort"),
                     **(request.chat_template_kwargs or {})}  # fmt: skip
        prompt_ids = tool_prompt_ids(tokenizer, dialect, messages, box, **variables)
        inside = thinking and opens_thinking(tokenizer, prompt_ids)  # the template opened the reply's think block
        request.thinking(thinking, inside)  # no call opens in the think block
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = budget(prompt_ids.shape[1], requested, DEFAULT_CHAT_TOKENS, "messages")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        sampling = request.sampling(max_tokens, stop_strings(tokenizer), logprobs=logprobs)
        generations = await start([prompt_ids], sampling, request.n, http)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}

        def logprobs_of(pieces: list[Delta], start: int, content: str | None) -> dict | None:
            """The answer's tokens' (not the thinking's, nor a call's: see answer_entries), if they were asked for."""
            entries = [entry for piece in pieces for entry in piece.logprobs]
            return chat_format(answer_entries(entries, start, content)) if request.logprobs else None

        def finish_reason(generation: TextGeneration, called: bool) -> str:
            reason = generation.outcome.finish_reason
            return ("function_call" if request.legacy else "tool_calls") if called and reason == "stop" else reason

        def calls_field(calls: list[Call]) -> dict:
            """The calls as a message gives them; `function_call` (one) when they were asked for as `functions`."""
            if request.legacy:
                return {"function_call": calls[0].openai()["function"]}
            return {"tool_calls": [call.openai() for call in calls]}

        def call_piece(piece: CallPiece) -> dict:
            """A streamed delta of a call (or of the function call, when asked for as `functions`)."""
            if request.legacy:
                return {"function_call": piece.openai()["function"]}
            return {"tool_calls": [piece.openai()]}

        def choice(index: int, generation: TextGeneration, pieces: list[Delta]) -> dict:
            reply = "".join(piece.text for piece in pieces)
            reasoning, answer = split_reasoning(reply, inside) if thinking else ("", reply)
            content, calls = read_reply(answer, dialect, bool(box.callable)) if box else (answer, [])
            said = {"role": "assistant", "content": content}
            if calls:  # the content null when there is none, as OpenAI's
                said = {"role": "assistant", "content": content or None, **calls_field(calls)}
            if reasoning:
                said["reasoning_content"] = reasoning
            finish = finish_reason(generation, bool(calls))
            logprobs = logprobs_of(pieces, len(reply) - len(answer), content if box else None)  # the answer ends it
            return {"index": index, "message": said, "logprobs": logprobs, "finish_reason": finish}

        if not request.stream:
            replies = await collect_replies(generations, http)
            choices = [choice(index, *reply) for index, reply in enumerate(zip(generations, replies))]
            extra = {"usage": usage(generations, request.n, inside), "meadow": meadow_info(generations)}
            return {**head, "object": "chat.completion", "choices": choices, **extra}

        async def chunks() -> AsyncIterator[dict]:
            def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            readers = [CallReader(dialect, bool(box and box.callable)) for _ in generations]  # with tools
            thinkers = [ThinkingReader(inside) for _ in generations]  # for a reasoning model
            called = [0] * len(generations)
            replies, answers, contents = ([""] * len(generations) for _ in range(3))  # each choice's, so far
            for index in range(len(generations)):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for index, piece in merged([generation.deltas(tell_waits=True) for generation in generations]):
                if piece is None:  # that choice is done
                    done = generations[index]
                    reasoning, rest = thinkers[index].take("", last=True) if thinking else ("", "")
                    if reasoning:
                        yield chunk(index, {"reasoning_content": reasoning})
                    if box:
                        content, _ = readers[index].stream(rest)  # held text: no call begins in it
                        rest = content + readers[index].rest()
                    if rest:
                        yield chunk(index, {"content": rest})
                    last = chunk(index, {}, finish_reason(done, called[index] > 0))
                    yield {**last, "meadow": meadow_info([done])}
                elif isinstance(piece, Waiting):  # an extra field, as the last chunk's: OpenAI's clients let it pass
                    yield {**chunk(index, {}), "meadow": {"waiting": piece.reason}}
                else:
                    reasoning, text = thinkers[index].feed(piece.text) if thinking else ("", piece.text)
                    if reasoning:
                        yield chunk(index, {"reasoning_content": reasoning})
                    content, calls = readers[index].stream(text) if box else (text, [])
                    replies[index] += piece.text
                    answers[index] += text
                    contents[index] += content
                    answer_at = len(replies[index]) - len(answers[index])
                    logprobs = logprobs_of([piece], answer_at, contents[index] if box else None)
                    if content or (logprobs and logprobs["content"]):
                        yield chunk(index, {"content": content}, logprobs=logprobs)
                    for call in calls:  # as its arguments are written
                        yield chunk(index, call_piece(call))
                        called[index] += call.begins
            if request.include_usage:
                counts = usage(generations, request.n, inside)
                yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": counts}

        return GenerationResponse(_sse(chunks()), generations, "text/event-stream")

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: CompletionRequest, http: Request):
        check(request)
        prompts = [torch.tensor([ids], dtype=torch.long) for ids in token_ids(request.prompts, "prompt")]
        # one max_tokens for all: each prompt's default cut to the context it leaves, the shortest of them
        default = DEFAULT_COMPLETION_TOKENS
        max_tokens = min(budget(ids.shape[1], request.max_tokens, default, "prompt") for ids in prompts)
        if max_tokens == 0 and not request.echo:
            message = "max_tokens 0 generates nothing: it is for scoring a prompt with echo"
            raise APIError(400, message, param="max_tokens")
        scoring = request.echo and request.logprobs is not None  # the prompt tokens' logprobs too
        sampling = request.sampling(max_tokens, logprobs=request.logprobs, prompt_logprobs=scoring)
        generations = await start(prompts, sampling, request.n, http)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model_id}

        def echoed(index: int) -> str:
            """The prompt of choice `index`, as the reply repeats it with echo."""
            prompt = request.prompts[index // request.n]
            return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=True)

        def choice(index: int, pieces: list[Delta], finish_reason: str | None, start: bool = False) -> dict:
            """Choice `index` made of `pieces`; with `start` (its first piece or whole text), the prompt before them
            if echoed."""
            before = echoed(index) if request.echo and start else ""
            logprobs = None
            if request.logprobs is not None:
                shift = len(echoed(index)) if request.echo else 0  # offsets count from the start of the text
                entries = [replace(entry, offset=entry.offset + shift) for piece in pieces for entry in piece.logprobs]
                logprobs = completion_format([*(generations[index].prompt_logprobs if start else []), *entries])
            text = before + "".join(piece.text for piece in pieces)
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

        if not request.stream:
            replies = await collect_replies(generations, http)
            choices = [
                choice(index, pieces, generation.outcome.finish_reason, start=True)
                for index, (generation, pieces) in enumerate(zip(generations, replies))
            ]
            extra = {"usage": usage(generations, request.n), "meadow": meadow_info(generations)}
            return {**head, "choices": choices, **extra}

        async def chunks() -> AsyncIterator[dict]:
            started = set()
            async for index, piece in merged([generation.deltas(tell_waits=True) for generation in generations]):
                if isinstance(piece, Waiting):
                    yield {**head, "choices": [choice(index, [], None)], "meadow": {"waiting": piece.reason}}
                    continue
                start = index not in started
                started.add(index)
                if piece is None:  # that choice is done
                    done = generations[index]
                    last = choice(index, [], done.outcome.finish_reason, start)
                    yield {**head, "choices": [last], "meadow": meadow_info([done])}
                else:
                    yield {**head, "choices": [choice(index, [piece], None, start)]}
            if request.include_usage:
                yield {**head, "choices": [], "usage": usage(generations, request.n)}

        return GenerationResponse(_sse(chunks()), generations, "text/event-stream")

    @app.post("/v1/embeddings", dependencies=keyed)
    async def embeddings(request: EmbeddingRequest, http: Request) -> dict:
        check(request)
        if request.dimensions not in (None, model.config.hidden_size):
            message = f"dimensions: this model's embeddings have {model.config.hidden_size}, it cannot shorten them"
            raise APIError(400, message, param="dimensions")
        rows = token_ids(request.inputs, "input")
        vectors = await embed(model, rows, context_length, http.is_disconnected)
        encode = (lambda v: v.tolist()) if request.encoding_format == "float" else _base64
        data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
        tokens = sum(map(len, rows))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model_id, "usage": usage}

    add_responses_routes(app, tokenizer, model_id, keyed, start, budget, check, stored or ResponseStore())
    add_ollama_routes(app, model, tokenizer, model_id, keyed, start, budget, served)

    @app.get("/api/swarm", dependencies=keyed)
    def swarm() -> JSONResponse:  # a plain def: FastAPI runs it on a worker thread, as the DHT calls block
        model.sequence.revive_network()  # a dead DHT process would never answer
        return JSONResponse(read_swarm(model.sequence.dht))

    points = PointsView(model.sequence)

    @app.get("/api/points", dependencies=keyed)
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
