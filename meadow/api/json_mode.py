"""Replies held to JSON: OpenAI's `response_format` (`json_object`, `json_schema`), Ollama's `format` ("json" or a
schema). At each step the likeliest token (or, when sampling, a draw) that keeps the reply the beginning of a JSON value
its schema allows is taken; once the value is whole, the end of sequence. A token's text is checked character by
character against a pushdown machine of the schema (json_schema.py), so only the few tokens tried cost anything, not
the whole vocabulary."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from meadow.api.errors import APIError
from meadow.api.json_numbers import reachable, within
from meadow.api.json_schema import Node
from meadow.client.harmony import markup_ids

WHITESPACE = " \t\n\r"
MAX_INDENT = 20  # spaces or tabs after a line break
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
# a number's states (-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?), where each kind of character leads from each, and where it
# may end
NUMBER_MOVES = {
    "sign": {"0": "zero", "digit": "int"},
    "zero": {".": "dot", "e": "e"},
    "int": {"0": "int", "digit": "int", ".": "dot", "e": "e"},
    "dot": {"0": "frac", "digit": "frac"},
    "frac": {"0": "frac", "digit": "frac", "e": "e"},
    "e": {"0": "exp", "digit": "exp", "+": "esign", "-": "esign"},
    "esign": {"0": "exp", "digit": "exp"},
    "exp": {"0": "exp", "digit": "exp"},
}
NUMBER_ENDS = {"zero", "int", "frac", "exp"}
MAX_READINGS = 32  # ways of reading a reply kept at once: any one of them keeps it valid, and anyOf nested in
# anyOf could otherwise multiply them with every bracket
DRAWS = 64  # tokens drawn at once when sampling (without replacement: each the next draw of a rejection sampler)


# What the reader is in the middle of: a stack of these, the innermost last.
class Value(NamedTuple):  # a value of `node` to come (whitespace first, maybe)
    node: Node


class Object(NamedTuple):
    node: Node
    next: int = 0  # the first of node.properties still allowed (they come in order)
    expect: str = "key_or_end"  # key_or_end, key, in_key, colon, value, comma_or_end
    value: Node | None = None  # the schema of the value after the colon


class Array(NamedTuple):
    node: Node
    count: int = 0
    expect: str = "value_or_end"  # value_or_end, value, comma_or_end


class String(NamedTuple):  # a string value, or a key of an object that takes any key
    node: Node  # its minLength, maxLength and patterns
    text: str = ""  # read so far, escapes decoded
    escape: str = ""  # an escape begun: "\\" after the backslash, then "u" and the hex digits so far


class Key(NamedTuple):  # one of an object's declared property names, after its opening quote
    options: tuple[tuple[str, int], ...]  # (the rest of the quoted name, the property's index)


class Literal(NamedTuple):  # true, false, null, or one of an enum's texts
    options: tuple[str, ...]  # the rest of each text still possible; "" when it may end here


class Number(NamedTuple):
    state: str  # see NUMBER_MOVES
    integer: bool
    node: Node  # its bounds
    text: str  # read so far


END = "end"  # the whole value read: only whitespace may follow
STRUCTURE = (Value, Object, Array, str)  # where whitespace is not content


def _gap(gap: int, c: str) -> int | None:
    """Whitespace between two parts of the reply is one space, or a line break and an indent (a model left free pads
    with blank lines); `gap` says what came so far: 0 nothing, -1 a space, n > 0 a line break and n - 1 indent
    characters. None: `c` may not come next."""
    if gap == 0:
        return -1 if c == " " else 1 if c == "\n" else None
    return gap + 1 if gap > 0 and c in " \t" and gap <= MAX_INDENT else None


class JsonPrefix:
    """Where a reply stands in the JSON values a schema allows. `fed(text)` is the state after `text`, or None when
    the reply would no longer begin such a value; `complete` says it is one, `finished` that nothing but whitespace
    may follow. Immutable: the chooser tries tokens from the same state."""

    def __init__(self, node: Node, stacks: tuple[tuple, ...] | None = None, gap: int = 0):
        self.node = node
        self.stacks = stacks or ((Value(node),),)  # each way of reading the reply so far (anyOf: more than one)
        self.gap = gap  # the whitespace just read, see _gap

    def fed(self, text: str) -> "JsonPrefix | None":
        stacks, gap = self.stacks, self.gap
        for c in text:
            stacks = tuple(dict.fromkeys(after for stack in stacks for after in _step(stack, c)))[:MAX_READINGS]
            if not stacks:
                return None
            if c in WHITESPACE and all(isinstance(stack[-1], STRUCTURE) for stack in stacks):
                gap = _gap(gap, c)
                if gap is None:
                    return None
            elif gap and c in ",:":
                return None  # no whitespace before a comma or a colon
            else:
                gap = 0
        return JsonPrefix(self.node, stacks, gap)

    @property
    def complete(self) -> bool:
        return any(_ended(stack) == (END,) for stack in self.stacks)

    @property
    def finished(self) -> bool:
        return all(stack == (END,) for stack in self.stacks)


def _ended(stack: tuple) -> tuple:
    """The stack once a number or literal that may end here has ended."""
    top = stack[-1]
    if type(top) is Number and _number_ends(top) or type(top) is Literal and "" in top.options:
        return _done(stack[:-1])
    return stack


def _step(stack: tuple, c: str) -> list[tuple]:
    """Each way of reading one more character `c` from `stack`."""
    top, below = stack[-1], stack[:-1]
    kind = type(top)
    if kind is String:
        return _string(top, below, c)
    if kind is Key:
        return _key(top, below, c)
    if kind is Literal:
        options = tuple(rest[1:] for rest in top.options if rest[:1] == c)
        if options:
            return [_literal(below, options)]
        return _step(_done(below), c) if "" in top.options else []
    if kind is Number:
        moves = NUMBER_MOVES[top.state]
        move = moves.get("0" if c == "0" else "digit" if c in DIGITS else "e" if c in "eE" else c)
        if move and _number_may_go(top.node, top.integer, move, top.text + c):
            return [(*below, top._replace(state=move, text=top.text + c))]
        return _step(_done(below), c) if _number_ends(top) else []
    if c in WHITESPACE:  # between the value's parts (not before a comma or a colon: see fed), not around it
        return [stack] if kind is Value and below or kind in (Object, Array) and _spaced(top) else []
    if kind is Value:
        return _start(top.node, below, c)
    if kind is Object:
        return _object(top, below, c)
    if kind is Array:
        return _array(top, below, c)
    return []  # END: nothing but whitespace


def _spaced(top: Object | Array) -> bool:
    """Whether whitespace may come next in an object or array: not after a key, and after a value only where the
    container may close (the whitespace cannot come before a comma)."""
    if top.expect == "comma_or_end":
        return _may_close(top)
    return top.expect != "colon"


def _may_close(top: Object | Array) -> bool:
    if type(top) is Array:
        return top.count >= top.node.min_items
    return not any(name in top.node.required for name, _ in top.node.properties[top.next :])


def _start(node: Node, below: tuple, c: str) -> list[tuple]:
    """The ways a value of `node` can begin with `c`."""
    ways = []
    for option in node.alternatives():
        if option.enum is not None:
            texts = tuple(text[1:] for text in option.enum if text[0] == c)
            ways += [_literal(below, texts)] if texts else []
            continue
        types = option.types
        if c == "{" and "object" in types:
            ways.append((*below, Object(option)))
        elif c == "[" and "array" in types:
            ways.append((*below, Array(option)))
        elif c == '"' and "string" in types:
            ways.append((*below, String(option)))
        elif c in "tf" and "boolean" in types or c == "n" and "null" in types:
            ways.append(_literal(below, ({"t": "rue", "f": "alse", "n": "ull"}[c],)))
        elif (c == "-" or c in DIGITS) and types & {"number", "integer"}:
            integer, state = "number" not in types, "sign" if c == "-" else "zero" if c == "0" else "int"
            if reachable(c, integer, option.lower, option.upper):
                ways.append((*below, Number(state, integer, option, c)))
    return ways


def _number_may_go(node: Node, integer: bool, move: str, text: str) -> bool:
    """Whether a number may go on to `text` (in state `move`): integers have no fraction or exponent, bounded numbers
    no exponent, and some number beginning with `text` must lie within the bounds."""
    if move in ("dot", "e", "esign", "exp") and (integer or move != "dot" and (node.lower or node.upper)):
        return False
    return reachable(text, integer, node.lower, node.upper)


def _number_ends(top: Number) -> bool:
    return top.state in NUMBER_ENDS and within(top.text, top.node.lower, top.node.upper)


def _literal(below: tuple, options: tuple[str, ...]) -> tuple:
    return _done(below) if options == ("",) else (*below, Literal(options))


def _done(below: tuple) -> tuple:
    """The stack once the value (or free key) on top of `below` is whole."""
    if not below:
        return (END,)
    parent = below[-1]
    if type(parent) is Array:
        return (*below[:-1], parent._replace(count=parent.count + 1, expect="comma_or_end"))
    if parent.expect == "in_key":
        return (*below[:-1], parent._replace(expect="colon"))
    return (*below[:-1], parent._replace(expect="comma_or_end", value=None))


def _object(top: Object, below: tuple, c: str) -> list[tuple]:
    node, expect = top.node, top.expect
    declared = node.properties[top.next :]
    may_close = _may_close(top)
    if expect in ("key_or_end", "key"):
        if c == "}" and expect == "key_or_end" and may_close:
            return [_done(below)]
        if c != '"':
            return []
        if not node.properties:  # any key, if any is allowed
            key = String(Node(types=frozenset({"string"})))
            return [(*below, top._replace(expect="in_key", value=node.extra), key)] if node.extra else []
        options = []
        for index, (name, _) in enumerate(declared, start=top.next):
            options.append((json.dumps(name, ensure_ascii=False)[1:], index))
            if name in node.required:
                break  # a required property cannot be skipped
        return [(*below, top._replace(expect="in_key"), Key(tuple(options)))] if options else []
    if expect == "colon":
        return [(*below, top._replace(expect="value"), Value(top.value))] if c == ":" else []
    if expect == "comma_or_end":
        if c == "," and (declared or not node.properties):
            return [(*below, top._replace(expect="key"))]
        if c == "}" and may_close:
            return [_done(below)]
    return []


def _key(top: Key, below: tuple, c: str) -> list[tuple]:
    options = tuple((rest[1:], index) for rest, index in top.options if rest[0] == c)
    for rest, index in options:
        if not rest:  # its closing quote
            parent = below[-1]
            value = parent.node.properties[index][1]
            return [(*below[:-1], parent._replace(next=index + 1, expect="colon", value=value))]
    return [(*below, Key(options))] if options else []


def _array(top: Array, below: tuple, c: str) -> list[tuple]:
    node = top.node
    if c == "]" and top.expect != "value" and _may_close(top):
        return [_done(below)]
    if top.expect == "value_or_end" and node.max_items != 0:
        return _start(node.items, (*below, top._replace(expect="value")), c)
    if top.expect == "comma_or_end" and c == "," and (node.max_items is None or top.count < node.max_items):
        return [(*below, top._replace(expect="value"), Value(node.items))]
    return []


def _string(top: String, below: tuple, c: str) -> list[tuple]:
    node = top.node
    if top.escape == "\\":
        if c == "u" and not node.patterns:  # with patterns, only escapes whose character is known at once
            return [(*below, top._replace(escape="u"))]
        return _append(top, below, ESCAPES[c]) if c in ESCAPES else []
    if top.escape:  # \u and its hex digits so far
        digits = top.escape[1:] + c
        if c not in HEX:
            return []
        if len(digits) < 4:
            return [(*below, top._replace(escape="u" + digits))]
        return _append(top, below, chr(int(digits, 16)))
    if c == '"':
        return [_done(below)] if len(top.text) >= node.min_length and _fits(node, top.text, partial=False) else []
    if node.max_length is not None and len(top.text) >= node.max_length or ord(c) < 0x20:
        return []  # control characters must be escaped
    if c == "\\":
        return [(*below, top._replace(escape="\\"))] if any(_fits(node, top.text + e) for e in ESCAPES.values()) else []
    return _append(top, below, c)


def _append(top: String, below: tuple, c: str) -> list[tuple]:
    """The string with one more character, if its patterns may still match."""
    text = top.text + c
    return [(*below, top._replace(text=text, escape=""))] if _fits(top.node, text) else []


def _fits(node: Node, text: str, partial: bool = True) -> bool:
    """Whether a string beginning with `text` may match node's patterns (regex's partial matching), or, not `partial`,
    `text` itself matches them."""
    return all(pattern.search(text, partial=partial) for pattern in node.patterns)


@lru_cache(maxsize=4)
def token_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, ...]:
    """Each token's text as it reads after other text (None for special tokens, which are never part of a JSON reply).
    Decoded after a token of its own, not alone: SentencePiece-style tokenizers drop the space a word's token begins
    with at the start of a text, and the reply would then hold spaces the state machine never saw."""
    special = set(tokenizer.all_special_ids) - set(markup_ids(tokenizer))  # harmony's markup is part of a call
    before = tokenizer.encode("a", add_special_tokens=False)
    start = tokenizer.decode(before)
    texts = tokenizer.batch_decode([[*before, i] for i in range(len(tokenizer))])
    return tuple(
        None if i in special else text[len(start) :] if text.startswith(start) else tokenizer.decode([i])
        for i, text in enumerate(texts)
    )


class PrefixChooser(LogitsProcessor):
    """Chooses the next token, the likeliest (or, with a `generator`, one drawn from softmax(scores)) whose text
    `state` takes (a JsonPrefix, or any machine with its `fed`, `complete` and `finished`: tool_calls.py's); an
    end-of-sequence token where the reply may end (and must, once it is finished). Returns scores that keep only that
    token, so that a greedy generate picks it. Goes last among the processors."""

    def __init__(self, state, texts: tuple[str | None, ...], eos_ids: list[int], generator: torch.Generator | None):
        self.state, self.texts, self.eos_ids, self.generator = state, texts, eos_ids, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = self._choose(scores[0])
        return torch.full_like(scores, float("-inf")).index_fill_(1, torch.tensor([chosen], device=scores.device), 0.0)

    def _choose(self, scores: torch.Tensor) -> int:
        if self.state.finished and self.eos_ids:
            return max(self.eos_ids, key=lambda i: scores[i].item())
        for token in self._candidates(scores.float().cpu()):
            if token in self.eos_ids:
                if self.state.complete:
                    return token
                continue
            text = self.texts[token] if token < len(self.texts) else None
            state = self.state.fed(text) if text else None
            if state is not None:
                self.state = state
                return token
        # every token tried: only a schema's name or text that no token spells (a rare character split into bytes)
        message = "the reply's JSON schema or tools ask for text that no token of this model spells"
        raise APIError(400, message, code="unsupported_value")

    def _candidates(self, scores: torch.Tensor):
        """Token ids in the order they are tried: by score (the first few, then all), or drawn one after another without
        replacement, then the rest by score (a reply that no draw continues)."""
        if self.generator is None:
            first = scores.topk(min(DRAWS, len(scores))).indices.tolist()
        else:
            probs = torch.softmax(scores, dim=-1)
            first = torch.multinomial(probs, min(DRAWS, int((probs > 0).sum())), generator=self.generator).tolist()
        yield from first
        tried = set(first)
        yield from (token for token in scores.argsort(descending=True).tolist() if token not in tried)
