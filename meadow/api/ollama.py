"""Ollama's API over the same model, for the tools that speak it (its Python and JavaScript clients, chat front ends):
GET /api/tags, /api/ps and /api/version, POST /api/show, /api/embed (and the older /api/embeddings), /api/chat and
/api/generate, the last two streamed as lines of JSON unless the request says `"stream": false`. Each request is a
generation like the OpenAI routes' (an inference session of its own, stopped when its client goes away); errors come
in Ollama's shape, {"error": message}."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import AsyncIterator, Callable, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

import meadow
from meadow.api.embeddings import embed, none_empty
from meadow.api.errors import APIError, api_error
from meadow.api.generation import Delta, Sampling, TextGeneration
from meadow.api.logprobs import TokenLogprob
from meadow.api.json_schema import Node
from meadow.api.schemas import (
    DEFAULT_CHAT_TOKENS, MAX_TOP_LOGPROBS, effort_variables, json_constraint, json_format, refuse_unsupported,
)
from meadow.api.streaming import GenerationResponse, collect_replies
from meadow.api.tool_calls import CallReader, OffersTools, Tool, dialect_of, tool_prompt_ids, toolbox
from meadow.client.chat_prompt import chat_prompt_ids, stop_strings
from meadow.client.harmony import speaks_harmony
from meadow.client.reasoning import ThinkingReader, opens_thinking, thinks
from meadow.models.checkpoint import model_facts

# /api/show's model_info keys (llama.cpp's GGUF names, as Ollama reports them) -> the transformers config's
OLLAMA_SHAPE = {
    "embedding_length": "hidden_size", "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "feed_forward_length": "intermediate_size", "vocab_size": "vocab_size",
}  # fmt: skip
# what would change the models a machine holds: a swarm's model is its servers' to hold
MANAGING = {"/api/create": "created", "/api/copy": "copied", "/api/delete": "deleted", "/api/push": "pushed"}
OLLAMA_PATHS = frozenset(
    {"/api/tags", "/api/ps", "/api/version", "/api/show", "/api/pull", "/api/embed", "/api/embeddings", "/api/chat",
     "/api/generate", *MANAGING}
)  # fmt: skip
# Ollama's sampling defaults, for the options a request leaves out
DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
# fields that ask for what Meadow does not do: refused rather than answered with something else
UNSUPPORTED = [
    ("images", bool, "images are not supported: the model reads text"),
    ("suffix", bool, "inserting text is not supported"),
]


class Options(BaseModel):
    """The options Meadow applies; Ollama's others (num_ctx, mirostat, min_p...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # 0: every token
    num_predict: int | None = Field(None, ge=-2)  # tokens to generate; -1 and -2: as many as the context leaves
    seed: int | None = None
    stop: list[str] | None = Field(None, max_length=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)  # default 1, none (Ollama: 1.1): temperature 0 stays greedy
    repeat_last_n: int | None = Field(None, ge=-1)  # the tokens it looks back over: default 64, 0 none, -1 all

    @field_validator("stop")
    @classmethod
    def _none_empty(cls, stop):
        if stop and not all(stop):
            raise ValueError("a stop string must not be empty (it would end every reply at once)")
        return stop


class _Refusing(BaseModel):
    """Refuses the fields in UNSUPPORTED, set; ignores the others it does not know."""

    model_config = ConfigDict(extra="ignore")

    _refuse_unsupported = model_validator(mode="before")(lambda body: refuse_unsupported(body, UNSUPPORTED))


class _OllamaRequest(_Refusing):
    model: str
    format: Literal["json", ""] | dict | None = None  # "json": any JSON object; a dict: a JSON schema to match
    stream: bool = True
    options: Options = Field(default_factory=Options)
    logprobs: bool = False  # each token's log-probability, the model's own (before sampling)
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)  # with logprobs, this many likeliest tokens at each place
    think: bool | Literal["low", "medium", "high"] | None = None  # a reasoning model's thinking: apart, or none

    @property
    def json_format(self) -> Node | None:
        if isinstance(self.format, dict):
            return json_format("json_schema", self.format, "format")
        return json_format("json_object" if self.format == "json" else None, None, "format")

    @property
    def constraint(self) -> object | None:
        return json_constraint(self.json_format)


class Call(BaseModel):
    function: dict  # {"name", "arguments": an object}

    @field_validator("function")
    @classmethod
    def _named_with_arguments(cls, function):
        if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments", {}), dict):
            raise ValueError("a call's function needs a name and its arguments as an object")
        return function


class Message(_Refusing):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[Call] | None = None  # an assistant's calls

    def as_dict(self) -> dict:
        """As chat templates take it: transformers' shape for calls."""
        message = {"role": self.role, "content": self.content}
        if self.tool_calls:
            calls = [call.function for call in self.tool_calls]
            message["tool_calls"] = [{"type": "function", "function": {"name": call["name"],
                                      "arguments": call.get("arguments", {})}} for call in calls]  # fmt: skip
        return message


class ChatRequest(_OllamaRequest, OffersTools):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None  # the model calls them as it sees fit (Ollama has no tool_choice)

    @model_validator(mode="after")
    def _tools_compiled(self):
        self._toolbox = toolbox(self.tools, None, None)
        if self._toolbox and self.json_format:
            raise APIError(400, "tools and a JSON format together are not supported", param="format")
        return self


class GenerateRequest(_OllamaRequest):
    _no_tools = model_validator(mode="before")(
        lambda body: refuse_unsupported(body, [("tools", bool, "tool calls are for /api/chat")])
    )
    prompt: str = ""
    system: str | None = None
    raw: bool = False  # the prompt as it is, without the chat template
    # the tokens of the conversation so far, as the last reply's `context` gave them (Ollama's old way to chat through
    # /api/generate): the prompt goes on after them
    context: list[int] | None = None


class EmbedRequest(_Refusing):
    model: str
    input: str | list[str]
    truncate: bool = True  # a text longer than the context is cut to it; false: refused

    _none_empty = field_validator("input")(none_empty)


class OldEmbeddingsRequest(_Refusing):
    model: str
    prompt: str = ""


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None  # what older clients call it


class PullRequest(ShowRequest):
    stream: bool = True


def add_ollama_routes(
    app: FastAPI,
    model,
    tokenizer: PreTrainedTokenizerBase,
    model_id: str,
    keyed: list,
    start: Callable,
    budget: Callable[[int, int | None, int, str], int],
    served: list[str],
) -> None:
    """Ollama's routes on `app`, generating with `start` and sizing replies with `budget` (create_app's); `served`:
    the models this API serves."""
    config = model.config
    context_length = getattr(config, "max_position_embeddings", None) or 2048
    facts = model_facts(model.name_or_path)
    arch = config.model_type
    details = {"format": facts.format, "family": arch, "families": [arch], "parameter_size": facts.parameter_size,
               "quantization_level": facts.quantization}  # fmt: skip
    shape = [(key, getattr(config, name, None)) for key, name in OLLAMA_SHAPE.items()]
    started = _now()
    thinking = thinks(tokenizer.chat_template)  # a reasoning model
    harmonic = speaks_harmony(tokenizer.chat_template)  # gpt-oss: it cannot be asked not to think
    capabilities = ["completion", "tools", *["thinking"] * thinking]

    def check(name: str | None) -> None:
        if name not in (model_id, f"{model_id}:latest"):  # Ollama's clients may add the default tag
            serves = ", ".join(f"'{m}'" for m in served)
            message = f"model '{name}' not found: this API serves {serves} (the models its swarm's servers hold)"
            raise APIError(404, message, param="model")

    def sampling(request: _OllamaRequest, prompt_tokens: int, extra_stop: list[str], constraint) -> Sampling:
        options = request.options
        if options.num_predict == 0:
            raise APIError(400, "options.num_predict: 0 generates nothing", param="options.num_predict")
        whole_context = options.num_predict is not None and options.num_predict < 0
        requested = None if whole_context else options.num_predict
        default = context_length if whole_context else DEFAULT_CHAT_TOKENS
        given = options.model_dump(exclude_none=True)
        return Sampling(
            max_tokens=budget(prompt_tokens, requested, default, "options.num_predict"),
            **{name: given.get(name, value) for name, value in DEFAULTS.items()},
            presence_penalty=options.presence_penalty or 0.0,
            frequency_penalty=options.frequency_penalty or 0.0,
            repeat_penalty=options.repeat_penalty or 1.0,
            repeat_last_n=64 if options.repeat_last_n is None else options.repeat_last_n,
            seed=options.seed,
            stop=tuple(dict.fromkeys([*(options.stop or []), *extra_stop])),
            logprobs=request.top_logprobs if request.logprobs else None, constraint=constraint,
        )  # fmt: skip

    def asked_to_think(request: _OllamaRequest) -> tuple[bool, dict]:
        """Whether the reply's thinking is given apart, and the chat template's variables for `think`: false asks a
        reasoning model not to think (Qwen3's templates then close an empty think block for it); true, or a level,
        of a model that does not reason is refused, as Ollama refuses it."""
        if request.think is False:
            return False, {"enable_thinking": False} if thinking else {}
        if request.think is not None and not thinking:
            raise APIError(400, f"'{model_id}' does not support thinking", param="think")
        return thinking, effort_variables(None if request.think in (None, True) else request.think, thinking, "think")

    def thoughts(apart: bool, prompt_ids) -> Callable[[str, bool], tuple[str, str]]:
        """Splits the reply's pieces, as `content` sees them (the last one `done`), into its thinking and its answer
        (with `apart`; without, all is the answer, but for gpt-oss, which thinks even so: its thinking is left out)."""
        split = ThinkingReader(opens_thinking(tokenizer, prompt_ids)).take
        if apart:
            return split
        return (lambda text, done: ("", split(text, done)[1])) if harmonic else (lambda text, done: ("", text))

    async def reply(
        request: _OllamaRequest, prompt_ids, extra_stop: list[str], http: Request, content: Callable, constraint=None,
        started: Callable = lambda generation: None,
    ):
        """Generate for `prompt_ids` (held to `constraint`, if any); each line of the reply says its text as
        `content(text, done)` does. `started` is given the generation once it has begun."""
        began = time.perf_counter()
        asked = sampling(request, prompt_ids.shape[1], extra_stop, constraint or request.constraint)
        (generation,) = await start([prompt_ids], asked, 1, http)
        started(generation)

        def line(pieces: list[Delta], done: bool = False) -> dict:
            text = "".join(piece.text for piece in pieces)
            body = {"model": request.model, "created_at": _now(), **content(text, done), "done": done}
            if request.logprobs:
                body["logprobs"] = [_logprob(entry) for piece in pieces for entry in piece.logprobs]
            return {**body, **(_statistics(generation, began) if done else {})}

        if not request.stream:
            (pieces,) = await collect_replies([generation], http)
            return line(pieces, done=True)

        async def lines() -> AsyncIterator[dict]:
            async for piece in generation.deltas():
                yield line([piece])
            yield line([], done=True)

        return GenerationResponse(_ndjson(lines()), [generation], "application/x-ndjson")

    @app.post("/api/chat", dependencies=keyed)
    async def chat(http: Request):
        request = await _parsed(http, ChatRequest)
        check(request.model)
        dialect = dialect_of(tokenizer.chat_template)
        box = request.speaking(dialect)
        apart, variables = asked_to_think(request)
        messages = [message.as_dict() for message in request.messages]
        prompt_ids = tool_prompt_ids(tokenizer, dialect, messages, box, **variables)
        split = thoughts(apart, prompt_ids)
        request.thinking(apart, apart and opens_thinking(tokenizer, prompt_ids))  # no call opens in the think block
        reader = CallReader(dialect, bool(box and box.callable))  # with tools: the content, and each call once whole

        def content(text: str, done: bool) -> dict:
            thought, text = split(text, done)
            message, calls = {"role": "assistant", "content": text}, []
            if box is not None:
                said, calls = reader.feed(text)
                message["content"] = said + (reader.rest() if done else "")
            if thought:
                message["thinking"] = thought
            return {"message": {**message, "tool_calls": [call.ollama() for call in calls]} if calls else message}

        constraint = request.toolbox.prefix() if box else None
        return await reply(request, prompt_ids, stop_strings(tokenizer), http, content, constraint)

    @app.post("/api/generate", dependencies=keyed)
    async def generate(http: Request):
        request = await _parsed(http, GenerateRequest)
        check(request.model)
        if not request.prompt:  # Ollama's way to load a model ahead: a swarm's is loaded already
            return {"model": request.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
        apart, variables = asked_to_think(request)
        context = request.context or []
        if any(not 0 <= token < config.vocab_size for token in context):
            raise APIError(400, f"context token ids must be in [0, {config.vocab_size})", param="context")
        if request.raw:  # the prompt as it is: its text says whether the model thinks (gpt-oss's reply is read apart)
            prompt_ids = tokenizer(request.prompt, add_special_tokens=not context, return_tensors="pt")["input_ids"]
            extra_stop, apart = [], apart and harmonic
        else:
            system = [{"role": "system", "content": request.system}] if request.system else []
            prompt_ids = chat_prompt_ids(tokenizer, [*system, {"role": "user", "content": request.prompt}], **variables)
            extra_stop = stop_strings(tokenizer)
        prompt_ids = torch.cat([torch.tensor([context], dtype=prompt_ids.dtype), prompt_ids], dim=1)
        split = thoughts(apart, prompt_ids)
        generations = []

        def response(text: str, done: bool) -> dict:
            thought, text = split(text, done)
            line = {"response": text, **({"thinking": thought} if thought else {})}
            if done and not request.raw:  # as Ollama: what the next request's `context` goes on from
                line["context"] = prompt_ids[0].tolist() + generations[0].outcome.token_ids
            return line

        return await reply(request, prompt_ids, extra_stop, http, response, started=generations.append)

    @app.post("/api/embed", dependencies=keyed)
    async def embed_texts(http: Request) -> dict:
        began = time.perf_counter()
        request = await _parsed(http, EmbedRequest)
        check(request.model)
        texts = [request.input] if isinstance(request.input, str) else request.input
        rows = [tokenizer(text)["input_ids"] for text in texts]
        vectors = await embed(model, rows, context_length, http.is_disconnected, truncate=request.truncate)
        return {
            "model": request.model, "embeddings": vectors.tolist(), "load_duration": 0,
            "total_duration": int((time.perf_counter() - began) * 1e9),
            "prompt_eval_count": sum(min(len(row), context_length) for row in rows),
        }  # fmt: skip

    @app.post("/api/embeddings", dependencies=keyed)
    async def embed_prompt(http: Request) -> dict:  # Ollama's older route: one text, no counts
        request = await _parsed(http, OldEmbeddingsRequest)
        check(request.model)
        if not request.prompt:  # as Ollama answers it (a way to load the model)
            return {"embedding": []}
        rows = [tokenizer(request.prompt)["input_ids"]]
        (vector,) = await embed(model, rows, context_length, http.is_disconnected, truncate=True)
        return {"embedding": vector.tolist()}

    entry = {"name": model_id, "model": model_id, "size": facts.size, "digest": "", "details": details}

    @app.get("/api/tags", dependencies=keyed)
    def tags() -> dict:
        return {"models": [{**entry, "modified_at": started}]}

    @app.get("/api/ps", dependencies=keyed)
    def running() -> dict:  # the swarm holds the model for as long as its servers serve it
        return {"models": [{**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0}]}

    @app.post("/api/show", dependencies=keyed)
    async def show(http: Request) -> dict:
        request = await _parsed(http, ShowRequest)
        check(request.model or request.name)
        info = {"general.architecture": arch, "general.parameter_count": facts.parameters, **{
            f"{arch}.{key}": value for key, value in (("context_length", context_length), *shape) if value is not None}}
        return {
            "modelfile": "", "parameters": "", "template": tokenizer.chat_template or "", "details": details,
            "model_info": info, "capabilities": capabilities, "modified_at": started,
        }  # fmt: skip

    @app.post("/api/pull", dependencies=keyed)
    async def pull(http: Request):  # the served model is there already; Meadow downloads nothing
        request = await _parsed(http, PullRequest)
        check(request.model or request.name)
        done = {"status": "success"}
        return _lines([done]) if request.stream else done

    for path, done in MANAGING.items():
        message = f"a swarm's model is held by its servers: it cannot be {done} through this API"
        app.add_api_route(path, _refusal(message), methods=["POST", "DELETE"], dependencies=keyed)

    @app.get("/api/version")
    def version() -> dict:
        return {"version": meadow.__version__}


async def _parsed(http: Request, schema: type[BaseModel]) -> BaseModel:
    """The request's body as `schema`: JSON, whatever its content type says (Ollama's own examples send curl's
    default, a form's)."""
    try:
        body = json.loads(await http.body())
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None  # answered as FastAPI's own are, naming the field


def _refusal(message: str) -> Callable:
    def refuse() -> None:
        raise APIError(400, message)

    return refuse


def _lines(lines: list[dict]) -> StreamingResponse:
    return StreamingResponse((json.dumps(line) + "\n" for line in lines), media_type="application/x-ndjson")


def _logprob(entry: TokenLogprob) -> dict:
    """A token's entry as Ollama gives it."""
    top = [{"token": token, "logprob": logprob} for token, logprob in entry.top]
    return {"token": entry.token, "logprob": entry.logprob, "top_logprobs": top}


def _statistics(generation: TextGeneration, began: float) -> dict:
    """The last line's figures, in Ollama's units (nanoseconds); the prompt's time is that of the first token."""
    outcome, nanoseconds = generation.outcome, lambda seconds: int(seconds * 1e9)
    prompt_seconds = outcome.first_token_seconds or outcome.seconds
    return {
        "done_reason": outcome.finish_reason, "total_duration": nanoseconds(time.perf_counter() - began),
        "load_duration": 0, "prompt_eval_count": generation.prompt_tokens,
        "prompt_eval_duration": nanoseconds(prompt_seconds), "eval_count": outcome.completion_tokens,
        "eval_duration": nanoseconds(outcome.seconds - prompt_seconds),
    }  # fmt: skip


async def _ndjson(lines: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for line in lines:
            yield json.dumps(line) + "\n"
    except Exception as e:  # the status line is long gone: the error travels as a line, as Ollama's does
        yield json.dumps({"error": api_error(e).message}) + "\n"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
