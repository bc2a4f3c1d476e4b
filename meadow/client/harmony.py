"""OpenAI's harmony format, as gpt-oss writes its replies. A reply is a run of messages, each a header, then its text:

    <|channel|>analysis<|message|>The user asks ...<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>

The analysis channel is the model's reasoning, final its answer, commentary without a recipient a preamble to the
user, and a message with a recipient (`to=functions.get_weather`) a tool call. The markup is special tokens, which a
plain decode drops, leaving "analysisThe user asks ...assistantfinalParis.". Meadow reads a harmony reply into the
form its reasoning readers know (reasoning.py): the reasoning at the beginning as one `<think>...</think>` block, then
the answer, its calls of functions as Hermes writes them (`<tool_call>\n{"name": ..., "arguments": ...}`, the form
api/tool_calls.py reads); headers and markup are left out, and so is what is not for users (later reasoning, calls of
tools built into gpt-oss's own runtime, such as `browser.search`).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Callable

START, CHANNEL, CONSTRAIN, MESSAGE = "<|start|>", "<|channel|>", "<|constrain|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")  # a message's end: another follows, the reply ends, a tool is called
MARKUP = (START, CHANNEL, CONSTRAIN, MESSAGE, *ENDS)
CALL_MARKER = CHANNEL + "commentary to=functions."  # how gpt-oss begins a call of a function
CALLED = re.compile(r"to=functions\.([^\s<]+)")
CALL_OPEN = '<tool_call>\n{"name": %s, "arguments": '  # a call, as the reply reads (its <|call|> ends the reply)
SPLIT = re.compile("(" + "|".join(re.escape(mark) for mark in MARKUP) + ")")
PROMPT_TAIL = 16  # prompt tokens read for where the reply begins (inside a header, or a message of some channel)


def speaks_harmony(template: str | None) -> bool:
    """Whether a chat template is harmony's (gpt-oss's): it writes channels."""
    return bool(template) and CHANNEL in template


@functools.cache
def markup_ids(tokenizer) -> dict[int, str]:
    """The tokenizer's ids of harmony's markup tokens (none for other tokenizers)."""
    vocab = tokenizer.get_vocab()
    return {vocab[mark]: mark for mark in MARKUP if mark in vocab}


def with_markup(tokenizer, ids: list[int]) -> str:
    """The text of `ids` with harmony's markup kept (other special tokens are skipped, as a plain decode does)."""
    marks, pieces, run = markup_ids(tokenizer), [], []
    for token in ids:
        if token in marks:
            pieces += [tokenizer.decode(run, skip_special_tokens=True), marks[token]]
            run = []
        else:
            run.append(token)
    return "".join(pieces) + tokenizer.decode(run, skip_special_tokens=True)


def kind(header: str) -> str:
    """What a message whose header is `header` is: "reasoning", "answer" or "call" (a message with a recipient: a
    function's call, a built-in tool's, or a tool's result in the prompt)."""
    if " to=" in f" {header}":  # a recipient, before or after the channel
        return "call"
    channel = header.split(CHANNEL, 1)[1].split() if CHANNEL in header else []
    return "reasoning" if channel[:1] == ["analysis"] else "answer"


class Reading:
    """A harmony text read from its beginning: the reply's part (from `start`) in the think-block form, and where the
    text leaves off (a think block open, a header unfinished)."""

    def __init__(self, text: str, start: int = 0):
        self.out: list[str] = []
        self.header: str | None = None  # the header being read, until its <|message|>
        self.writing = "answer"  # the kind of the message being written
        self.thinking = self.answered = False  # a think block is open; the reply's answer has begun
        at = 0
        for piece in SPLIT.split(text):
            begin, at = at, at + len(piece)
            self.read(piece, ours=begin >= start, tail=piece[max(0, start - begin) :])

    def read(self, piece: str, ours: bool, tail: str) -> None:
        """Read a piece (markup, or the text between); `ours`: markup of the reply, not the prompt (markup is whole
        tokens); `tail`: the reply's part of a text."""
        if piece == START:
            self.header = ""
        elif piece in (CHANNEL, CONSTRAIN):
            self.header = (self.header or "") + piece
        elif piece == MESSAGE and self.header is not None:
            header, self.header = self.header, None
            self.writing = kind(header)
            if self.writing == "call":
                called = CALLED.search(header)
                if called is None:  # a built-in tool's
                    self.writing = "hidden"
                elif ours:
                    self.out.append(("</think>" if self.thinking else "") + CALL_OPEN % json.dumps(called.group(1)))
                    self.thinking = False
            elif self.writing == "reasoning" and not self.answered:
                self.out += ["\n\n" if self.thinking else "<think>"] if ours else []
                self.thinking = True
            elif self.writing == "answer":
                self.out += ["</think>" if self.thinking else "\n\n" if self.answered else ""] if ours else []
                self.thinking, self.answered = False, ours
        elif piece in ENDS:
            self.writing = "answer"  # what follows outside a message
        elif self.header is not None:
            self.header += piece
        elif piece not in MARKUP and tail:  # text of a message, the reply's
            if self.writing == "answer":
                self.out.append("</think>" + tail if self.thinking else tail)  # text after the reasoning, outside
                self.thinking, self.answered = False, True
            elif self.writing == "call" or (self.writing == "reasoning" and self.thinking):
                self.out.append(tail)

    def text(self) -> str:
        return "".join(self.out)


def as_think_blocks(text: str, start: int = 0) -> str:
    """`text` (with its markup: `with_markup`) from `start` in the think-block form; what comes before `start` (the
    prompt's end) only tells where the reply begins. Text outside any message is the answer (a prompt that wrote the
    header itself, a model that wrote none); a header not finished yet is held back, so the result only grows as the
    text does."""
    return Reading(text, start).text()


def begins_thinking(prompt: str) -> bool:
    """Whether a harmony prompt (with its markup) leaves the reply inside a message of the analysis channel."""
    return Reading(prompt, len(prompt)).thinking


def harmony_prompt(tokenizer, prompt_ids) -> str | None:
    """The end of a harmony prompt (1, L), with its markup; None when the prompt is not one (the tokenizer has no
    markup, or the prompt ends without it: a raw completion's)."""
    if not markup_ids(tokenizer):
        return None
    prompt = with_markup(tokenizer, prompt_ids[0, -PROMPT_TAIL:].tolist())
    return prompt if SPLIT.search(prompt) else None


def reply_reader(tokenizer, prompt_ids) -> Callable[[list[int]], str]:
    """How to read a reply's ids after `prompt_ids` (1, L) as text: in the think-block form after a harmony prompt,
    else as a plain decode."""
    prompt = harmony_prompt(tokenizer, prompt_ids)
    if prompt is None:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: as_think_blocks(prompt + with_markup(tokenizer, ids), len(prompt))
