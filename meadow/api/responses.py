"""OpenAI's Responses API (POST /v1/responses, GET and DELETE /v1/responses/ID), what OpenAI's newer clients and tools
call: the same generation as chat completions, its text as one output message (and its function calls, when it is given
tools), streamed as typed events (`response.output_text.delta`...) unless `stream` is false. Responses are kept
(response_store.py: unless `store` is false, without their logprobs), so that `previous_response_id` continues a
conversation as OpenAI's does."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from meadow.api.errors import APIError, api_error
from meadow.api.generation import Delta, Sampling, Waiting
from meadow.api.response_store import ResponseStore
from meadow.api.logprobs import answer_entries, chat_format
from meadow.api.json_schema import Node
from meadow.api.schemas import (
    DEFAULT_CHAT_TOKENS, MAX_TOP_LOGPROBS, Effort, effort_variables, json_constraint, json_format, object_text,
    refuse_unsupported,
)
from meadow.api.streaming import GenerationResponse, collect_replies
from meadow.api.tool_calls import (
    Call, CallPiece, CallReader, Function, NamedChoice, OffersTools, Tool, dialect_of, read_reply, tool_prompt_ids,
    toolbox,
)
from meadow.client.chat_prompt import stop_strings
from meadow.client.reasoning import ThinkingReader, opens_thinking, split_reasoning, thinks

LOGPROBS = "message.output_text.logprobs"  # what `include` names to get them
# fields that ask for what Meadow does not do: refused rather than answered with something else
UNSUPPORTED = [
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
    type: Literal["message"] = "message"  # other items (images, files) are refused
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class FunctionCallItem(BaseModel):
    """A call the model made (an earlier response's output, sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # a JSON object's text

    _an_object = field_validator("arguments")(object_text)


class FunctionCallOutput(BaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class ReasoningItem(BaseModel):
    """A reasoning model's thinking (an earlier response's output, sent back): not shown to the model again, as
    reasoning models' templates leave earlier thinking out."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["reasoning"]


def _item_kind(item) -> str:
    """Which kind of input item `item` is, by its type (a message's may be left out): its member of InputItem."""
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    kinds = {"function_call": "FunctionCall", "function_call_output": "FunctionCallOutput", "reasoning": "Reasoning"}
    return kinds.get(kind, "Message") if isinstance(kind, str) else "Message"  # a junk type: the message's error


# one of them, told apart by type: a bad item's error names its own fields, not those of the kinds it is not
InputItem = Annotated[
    Annotated[InputMessage, Tag("Message")] | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutput, Tag("FunctionCallOutput")] | Annotated[ReasoningItem, Tag("Reasoning")],
    Discriminator(_item_kind),
]


class FunctionTool(BaseModel):
    """A function the model may call, in the Responses API's flat shape."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def as_tool(self) -> Tool:
        return Tool(function=Function(**self.model_dump(exclude={"type"})))


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str


class ReasoningOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # summary: the reasoning is given whole

    effort: Effort | None = None


class ResponseRequest(OffersTools):
    model_config = ConfigDict(extra="ignore")  # user, metadata, truncation, store options...

    model: str
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    reasoning: ReasoningOptions | None = None
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
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None

    _refuse_unsupported = model_validator(mode="before")(lambda body: refuse_unsupported(body, UNSUPPORTED))

    @model_validator(mode="after")
    def _tools_compiled(self):
        choice = self.tool_choice
        choice = NamedChoice(function={"name": choice.name}) if isinstance(choice, NamedFunction) else choice
        tools = [tool.as_tool() for tool in self.tools or []]
        self._toolbox = toolbox(tools, choice, self.parallel_tool_calls)
        if self._toolbox and self.json_format:
            raise APIError(400, "tools and a JSON text.format together are not supported", param="text.format")
        return self

    @property
    def messages(self) -> list[dict]:
        """The input as chat messages (transformers' shape): calls join the assistant's message before them, their
        outputs are "tool" messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages = []
        for item in self.input:
            if isinstance(item, FunctionCallOutput):
                messages.append({"role": "tool", "content": item.output})
            elif isinstance(item, ReasoningItem):
                continue
            elif isinstance(item, FunctionCallItem):
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": ""})
                call = {"type": "function", "function": {"name": item.name, "arguments": json.loads(item.arguments)}}
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append(item.as_dict())
        return messages

    @property
    def json_format(self) -> Node | None:
        return json_format(self.text.format.type, self.text.format.schema_, "text.format")

    @property
    def constraint(self) -> object | None:
        return self._toolbox.prefix() if self._toolbox else json_constraint(self.json_format)

    @property
    def logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or []) else None


PREFIXES = {"response": "resp", "message": "msg", "reasoning": "rs"}  # of the ids of a response and its items


def add_responses_routes(
    app: FastAPI, tokenizer: PreTrainedTokenizerBase, model_id: str, keyed: list, start: Callable, budget: Callable,
    check: Callable, stored: ResponseStore,
) -> None:  # fmt: skip
    """The Responses routes on `app`, generating with `start`, sizing replies with `budget` and checking the model's
    name with `check` (create_app's); responses are kept in `stored`."""

    def find(response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        kept = stored.get(response_id)
        if kept is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param=param)
        return kept

    @app.post("/v1/responses", dependencies=keyed)
    async def create(request: ResponseRequest, http: Request):
        check(request)
        dialect, thinking = dialect_of(tokenizer.chat_template), thinks(tokenizer.chat_template)
        box = request.speaking(dialect)
        earlier = find(request.previous_response_id, "previous_response_id")[1] if request.previous_response_id else []
        instructions = [{"role": "system", "content": request.instructions}] if request.instructions else []
        history = [*earlier, *request.messages]  # the instructions are this response's only, as OpenAI's
        effort = effort_variables(request.reasoning and request.reasoning.effort, thinking, "reasoning.effort")
        prompt_ids = tool_prompt_ids(tokenizer, dialect, [*instructions, *history], box, **effort)
        inside = thinking and opens_thinking(tokenizer, prompt_ids)  # the template opened the reply's think block
        request.thinking(thinking, inside)  # no call opens in the think block
        sampling = Sampling(
            max_tokens=budget(prompt_ids.shape[1], request.max_output_tokens, DEFAULT_CHAT_TOKENS, "input"),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            stop=tuple(stop_strings(tokenizer)), logprobs=request.logprobs, constraint=request.constraint,
        )  # fmt: skip
        (generation,) = await start([prompt_ids], sampling, 1, http)
        ids = {kind: f"{prefix}_{uuid.uuid4().hex}" for kind, prefix in PREFIXES.items()}
        created = time.time()

        def body(status: str, output: list[dict]) -> dict:
            """The response as it stands: `status` in_progress (no output yet), completed or incomplete."""
            done = status != "in_progress"
            tokens = {"input_tokens": generation.prompt_tokens, "output_tokens": generation.outcome.completion_tokens}
            choice = request.tool_choice
            return {
                "id": ids["response"], "object": "response", "created_at": created, "model": model_id,
                "status": status, "output": output, "instructions": request.instructions,
                "previous_response_id": request.previous_response_id, "max_output_tokens": request.max_output_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "metadata": request.metadata or {},
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "error": None, "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
                "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
                "parallel_tool_calls": request.parallel_tool_calls is not False, "store": request.store,
                "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)},
                "top_logprobs": request.top_logprobs,
                "reasoning": {"effort": request.reasoning and request.reasoning.effort, "summary": None},
                "usage": {
                    **tokens, "total_tokens": sum(tokens.values()), "output_tokens_details": {
                        "reasoning_tokens": generation.reasoning_tokens(inside) if thinking else 0},
                    "input_tokens_details": {"cached_tokens": generation.cached_tokens, "cache_write_tokens": 0},
                } if done else None,
            }  # fmt: skip

        def message(text: str, logprobs: list[dict], status: str) -> dict:
            content = [text_part(text, logprobs)] if status == "completed" else []
            return {"type": "message", "id": ids["message"], "status": status, "role": "assistant", "content": content}

        def text_part(text: str, logprobs: list[dict]) -> dict:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}

        def reasoning(thought: str, status: str) -> dict:
            content = [{"type": "reasoning_text", "text": thought}] if status == "completed" else []
            return {"type": "reasoning", "id": ids["reasoning"], "summary": [], "content": content, "status": status}

        def function_call(call: Call | CallPiece, arguments: str, status: str) -> dict:
            return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
                    "name": call.name, "arguments": arguments, "status": status}  # fmt: skip

        def output(thought: str, content: str, logprobs: list[dict], calls: list[Call]) -> list[dict]:
            """The thinking (of a reasoning model), a message (unless the reply is calls only), then the calls."""
            items = [reasoning(thought, "completed")] if thought else []
            items += [message(content, logprobs, "completed")] if content or not calls else []
            return items + [function_call(call, call.text, "completed") for call in calls]

        def logprobs_of(pieces: list[Delta], start: int = 0, content: str | None = None) -> list[dict]:
            """The entries of the tokens in `pieces` from the answer's `start` in the reply on (after the thinking);
            given the `content` of a reply with calls, of its tokens only."""
            entries = [entry for piece in pieces for entry in piece.logprobs]
            return chat_format(answer_entries(entries, start, content))["content"]

        def finished(thought: str, content: str, logprobs: list[dict], calls: list[Call]) -> dict:
            status = "incomplete" if generation.outcome.finish_reason == "length" else "completed"
            response = body(status, output(thought, content, logprobs, calls))
            if request.store:  # without the logprobs, which can be a thousand times the text
                unscored = lambda item: {**item, "content": [{**part, "logprobs": []} for part in item["content"]]}
                kept = [unscored(item) if item["type"] == "message" else item for item in response["output"]]
                said = {"role": "assistant", "content": content}
                if calls:
                    said["tool_calls"] = [{"type": "function", "function": {"name": call.name,
                                          "arguments": call.arguments}} for call in calls]  # fmt: skip
                stored.put(ids["response"], {**response, "output": kept}, [*history, said])
            return response

        if not request.stream:
            (pieces,) = await collect_replies([generation], http)
            text = "".join(piece.text for piece in pieces)
            thought, answer = split_reasoning(text, inside) if thinking else ("", text)
            content, calls = read_reply(answer, dialect, bool(box.callable)) if box else (answer, [])
            answer_at = len(text) - len(answer)  # the answer is the reply's end
            return finished(thought, content, logprobs_of(pieces, answer_at, content if box else None), calls)

        async def events() -> AsyncIterator[dict]:
            yield {"type": "response.created", "response": body("in_progress", [])}
            yield {"type": "response.in_progress", "response": body("in_progress", [])}
            reader, pieces, content, calls = CallReader(dialect, bool(box and box.callable)), [], "", []
            thinker, thought, answer, reply = ThinkingReader(inside), "", "", ""
            opened = False  # the message
            writing, written = None, ""  # the call being written, and its arguments so far
            first = 0  # the message's output index: 1 after a reasoning item

            def place() -> dict:
                return {"item_id": ids["message"], "output_index": first, "content_index": 0}

            thinking_at = {"item_id": ids["reasoning"], "output_index": 0, "content_index": 0}

            def opening() -> list[dict]:
                added = message("", [], "in_progress")
                return [{"type": "response.output_item.added", "output_index": first, "item": added},
                        {"type": "response.content_part.added", **place(), "part": text_part("", [])}]  # fmt: skip

            def closing() -> list[dict]:
                said = message(content, logprobs_of(pieces, len(reply) - len(answer), content if box else None),
                               "completed")  # fmt: skip
                part = said["content"][0]
                return [{"type": "response.output_text.done", **place(), "text": content, "logprobs": part["logprobs"]},
                        {"type": "response.content_part.done", **place(), "part": part},
                        {"type": "response.output_item.done", "output_index": first, "item": said}]  # fmt: skip

            def thinking_ends() -> list[dict]:
                return [{"type": "response.reasoning_text.done", **thinking_at, "text": thought},
                        {"type": "response.output_item.done", "output_index": 0,
                         "item": reasoning(thought, "completed")}]  # fmt: skip

            async for piece in _with_end(generation.deltas(tell_waits=True)):
                if isinstance(piece, Waiting):  # an extra field, as chat completions' chunks carry it
                    waiting = {**body("in_progress", []), "meadow": {"waiting": piece.reason}}
                    yield {"type": "response.in_progress", "response": waiting}
                    continue
                if piece is not None:
                    pieces.append(piece)
                    reply += piece.text
                text = piece.text if piece else ""
                more, text = thinker.take(text, last=piece is None) if thinking else ("", text)
                if more:
                    if not thought:  # its first words: the reasoning item opens
                        first = 1
                        yield {"type": "response.output_item.added", "output_index": 0,
                               "item": reasoning("", "in_progress")}  # fmt: skip
                    thought += more
                    yield {"type": "response.reasoning_text.delta", **thinking_at, "delta": more}
                if thought and (text or piece is None) and not answer:  # the answer begins (or the reply ends)
                    for event in thinking_ends():
                        yield event
                answer += text
                said, new = reader.stream(text) if box else (text, [])
                if piece is None and box:
                    said += reader.rest()
                if said or (piece is not None and not box and not thinking):  # the message opens with its first text
                    for event in [] if opened else opening():
                        yield event
                    opened, content = True, content + said
                    answer_at = len(reply) - len(answer)
                    logprobs = logprobs_of([piece] if piece else [], answer_at, content if box else None)
                    yield {"type": "response.output_text.delta", **place(), "delta": said, "logprobs": logprobs}
                for call in new:  # as its arguments are written
                    index = first + int(opened) + call.index
                    at = {"item_id": "fc_" + call.id.removeprefix("call_"), "output_index": index}
                    if call.begins:
                        for event in closing() if opened and call.index == 0 else []:  # the message ends here
                            yield event
                        writing, written = call, ""
                        added = function_call(call, "", "in_progress")
                        yield {"type": "response.output_item.added", "output_index": index, "item": added}
                    if call.arguments:
                        written += call.arguments
                        yield {"type": "response.function_call_arguments.delta", **at, "delta": call.arguments}
                    if call.whole is not None:
                        writing = None
                        calls.append(call.whole)
                        arguments = call.whole.text
                        yield {"type": "response.function_call_arguments.done", **at, "arguments": arguments}
                        item = function_call(call.whole, arguments, "completed")
                        yield {"type": "response.output_item.done", "output_index": index, "item": item}
            if writing is not None:  # cut short (max_output_tokens): the call is left out, as without a stream
                index = first + int(opened) + writing.index
                item = function_call(writing, written, "incomplete")
                yield {"type": "response.output_item.done", "output_index": index, "item": item}
            elif not calls:
                for event in [] if opened else opening():
                    yield event
                for event in closing():
                    yield event
            logprobs = logprobs_of(pieces, len(reply) - len(answer), content if box else None)
            response = finished(thought, content, logprobs, calls)
            yield {"type": f"response.{response['status']}", "response": response}

        return GenerationResponse(_typed_events(events()), [generation], "text/event-stream")

    @app.get("/v1/responses/{response_id}", dependencies=keyed)
    def retrieve(response_id: str) -> dict:
        return find(response_id)[0]

    @app.delete("/v1/responses/{response_id}", dependencies=keyed)
    def delete(response_id: str) -> Response:
        if not stored.delete(response_id):
            find(response_id)  # its 404
        return Response(status_code=204)


async def _with_end(items: AsyncIterator) -> AsyncIterator:
    """The items, then None."""
    async for item in items:
        yield item
    yield None


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
