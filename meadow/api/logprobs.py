"""Log-probabilities of tokens, as OpenAI's `logprobs` fields give them: the model's own (before temperature, top-p
and penalties), of each generated token as generate picks it, and of each prompt token given the ones before it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

HEAD_CHUNK = 512  # prompt tokens a step when scoring a prompt: a whole prompt's logits can take gigabytes


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: tuple[tuple[str, float], ...]  # the likeliest tokens at this place, best first
    offset: int = 0  # where the token's text begins in the text returned


class Recorder(LogitsProcessor):
    """Keeps the log-probabilities of each step's logits; generate's first logits processor, so that it sees them as
    the model gave them. `describe` tells the chosen token's, once generate has picked it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, top: int):
        self.tokenizer, self.top, self.latest = tokenizer, top, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def describe(self, token: int) -> TokenLogprob:
        return describe(self.tokenizer, self.latest[0], token, self.top)


def describe(tokenizer: PreTrainedTokenizerBase, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry at a place whose log-probabilities over the vocabulary are `logprobs` (V,)."""
    values, ids = logprobs.topk(top)
    best = tuple((tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist()))
    return TokenLogprob(tokenizer.decode([token]), logprobs[token].item(), best)


def prompt_logprobs(model, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each prompt token's entry given the tokens before it (none for the first), with its offset in the decoded
    prompt. Run inside the model's inference session (blocking: on a worker thread): all of the prompt but its last
    token goes to the servers, HEAD_CHUNK tokens a step, so that a generate call after it sends only that last token
    and the prompt is computed once."""
    prompt = ids[0].tolist()
    entries = [TokenLogprob(tokenizer.decode(prompt[:1]), None, ())]
    with torch.no_grad():
        for start in range(0, len(prompt) - 1, HEAD_CHUNK):
            end = min(start + HEAD_CHUNK, len(prompt) - 1)
            logits = model(ids[:, :end], attention_mask=torch.ones_like(ids[:, :end])).logits[0]  # the new tokens'
            for row, token in zip(torch.log_softmax(logits.float(), dim=-1), prompt[start + 1 : end + 1]):
                entries.append(describe(tokenizer, row, token, top))
    offsets = [len(tokenizer.decode(prompt[:i], skip_special_tokens=True)) for i in range(len(prompt))]
    return [replace(entry, offset=offset) for entry, offset in zip(entries, offsets)]


def answer_entries(entries: list[TokenLogprob], start: int, content: str | None = None) -> list[TokenLogprob]:
    """The entries of the answer's tokens: those whose text begins at `start` in the reply or later (after a reasoning
    model's thinking); given the `content` of a reply with calls, those within it (not a call's)."""
    end = float("inf") if content is None else start + len(content)
    return [entry for entry in entries if start <= entry.offset < end]


def chat_format(entries: list[TokenLogprob]) -> dict:
    """Chat completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(*pair) for pair in e.top]} for e in entries]}


def completion_format(entries: list[TokenLogprob]) -> dict:
    """Text completions' `logprobs`: parallel lists of tokens, their logprobs, {token: logprob} of the likeliest (the
    chosen one included; null where the logprob is) and their offsets in the text."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {**dict(e.top), e.token: e.logprob} for e in entries],
        "text_offset": [e.offset for e in entries],
    }
