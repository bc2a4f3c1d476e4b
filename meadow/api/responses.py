"""OpenAI's Responses API (POST /v1/responses, GET and DELETE /v1/responses/ID), what OpenAI's newer clients and tools
call: the same generation as chat completions, its text as one output message, streamed as typed events
(`response.output_text.delta`...) unless `stream` is false. Responses are kept in memory (the latest KEPT, unless
`store` is false, without their logprobs), so that `previous_response_id` continues a conversation as OpenAI's does."""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedTokenizerBase

from meadow.api.errors import APIError, api_error
from meadow.api.generation import Delta, Sampling, TextGeneration
from meadow.api.logprobs import chat_format
from meadow.api.json_mode import JsonPrefix
from meadow.api.json_schema import Node
from meadow.api.schemas import (
    DEFAULT_CHAT_TOKENS, MAX_TOP_LOGPROBS, json_constraint, json_format, refuse_unsupported,
)
from meadow.api.streaming import GenerationResponse, collect_replies
from meadow.client.chat_prompt import chat_prompt_ids, stop_strings

KEPT = 1024  # stored responses (their conversations, each within the context), the oldest forgotten first
LOGPROBS = "message.output_text.logprobs"  # what `include` names to get them
# fields that ask for what Meadow does not do: refused rather than answered with something else
UNSUPPORTED = [
    ("tools", bool, "tool calls are not supported: the reply would be plain text"),
    ("conversation", bool, "conversations kept by the server are not supported: use previous_response_id"),
    ("background", bool, "background responses are not supported"),
    ("prompt", bool, "prompt templates are not supported"),
]  # fmt: skip


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None  # json_schema's
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(BaseModel):
    format: TextFormat = Field(default_factory=TextFormat)


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    type: Literal["message"] = "message"  # other items (images, files, tool outputs) are refused
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # user, metadata, reasoning, truncation, store options...

    model: str
    input: str | list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[str] | None = None
    text: TextOptions = Field(default_factory=TextOptions)
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None

    _refuse_unsupported = model_validator(mode="before")(lambda body: refuse_unsupported(body, UNSUPPORTED))

    @property
    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [message.as_dict() for message in self.input]

    @property
    def json_format(self) -> Node | None:
        return json_format(self.text.format.type, self.text.format.schema_, "text.format")

    @property
    def constraint(self) -> JsonPrefix | None:
        return json_constraint(self.json_format)

    @property
    def logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or []) else None


def add_responses_routes(
    app: FastAPI, tokenizer: PreTrainedTokenizerBase, model_id: str, keyed: list, start: Callable, budget: Callable,
    check: Callable,
) -> None:  # fmt: skip
    """The Responses routes on `app`, generating with `start`, sizing replies with `budget` and checking the model's
    name with `check` (create_app's)."""
    stored: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()  # id -> (response, its whole conversation)

    def find(response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        if response_id not in stored:
            raise APIError(404, f"Response with id '{response_id}' not found.", param=param)
        return stored[response_id]

    @app.post("/v1/responses", dependencies=keyed)
    async def create(request: ResponseRequest, http: Request):
        check(request)
        earlier = find(request.previous_response_id, "previous_response_id")[1] if request.previous_response_id else []
        instructions = [{"role": "system", "content": request.instructions}] if request.instructions else []
        conversation = [*earlier, *request.messages]  # the instructions are this response's only, as OpenAI's
        prompt_ids = chat_prompt_ids(tokenizer, [*instructions, *conversation])
        sampling = Sampling(
            max_tokens=budget(prompt_ids.shape[1], request.max_output_tokens, DEFAULT_CHAT_TOKENS, "input"),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=tuple(stop_strings(tokenizer)), logprobs=request.logprobs, constraint=request.constraint,
        )  # fmt: skip
        (generation,) = await start([prompt_ids], sampling, 1, http)
        ids = {"response": f"resp_{uuid.uuid4().hex}", "message": f"msg_{uuid.uuid4().hex}"}
        created = time.time()

        def body(status: str, pieces: list[Delta]) -> dict:
            """The response as it stands: `status` in_progress (no output yet), completed or incomplete."""
            output = [] if status == "in_progress" else [message(pieces, "completed")]
            done = status != "in_progress"
            tokens = {"input_tokens": generation.prompt_tokens, "output_tokens": generation.outcome.completion_tokens}
            return {
                "id": ids["response"], "object": "response", "created_at": created, "model": model_id,
                "status": status, "output": output, "instructions": request.instructions,
                "previous_response_id": request.previous_response_id, "max_output_tokens": request.max_output_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "metadata": request.metadata or {},
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "error": None, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True, "store": request.store,
                "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)},
                "top_logprobs": request.top_logprobs,
                "usage": {
                    **tokens, "total_tokens": sum(tokens.values()), "output_tokens_details": {"reasoning_tokens": 0},
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                } if done else None,
            }  # fmt: skip

        def message(pieces: list[Delta], status: str) -> dict:
            content = [text_part(pieces)] if status == "completed" else []
            return {"type": "message", "id": ids["message"], "status": status, "role": "assistant", "content": content}

        def text_part(pieces: list[Delta]) -> dict:
            return {"type": "output_text", "text": "".join(piece.text for piece in pieces), "annotations": [],
                    "logprobs": logprobs_of(pieces)}  # fmt: skip

        def logprobs_of(pieces: list[Delta]) -> list[dict]:
            return chat_format([entry for piece in pieces for entry in piece.logprobs])["content"]

        def finished(pieces: list[Delta]) -> dict:
            status = "incomplete" if generation.outcome.finish_reason == "length" else "completed"
            response = body(status, pieces)
            if request.store:  # without the logprobs, which can be a thousand times the text
                part = response["output"][0]["content"][0]
                kept = {**response, "output": [{**response["output"][0], "content": [{**part, "logprobs": []}]}]}
                stored[ids["response"]] = (kept, [*conversation, {"role": "assistant", "content": part["text"]}])
                while len(stored) > KEPT:
                    stored.popitem(last=False)
            return response

        if not request.stream:
            (pieces,) = await collect_replies([generation], http)
            return finished(pieces)

        async def events() -> AsyncIterator[dict]:
            place = {"item_id": ids["message"], "output_index": 0, "content_index": 0}
            yield {"type": "response.created", "response": body("in_progress", [])}
            yield {"type": "response.in_progress", "response": body("in_progress", [])}
            yield {"type": "response.output_item.added", "output_index": 0, "item": message([], "in_progress")}
            yield {"type": "response.content_part.added", **place, "part": text_part([])}
            pieces = []
            async for piece in generation.deltas():
                pieces.append(piece)
                delta = {"delta": piece.text, "logprobs": logprobs_of([piece])}
                yield {"type": "response.output_text.delta", **place, **delta}
            response = finished(pieces)
            part = response["output"][0]["content"][0]
            yield {"type": "response.output_text.done", **place, "text": part["text"], "logprobs": part["logprobs"]}
            yield {"type": "response.content_part.done", **place, "part": part}
            yield {"type": "response.output_item.done", "output_index": 0, "item": response["output"][0]}
            yield {"type": f"response.{response['status']}", "response": response}

        return GenerationResponse(_typed_events(events()), [generation], "text/event-stream")

    @app.get("/v1/responses/{response_id}", dependencies=keyed)
    def retrieve(response_id: str) -> dict:
        return find(response_id)[0]

    @app.delete("/v1/responses/{response_id}", dependencies=keyed)
    def delete(response_id: str) -> Response:
        find(response_id)
        del stored[response_id]
        return Response(status_code=204)


async def _typed_events(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events named by their type, numbered, as the Responses API streams them; an error ends the stream
    with an `error` event."""
    number = 0
    try:
        async for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': number})}\n\n"
            number += 1
    except Exception as e:  # the status line is long gone: the error travels as an event
        error = api_error(e)
        event = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
        yield f"event: error\ndata: {json.dumps({**event, 'sequence_number': number})}\n\n"
