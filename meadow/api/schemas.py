"""The request bodies the API accepts: OpenAI's fields, checked at the edge (a bad one is a 400 naming it)."""

from __future__ import annotations

import inspect
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from meadow.api.embeddings import none_empty
from meadow.api.errors import APIError
from meadow.api.generation import Sampling
from meadow.api.json_mode import JsonPrefix
from meadow.api.json_schema import OBJECT, Node, SchemaError, compile_schema
from meadow.api.tool_calls import Function, NamedChoice, OffersTools, Tool, ToolChoice, toolbox
from meadow.client.reasoning import EFFORTS

DEFAULT_CHAT_TOKENS = 512  # OpenAI's chat default is "the rest of the context", which would reserve every
DEFAULT_COMPLETION_TOKENS = 16  # server's KV cache for the whole context; 16 is OpenAI's completions default
MAX_CHOICES = 16  # choices one request may ask for (prompts x n): each is an inference session on the servers
MAX_TOP_LOGPROBS = 20
# fields that, when set so, ask for what Meadow does not do: refused rather than answered with something else
UNSUPPORTED = [
    ("suffix", bool, "inserting text is not supported"),
    ("best_of", lambda b: b != 1, "best_of is not supported: ask for n choices and their logprobs"),
]


def refuse_unsupported(body, unsupported: list[tuple]):
    """A request's body, unless a field in it is set so that it `asks` for what Meadow does not do: then a 400 naming
    the field and the `reason` (entries of `unsupported`: (field, asks, reason))."""
    for field, asks, reason in unsupported:
        if isinstance(body, dict) and body.get(field) is not None and asks(body[field]):
            raise APIError(400, f"{field}: {reason}", param=field, code="unsupported_value")
    return body


def json_format(kind, schema, param: str) -> Node | None:
    """What a request's reply format asks for (OpenAI's type: text, json_object or json_schema with its `schema`): None
    for plain text, else the compiled schema the reply must match; a 400 naming `param` if Meadow cannot follow it."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return OBJECT
    if kind != "json_schema":
        raise APIError(400, f"{param}: the type must be text, json_object or json_schema", param=param)
    try:
        return compile_schema(True if schema is None else schema)
    except SchemaError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="unsupported_value") from None


def json_constraint(node: Node | None) -> JsonPrefix | None:
    """What a reply held to `node` (if any) follows from its start."""
    return None if node is None else JsonPrefix(node)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None  # {"name", "schema", "strict", "description"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by chat and text completions. Fields OpenAI has but Meadow does not use are ignored, unless they
    ask for a reply that Meadow would not give (`unsupported`): those are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, -100 to 100
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 stop sequences, none empty")
        return stop

    _refuse_unsupported = model_validator(mode="before")(lambda body: refuse_unsupported(body, UNSUPPORTED))

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, bias):
        if bias and any(not -100 <= value <= 100 for value in bias.values()):
            raise ValueError("biases must be in [-100, 100]")
        return bias

    def sampling(self, max_tokens: int, extra_stop: list[str] = (), **logprobs) -> Sampling:
        """The generation it asks for (`logprobs`: Sampling's logprobs and prompt_logprobs)."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=tuple(dict.fromkeys([*stops, *extra_stop])),
            logit_bias=tuple((self.logit_bias or {}).items()),
            constraint=self.constraint,
            **logprobs,
        )

    @property
    def json_format(self) -> Node | None:
        if self.response_format is None:
            return None
        schema = (self.response_format.json_schema or {}).get("schema")
        return json_format(self.response_format.type, schema, "response_format")

    @property
    def constraint(self) -> object | None:
        return json_constraint(self.json_format)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


def object_text(text: str) -> str:
    """`text`, checked: a JSON object's (a call's arguments, as OpenAI writes them)."""
    try:
        if isinstance(json.loads(text), dict):
            return text
    except ValueError:
        pass
    raise ValueError("a call's arguments must be a JSON object's text")


class FunctionCall(BaseModel):
    name: str
    arguments: str

    _an_object = field_validator("arguments")(object_text)


class MessageToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


# what apply_chat_template takes itself, what it gives the template, and the functions templates call (transformers'
# and jinja's): not for chat_template_kwargs
TEMPLATE_ARGUMENTS = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {
    "messages", "raise_exception", "strftime_now", "range", "dict", "lipsum", "cycler", "joiner", "namespace",
}


Effort = Literal[EFFORTS]


def effort_variables(effort: Effort | None, thinking: bool, param: str) -> dict:
    """The chat template's variables for a reasoning effort: `reasoning_effort`, which gpt-oss's templates read
    (another reasoning model's template may ignore it). A model that does not reason is refused one, as OpenAI's API
    refuses it."""
    if effort is None:
        return {}
    if not thinking:
        raise APIError(400, f"{param}: this model does not reason (its chat template writes no thinking)", param=param)
    return {"reasoning_effort": effort}


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool's result: the call it answers
    function_call: FunctionCall | None = None  # the older form: an assistant's one call, its result a "function" one

    def as_dict(self) -> dict:
        """{"role", "content"} with plain-text content, as chat templates take it ("developer" is the new "system",
        "function" the old "tool"), and an assistant's calls with their arguments as objects (transformers' shape)."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content or [])
        roles = {"developer": "system", "function": "tool"}
        message = {"role": roles.get(self.role, self.role), "content": content}
        if self.tool_calls or self.function_call:
            calls = [call.function for call in self.tool_calls or []] + [self.function_call] * bool(self.function_call)
            message["tool_calls"] = [{"type": "function", "function": {"name": call.name,
                                      "arguments": json.loads(call.arguments)}} for call in calls]  # fmt: skip
        return message


class ChatCompletionRequest(_Request, OffersTools):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Function] | None = None  # tools' older form: one call at most, as `function_call`
    function_call: Literal["none", "auto"] | dict | None = None  # tool_choice's; {"name": ...}: call that one
    # variables for the chat template, as vLLM takes them: {"enable_thinking": false} turns Qwen3's reasoning off
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Effort | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_the_templates_own(cls, variables):
        if taken := sorted(set(variables or {}) & TEMPLATE_ARGUMENTS):
            raise ValueError(f"{', '.join(taken)}: set by the request itself, not a template variable")
        return variables

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return self

    @model_validator(mode="after")
    def _tools_compiled(self):
        tools, choice, parallel = self.tools, self.tool_choice, self.parallel_tool_calls
        if self.functions is not None:
            if tools is not None:
                raise APIError(400, "functions is the older form of tools: send one of them", param="functions")
            named = self.function_call.get("name") if isinstance(self.function_call, dict) else None
            tools = [Tool(function=function) for function in self.functions]
            choice, parallel = NamedChoice(function={"name": named}) if named else self.function_call, False
        elif self.function_call is not None:
            raise APIError(400, "function_call needs functions", param="function_call")
        self._toolbox = toolbox(tools, choice, parallel)
        if self._toolbox and self.json_format:
            message = "tools and a JSON response_format together are not supported"
            raise APIError(400, message, param="response_format")
        return self

    @property
    def legacy(self) -> bool:
        """Whether the tools came as `functions`: the call is then answered as `function_call`."""
        return self.functions is not None

    @property
    def constraint(self) -> object | None:
        return self._toolbox.prefix() if self._toolbox else json_constraint(self.json_format)


class CompletionRequest(_Request):
    _no_tools = model_validator(mode="before")(
        lambda body: refuse_unsupported(body, [("tools", bool, "tool calls are for chat completions")])
    )
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="a text or its token ids, or a list")
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo and logprobs: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @model_validator(mode="after")
    def _not_too_many(self):
        if len(self.prompts) * self.n > MAX_CHOICES:
            asked = f"{len(self.prompts)} prompts x n={self.n}"
            raise APIError(400, f"{asked} is more than the {MAX_CHOICES} choices a request may ask for", param="n")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text or its token ids."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `user` and the like

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(description="a text or its token ids, or a list")
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32s (OpenAI's client asks)
    dimensions: int | None = Field(None, ge=1)

    _none_empty = field_validator("input")(none_empty)

    @property
    def inputs(self) -> list[str | list[int]]:
        """Each input: a text or its token ids."""
        one = isinstance(self.input, str) or (self.input and isinstance(self.input[0], int))
        return [self.input] if one else list(self.input)
