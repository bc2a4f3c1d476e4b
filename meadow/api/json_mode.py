"""JSON mode (OpenAI's `response_format: {"type": "json_object"}`, Ollama's `"format": "json"`): the reply is a JSON
object. At each step the likeliest token (or, when sampling, a draw) that keeps the text a prefix of a JSON object is
taken; once the object is closed, the end of sequence. A token's text is checked character by character against a
small JSON state machine, so only the few tokens tried cost anything, not the whole vocabulary."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

WHITESPACE = " \t\n\r"
MAX_WHITESPACE = 16  # in a row, outside strings: a model may otherwise pad forever
LITERALS = {"t": "true", "f": "false", "n": "null"}
# a number's states (-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?) and where each character kind leads from each
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
DRAWS = 64  # tokens drawn at once when sampling (without replacement: each the next draw of a rejection sampler)


class JsonPrefix:
    """Where a text stands in a JSON object: `feed` says whether it is still a prefix of one; `closed` whether the
    object is complete."""

    def __init__(self):
        self.stack: list[str] = []  # "{" or "[" of each open container
        self.expect = "start"  # start, value, key, key_or_end, value_or_end, colon, comma_or_end, closed
        self.string: str | None = None  # inside a string: "key" or "value"; escape: pending escape characters
        self.escape = ""
        self.number = ""  # the state of a number being read, see _number
        self.literal = ""  # what is left of true, false or null
        self.spaces = 0

    @property
    def closed(self) -> bool:
        return self.expect == "closed" and not self.number

    def copy(self) -> "JsonPrefix":
        twin = copy.copy(self)
        twin.stack = list(self.stack)  # the only field that is not a plain value
        return twin

    def feed(self, text: str) -> bool:
        return all(self._char(c) for c in text)

    def _char(self, c: str) -> bool:
        if self.string is not None:
            return self._in_string(c)
        if self.literal:
            if c != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._value_done()
            return True
        if self.number:
            if self._number(c):
                return True
            if self.number not in ("zero", "int", "frac", "exp"):
                return False
            self.number = ""
            self._value_done()  # the number ended with the character that follows it
        if c in WHITESPACE:
            self.spaces += 1
            return self.spaces <= MAX_WHITESPACE
        self.spaces = 0
        expect = self.expect
        if expect == "start":
            return c == "{" and self._open(c)
        if expect in ("value", "value_or_end"):
            if c == "]" and expect == "value_or_end":
                return self._close("[")
            if c in "{[":
                return self._open(c)
            if c == '"':
                self.string = "value"
                return True
            if c in LITERALS:
                self.literal = LITERALS[c][1:]
                return True
            if c == "-" or c.isdigit():
                self.number = "sign"
                return self._number(c) if c != "-" else True
            return False
        if expect in ("key", "key_or_end"):
            if c == "}" and expect == "key_or_end":
                return self._close("{")
            if c == '"':
                self.string = "key"
                return True
            return False
        if expect == "colon":
            if c == ":":
                self.expect = "value"
                return True
            return False
        if expect == "comma_or_end":
            if c == ",":
                self.expect = "key" if self.stack[-1] == "{" else "value"
                return True
            return c in "}]" and self._close("{" if c == "}" else "[")
        return False  # closed: nothing may follow but whitespace

    def _in_string(self, c: str) -> bool:
        if self.escape:
            if self.escape == "\\":
                if c == "u":
                    self.escape = "uuuu"
                    return True
                self.escape = ""
                return c in '"\\/bfnrt'
            self.escape = self.escape[1:]
            return c in "0123456789abcdefABCDEF"
        if c == "\\":
            self.escape = "\\"
            return True
        if c == '"':
            kind, self.string = self.string, None
            if kind == "key":
                self.expect = "colon"
            else:
                self._value_done()
            return True
        return ord(c) >= 0x20  # control characters must be escaped

    def _number(self, c: str) -> bool:
        """One more character of a number (-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?), if it continues it."""
        moves = NUMBER_MOVES[self.number]
        kind = "0" if c == "0" else "digit" if c in "123456789" else "e" if c in "eE" else c
        if kind not in moves:
            return False
        self.number = moves[kind]
        return True

    def _open(self, c: str) -> bool:
        self.stack.append(c)
        self.expect = "key_or_end" if c == "{" else "value_or_end"
        return True

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        self.expect = "comma_or_end" if self.stack else "closed"


@lru_cache(maxsize=4)
def token_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str | None, ...]:
    """Each token's text on its own (None for special tokens, which are never part of a JSON reply)."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(None if i in special else text for i, text in enumerate(texts))


class JsonObjectChooser(LogitsProcessor):
    """Chooses the next token, the likeliest (or, with a `generator`, one drawn from softmax(scores)) that keeps the
    reply a prefix of a JSON object; an end-of-sequence token once the object is closed. Returns scores that keep
    only that token, so that a greedy generate picks it. Goes last among the processors."""

    def __init__(self, texts: tuple[str | None, ...], eos_ids: list[int], generator: torch.Generator | None):
        self.texts, self.eos_ids, self.generator = texts, eos_ids, generator
        self.state = JsonPrefix()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = self._choose(scores[0])
        return torch.full_like(scores, float("-inf")).index_fill_(1, torch.tensor([chosen], device=scores.device), 0.0)

    def _choose(self, scores: torch.Tensor) -> int:
        if self.state.closed and self.eos_ids:
            return max(self.eos_ids, key=lambda i: scores[i].item())
        for token in self._candidates(scores.float().cpu()):
            text = self.texts[token] if token < len(self.texts) else None
            if not text:
                continue
            state = self.state.copy()
            if state.feed(text):
                self.state = state
                return token
        raise RuntimeError("no token continues the JSON object")  # every token tried: cannot happen with '"' or '}'

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
