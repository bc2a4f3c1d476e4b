"""A reasoning model's thinking, apart from its answer. Qwen3, QwQ and DeepSeek-R1 (and the models distilled from it)
begin a reply with their reasoning in a `<think>...</think>` block, then answer; some templates open the block for the
model (the reply then begins inside it). The APIs give the reasoning in its own field, as the servers their clients
know do (`reasoning_content` on OpenAI's chat completions: DeepSeek's and vLLM's name; a reasoning item on the
Responses API; `thinking` on Ollama's routes), and `meadow chat` shows it apart from the answer.
Only a block at the very beginning of the reply is reasoning; `<think>` later in an answer is the answer's text.
gpt-oss's replies (harmony's channels) are read into this form first (harmony.py)."""

from __future__ import annotations

from meadow.client import harmony

OPEN, CLOSE = "<think>", "</think>"
EFFORTS = ("none", "minimal", "low", "medium", "high")  # how long a reasoning model thinks: OpenAI's levels


def thinks(template: str | None) -> bool:
    """Whether a chat template is a reasoning model's: it writes think blocks (Qwen3's removes them from earlier
    turns, DeepSeek-R1's opens one for the reply), or harmony's (gpt-oss's analysis channel)."""
    return bool(template) and CLOSE in template or harmony.speaks_harmony(template)


def begins_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves the reply inside an open think block."""
    opened = prompt.rfind(OPEN)
    return opened >= 0 and CLOSE not in prompt[opened:]


def begun(text: str, tag: str) -> int:
    """How many characters at the end of `text` are the beginning of `tag` (all of it, if `text` ends with it)."""
    seen = text[-len(tag) :] if tag else ""
    while not tag.startswith(seen):
        seen = seen[1:]
    return len(seen)


class ThinkingReader:
    """Splits a reply, as it grows, into its reasoning and its answer; the whitespace around the reasoning is dropped.
    Text that may be the beginning of a tag (or whitespace the reasoning may end with) is held back until it is
    known not to be. `inside`: the prompt opened the block."""

    def __init__(self, inside: bool = False):
        self.phase = "thinking" if inside else "start"  # start -> thinking -> after -> answer, or start -> answer
        self.text = ""  # what is not handed out yet
        self.began = False  # whether any reasoning was handed out (its leading whitespace is dropped)

    def feed(self, piece: str) -> tuple[str, str]:
        """The reasoning and the answer that `piece` completes."""
        self.text += piece
        reasoning, answer = "", ""
        if self.phase == "start":
            rest = self.text.lstrip()
            if rest.startswith(OPEN):
                self.phase, self.text = "thinking", rest[len(OPEN) :]
            elif not OPEN.startswith(rest):  # not a think block: all of it is the answer
                self.phase = "answer"
        if self.phase == "thinking":
            end = self.text.find(CLOSE)
            if end >= 0:
                reasoning = self._reasoning(self.text[:end].rstrip())
                self.text, self.phase = self.text[end + len(CLOSE) :], "after"
            else:
                safe = len(self.text[: len(self.text) - begun(self.text, CLOSE)].rstrip())
                reasoning, self.text = self._reasoning(self.text[:safe]), self.text[safe:]
        if self.phase == "after":
            self.text = self.text.lstrip()
            if self.text:
                self.phase = "answer"
        if self.phase == "answer":
            answer, self.text = self.text, ""
        return reasoning, answer

    def _reasoning(self, text: str) -> str:
        if not self.began:
            text = text.lstrip()
            self.began = bool(text)
        return text

    def rest(self) -> tuple[str, str]:
        """What was held back, once the reply has ended: a block never closed (the reply ran out of tokens) is all
        reasoning; a reply that was only the beginning of a tag, its answer."""
        text, self.text = self.text, ""
        if self.phase == "thinking":
            return self._reasoning(text.rstrip()), ""
        return "", text if self.phase in ("start", "answer") else ""

    def take(self, piece: str, last: bool = False) -> tuple[str, str]:
        """`feed`, and once the reply has ended (`last`) `rest`, together."""
        reasoning, answer = self.feed(piece)
        more, rest = self.rest() if last else ("", "")
        return reasoning + more, answer + rest


def split_reasoning(text: str, inside: bool = False) -> tuple[str, str]:
    """A whole reply's reasoning and answer."""
    return ThinkingReader(inside).take(text, last=True)


def opens_thinking(tokenizer, prompt_ids) -> bool:
    """Whether the prompt's last tokens leave the reply inside an open think block (or harmony's analysis message)."""
    prompt = harmony.harmony_prompt(tokenizer, prompt_ids)
    if prompt is not None:
        return harmony.begins_thinking(prompt)
    return begins_thinking(tokenizer.decode(prompt_ids[0, -harmony.PROMPT_TAIL :]))
