"""Tool calls (OpenAI's `tools` and `tool_choice`, Ollama's `tools`): the functions shown to the model, its calls read
back out of the reply. A call is written as the model's chat template shows it (a `Dialect`): as Hermes and Qwen models
are trained to write it,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(also the form Meadow describes to models whose template shows no tools), or as Llama 3's, the whole reply
`{"name": "get_weather", "parameters": {"city": "Paris"}}`. Once the reply opens a call, the rest is held to it
(json_mode.py's chooser, following `ToolCallPrefix`): the name is one of the tools', the arguments match that tool's
parameters, so every call the API returns can be made. Before a call the model writes freely (`auto`), or nothing
(`required`, a named tool); `none` never opens one."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import BaseModel, Field, PrivateAttr

from meadow.api.errors import APIError
from meadow.api.json_mode import JsonPrefix
from meadow.api.json_schema import Node, SchemaError, compile_schema
from meadow.client.chat_prompt import chat_prompt_ids
from meadow.client import harmony, reasoning

OPEN, CLOSE = "<tool_call>", "</tool_call>"
LLAMA_FORMAT = '"parameters": dictionary of argument name'  # what Llama 3's templates tell the model
MAX_TOOLS = 128  # as OpenAI's
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# shown to a model whose chat template does not show tools itself; the call's form is the one it is held to
TOOLS_PROMPT = """You can call functions to help with the user's request. Each is described here in a JSON object:
<tools>
{tools}
</tools>
To call one, reply with a JSON object holding its name and arguments between <tool_call> and </tool_call>:
<tool_call>
{{"name": "the function's name", "arguments": {{"an argument": "its value"}}}}
</tool_call>
The result comes back between <tool_response> and </tool_response>."""


@dataclass(frozen=True)
class Dialect:
    """How a model writes its calls, and whether its chat template shows the tools itself."""

    marker: str | None  # what opens a call after text; None: a call is the whole reply
    start: str  # what a call begins with (after the marker): the name comes first, as the models write it
    arguments: str  # the arguments' key, as it follows the name
    end: str  # what ends a call
    again: str | None  # what opens another call after one (then `start`); None: one call a reply
    shown: bool  # the template shows the tools (else Meadow describes them, and the calls, in the Hermes form)
    quoted: bool = True  # the name is written as a JSON string (harmony's is bare)
    think: tuple[str, str] = (reasoning.OPEN, reasoning.CLOSE)  # how a reasoning model's thinking opens and closes
    reads: Dialect | None = None  # the form the reply's text is read in when not this one (see HARMONY)


HERMES = Dialect(OPEN, '\n{"name": ', ', "arguments": ', "}\n" + CLOSE, "\n" + OPEN, shown=True)
DESCRIBED = replace(HERMES, shown=False)
LLAMA = Dialect(None, '{"name": ', ', "parameters": ', "}", None, shown=True)
# gpt-oss's, in harmony's markup (client/harmony.py): a message to the function, its arguments as JSON, then <|call|>
# (the end of the reply, so nothing to write), one call a reply; the reasoning is the analysis channel. A reply's text
# is read with the calls rewritten in the Hermes form, which the readers below know.
HARMONY = Dialect(
    harmony.CALL_MARKER, "", f" {harmony.CONSTRAIN}json{harmony.MESSAGE}", "", None, shown=True, quoted=False,
    think=(harmony.CHANNEL + "analysis" + harmony.MESSAGE, harmony.ENDS[0]), reads=HERMES,
)


def dialect_of(template: str | None) -> Dialect:
    """How a model whose chat template is `template` writes calls (and whether the template shows tools)."""
    if template and "tools" in template and harmony.speaks_harmony(template):
        return HARMONY
    if template and "tools" in template and OPEN in template:
        return HERMES
    if template and "tools" in template and LLAMA_FORMAT in template:
        return LLAMA
    return DESCRIBED


class Function(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule: every model can spell it
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # always: the arguments are held to `parameters`


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: Function


class NamedChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict  # {"name": ...}


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


@dataclass(frozen=True)
class Toolbox:
    """The tools a request offers, their parameters compiled, and how the reply may use them."""

    tools: tuple[Tool, ...]
    parameters: dict[str, Node]  # name -> the schema its arguments follow
    callable: tuple[str, ...]  # the names the reply may call: none ("none"), one (a named choice) or all
    free: bool  # text may come before a call (auto, none); else the reply is calls only
    parallel: bool  # more than one call in a reply (if the dialect has more than one)
    dialect: Dialect = DESCRIBED
    # a reasoning model's think block, in which a call's marker is only text: "may" (the reply may begin with one),
    # "inside" (its template opened it) or None
    thinking: Literal["may", "inside"] | None = None

    def speaking(self, dialect: Dialect) -> "Toolbox":
        """The same tools, called in `dialect`."""
        return replace(self, dialect=dialect)

    def prefix(self) -> "ToolCallPrefix":
        """The machine a reply follows, at its start."""
        d = self.dialect
        if not self.free:
            return ToolCallPrefix(self, ("spell", (d.marker or "") + d.start, _names(self)))
        if d.marker is None:  # a call only as the whole reply: its first character tells
            return ToolCallPrefix(self, ("first",) if self.callable else ("text",))
        if self.thinking is not None:
            return ToolCallPrefix(self, ("think", 0) if self.thinking == "inside" else ("start", ""))
        return ToolCallPrefix(self, ("free", 0))

    def shown(self) -> list[dict]:
        """The tools as chat templates take them (OpenAI's shape)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


class OffersTools(BaseModel):
    """A request that may offer tools: its Toolbox (set once its fields are checked), then called in the model's
    dialect once the route knows the model."""

    _toolbox: Toolbox | None = PrivateAttr(None)

    @property
    def toolbox(self) -> Toolbox | None:
        """The tools the reply may call, if it is offered any."""
        return self._toolbox

    def speaking(self, dialect: Dialect) -> Toolbox | None:
        """The toolbox, from now on called as `dialect` writes calls."""
        if self._toolbox is not None:
            self._toolbox = self._toolbox.speaking(dialect)
        return self._toolbox

    def thinking(self, thinks: bool, inside: bool) -> None:
        """A reasoning model's reply (`thinks`) may begin with a think block, or begins inside one (`inside`): no
        call opens in it."""
        if self._toolbox is not None and thinks:
            self._toolbox = replace(self._toolbox, thinking="inside" if inside else "may")


def toolbox(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None) -> Toolbox | None:
    """A request's Toolbox (None when it offers no tools), or a 400 naming what is wrong."""
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"tools: at most {MAX_TOOLS} tools", param="tools")
    parameters = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}].function.parameters"
        name, schema = tool.function.name, tool.function.parameters or NO_PARAMETERS
        if name in parameters:
            raise APIError(400, f"tools: two tools are named {name!r}", param="tools")
        if schema.get("type") != "object":
            raise APIError(400, f"{where}: the arguments must be an object (type: object)", param="tools")
        try:
            parameters[name] = compile_schema(schema, where)
        except SchemaError as e:
            raise APIError(400, str(e), param="tools", code="unsupported_value") from None
    names = tuple(parameters)
    if isinstance(choice, NamedChoice):
        named = choice.function.get("name")
        if named not in parameters:
            raise APIError(400, f"tool_choice: no tool is named {named!r}", param="tool_choice")
        names = (named,)
    callable_ = () if choice == "none" else names
    free = choice in (None, "auto", "none")
    parallel = parallel is not False and not isinstance(choice, NamedChoice)  # a named tool: one call of it
    return Toolbox(tuple(tools), parameters, callable_, free, parallel)


def _names(box: Toolbox, made: frozenset = frozenset()) -> tuple:
    quoted = json.dumps if box.dialect.quoted else str
    return "name", tuple((quoted(name) + box.dialect.arguments, name) for name in box.callable), made


def _spelled(text: str, then: tuple) -> tuple:
    """The phase that spells `text` (if any), then is `then`."""
    return ("spell", text, then) if text else then


def _same(name: str, arguments) -> str:
    """What two calls have alike when they are the same call, however their arguments are spaced or ordered."""
    return json.dumps([name, arguments], sort_keys=True)


class ToolCallPrefix:
    """Where a reply stands: free text, then calls (see the module's doc). Like JsonPrefix: `fed(text)` is the state
    after `text` or None, `complete` says the reply may end here, `finished` that it must. Immutable. A phase is one of
    ("start", the text so far) and ("think", characters of its end just read) (a reasoning model's reply: before
    anything but whitespace, and in its think block), ("free", characters of the dialect's marker just read), ("first",)
    and ("text",) (a dialect whose call is the whole reply: before its first character, and text that is no call),
    ("spell", the text that must come, the phase after it), ("name", (the rest of each name still possible, with the
    arguments' key after it; the name), made), ("args", name, JsonPrefix, their text, made), ("after", made, repeated);
    `made` holds the calls made so far (as `_same` writes them). A call that repeats one already made ends the reply (a
    small model, asked for calls, would go on repeating it): it is not read back (`_calls`)."""

    def __init__(self, box: Toolbox, phase: tuple):
        self.box, self.phase = box, phase

    def fed(self, text: str) -> "ToolCallPrefix | None":
        phase = self.phase
        for c in text:
            phase = self._step(phase, c)
            if phase is None:
                return None
        return ToolCallPrefix(self.box, phase)

    def _step(self, phase: tuple, c: str) -> tuple | None:
        kind, dialect = phase[0], self.box.dialect
        if kind == "start":  # before anything but whitespace: a think block may open
            text, opening = phase[1] + c, dialect.think[0]
            if text.lstrip() == opening:
                return "think", 0
            if opening.startswith(text.lstrip()):
                return "start", text
            phase = "free", 0  # no think block: all of it is free text (too short to hold a whole marker)
            for c in text:
                phase = self._step(phase, c)
            return phase
        if kind == "think":  # all is thinking up to its end, a call's marker too
            closing = dialect.think[1]
            seen = reasoning.begun(closing[: phase[1]] + c, closing)
            return ("free", 0) if seen == len(closing) else ("think", seen)
        if kind == "free":
            seen = reasoning.begun(dialect.marker[: phase[1]] + c, dialect.marker)
            if seen < len(dialect.marker):
                return "free", seen
            return _spelled(dialect.start, _names(self.box)) if self.box.callable else None
        if kind == "first":
            return self._step(("spell", dialect.start, _names(self.box)), c) if c == dialect.start[0] else ("text",)
        if kind == "text":
            return phase
        if kind == "spell":
            _, rest, then = phase
            if c != rest[0]:
                return None
            return ("spell", rest[1:], then) if len(rest) > 1 else then
        if kind == "name":
            _, options, made = phase
            options = tuple((rest[1:], name) for rest, name in options if rest[0] == c)
            ended = [name for rest, name in options if not rest]
            if ended:
                return "args", ended[0], JsonPrefix(self.box.parameters[ended[0]]), "", made
            return ("name", options, made) if options else None
        if kind == "args":
            _, name, arguments, text, made = phase
            if arguments.finished:
                call = _same(name, json.loads(text))
                return self._step(("spell", dialect.end, ("after", made | {call}, call in made)), c)
            arguments = arguments.fed(c)
            if arguments and arguments.finished and not dialect.end:  # nothing to write after it (HARMONY's)
                call = _same(name, json.loads(text + c))
                return "after", made | {call}, call in made
            return arguments and ("args", name, arguments, text + c, made)
        if self._last(phase):
            return None
        return self._step(("spell", dialect.again + dialect.start, _names(self.box, phase[1])), c)

    def _last(self, phase: tuple) -> bool:
        """Whether no call may follow the one just made (`phase` is "after" one)."""
        return phase[2] or not self.box.parallel or self.box.dialect.again is None

    @property
    def complete(self) -> bool:
        return self.phase[0] in ("start", "think", "free", "first", "text", "after")

    @property
    def finished(self) -> bool:
        return self.phase[0] == "after" and self._last(self.phase)


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: dict
    text: str  # the arguments as the model wrote them (what the API gives, as OpenAI's does)

    def openai(self, index: int | None = None) -> dict:
        function = {"name": self.name, "arguments": self.text}
        call = {"id": self.id, "type": "function", "function": function}
        return call if index is None else {"index": index, **call}

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class CallPiece:
    """What a streamed reply tells of one call, as it is written: the call begins (`begins`: its id and name are
    known), more of its arguments' text comes, and it is `whole`."""

    index: int  # among the reply's calls
    id: str
    name: str
    arguments: str  # the arguments' text since the call's last piece
    begins: bool
    whole: Call | None  # once its arguments are whole

    def openai(self) -> dict:
        """The piece as a streamed chat completion gives it (OpenAI's shape: the id and name with the first piece)."""
        if self.begins:
            function = {"name": self.name, "arguments": self.arguments}
            return {"index": self.index, "id": self.id, "type": "function", "function": function}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass(frozen=True)
class _Written:
    """A call in a reply's text, maybe not whole: its name (once whole) and its arguments' text so far."""

    name: str | None
    arguments: str
    whole: dict | None  # the arguments, once whole


@dataclass
class _Begun:
    index: int
    id: str
    given: int = -1  # characters of the arguments' text handed out (-1: not even the call's beginning)
    ended: bool = False


class CallReader:
    """Reads a reply as it grows: the text before its first call (its content), then its calls. Text that may be the
    beginning of a call (a piece of the marker, whitespace; in a dialect whose call is the whole reply, nothing yet)
    is held back until it is known not to be. `callable`: whether the reply may call at all. `feed` gives each call
    once whole; `stream` each call's pieces as they are written, but a call of a function called before in the reply
    comes whole: it may repeat the earlier call (the same arguments, however spaced), which ends the reply and is not
    read back."""

    def __init__(self, dialect: Dialect = DESCRIBED, callable: bool = True):
        self.dialect, self.callable = dialect.reads or dialect, callable
        self.text, self.given = "", 0  # the reply so far; content handed out
        self.begun: dict[int, _Begun] = {}  # the calls handed out (by their place among the written ones)
        self.skipped: set[int] = set()  # repeated calls

    def feed(self, piece: str) -> tuple[str, list[Call]]:
        """The content and the calls that `piece` completes."""
        return self._read(piece, streamed=False)

    def stream(self, piece: str) -> tuple[str, list[CallPiece]]:
        """The content and the calls' pieces that `piece` brings."""
        return self._read(piece, streamed=True)

    def _read(self, piece: str, streamed: bool) -> tuple[str, list]:
        self.text += piece
        start = self._call_start()
        if start is None:
            held = reasoning.begun(self.text, self.dialect.marker or "")  # not all of it: no call has begun
            safe = len(self.text[: len(self.text) - held].rstrip())
            content, self.given = self.text[self.given : max(safe, self.given)], max(safe, self.given)
            return content, []
        content = self.text[self.given : len(self.text[:start].rstrip())]
        self.given = len(self.text)  # nothing after the first call is content
        pieces = self._pieces(_read_calls(self.text[start:], self.dialect), streamed)
        return content, pieces if streamed else [piece.whole for piece in pieces if piece.whole is not None]

    def _pieces(self, written: list[_Written], streamed: bool) -> list[CallPiece]:
        pieces, made, names = [], set(), set()  # the calls before (as `_same` writes them), their functions
        for at, call in enumerate(written):
            same = None if call.whole is None else _same(call.name, call.whole)
            begun = self.begun.get(at)
            if begun is None and at not in self.skipped:
                if same is not None and same in made:  # a repeat: the reply ends with it
                    self.skipped.add(at)
                elif call.whole is not None or streamed and call.name not in (None, *names):
                    begun = self.begun[at] = _Begun(len(self.begun), f"call_{uuid.uuid4().hex[:24]}")
                else:
                    break  # held back until its name, or all of it, is written
            made.add(same)
            names.add(call.name)
            if begun is None or begun.ended:
                continue
            whole = Call(begun.id, call.name, call.whole, call.arguments) if call.whole is not None else None
            fresh = call.arguments[max(begun.given, 0) :]
            if fresh or whole or begun.given < 0:
                pieces.append(CallPiece(begun.index, begun.id, call.name, fresh, begun.given < 0, whole))
            begun.given, begun.ended = len(call.arguments), whole is not None
        return pieces

    def _call_start(self) -> int | None:
        """Where the first call begins, if the reply has one."""
        if not self.callable:
            return None
        if self.dialect.marker is None:
            return 0 if self.text[:1] == self.dialect.start[0] or not self.text else None
        start = self.text.find(self.dialect.marker)
        return start if start >= 0 else None

    def rest(self) -> str:
        """The content held back, once the reply has ended (trailing whitespace is not given)."""
        return "" if self.text and self._call_start() is not None else self.text[self.given :].rstrip()


def _read_calls(text: str, dialect: Dialect) -> list[_Written]:
    """The calls in `text`, which begins with the first (written as ToolCallPrefix holds them), the last maybe cut."""
    calls, decoder, at = [], json.JSONDecoder(), 0
    opening = (dialect.marker or "") + dialect.start  # up to the name
    while at < len(text) and text.startswith(opening[: len(text) - at], at):
        name = end = None
        try:
            name, end = decoder.raw_decode(text, at + len(opening))
            if not text.startswith(dialect.arguments, end):
                raise ValueError("not yet")
            arguments_at = end + len(dialect.arguments)
            whole, end = decoder.raw_decode(text, arguments_at)
            arguments = text[arguments_at:end]
        except ValueError:  # cut short
            known = name is not None and text.startswith(dialect.arguments, end)  # the name, and the arguments began
            arguments = text[end + len(dialect.arguments) :] if known else ""
            calls.append(_Written(name if known else None, arguments, None))
            break
        calls.append(_Written(name, arguments, whole))
        if dialect.again is None:
            break
        # past the call's end (its closing brace first) and what opens the next
        at = end + len(dialect.end) + len(dialect.again) - len(dialect.marker)
    return calls


def read_reply(text: str, dialect: Dialect = DESCRIBED, callable: bool = True) -> tuple[str, list[Call]]:
    """A whole reply's content and calls."""
    reader = CallReader(dialect, callable)
    content, calls = reader.feed(text)
    return content + reader.rest(), calls


def conversation(dialect: Dialect, messages: list[dict], box: Toolbox | None) -> tuple[list[dict], list | None]:
    """`messages` (transformers' shape: an assistant's `tool_calls` with their arguments as objects, "tool" messages
    with the results) and the tools, as the chat template is given them. A template that shows tools (its `dialect`
    says) takes them as they are; for any other, the tools are described in the system message, calls written into
    the assistant's text and results sent as the user's, each in its tags (the Hermes form). (A template that takes
    no system message gets it in the first user message: chat_prompt_ids.)"""
    if dialect.shown:
        return messages, box.shown() if box and box.callable else None
    out = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # the results of one turn's calls, as one message
                out[-1]["content"] += "\n" + content
                continue
            out.append({"role": "user", "content": content, "tool_results": True})
            continue
        calls = [_written(call["function"]) for call in message.get("tool_calls") or []]
        out.append({"role": role, "content": "\n".join([content, *calls] if content else calls)})
    if box and box.callable:
        described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in box.shown()))
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + described
        else:
            out.insert(0, {"role": "system", "content": described})
    return [{"role": m["role"], "content": m["content"]} for m in out], None


def _written(function: dict) -> str:
    """A call as the reply writes it."""
    return f"{OPEN}\n{json.dumps({'name': function['name'], 'arguments': function['arguments']})}\n{CLOSE}"


def tool_prompt_ids(tokenizer, dialect: Dialect, messages: list[dict], box: Toolbox | None, **template_kwargs
                    ) -> torch.Tensor:  # fmt: skip
    """The prompt's token ids for `messages` with `box`'s tools (see `conversation`)."""
    return chat_prompt_ids(tokenizer, *conversation(dialect, messages, box), **template_kwargs)
