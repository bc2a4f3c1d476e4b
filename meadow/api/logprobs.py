"""Log-probabilities of tokens, as OpenAI's `logprobs` fields give them: the model's own (before temperature, top-p
and penalties), of each generated token as generate picks it, and of each prompt token given the ones before it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

HEAD_CHUNK = 256  # prompt positions put through the LM head at once: a whole prompt's logits can take gigabytes


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
    values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
    best = tuple((tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist()))
    return TokenLogprob(tokenizer.decode([token]), logprobs[token].item(), best)


def prompt_logprobs(model, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each prompt token's entry given the tokens before it (none for the first), with its offset in the decoded
    prompt: one forward pass through the swarm (blocking: call it on a worker thread)."""
    with torch.no_grad():
        hidden = model.remote_hidden(ids, None, torch.ones_like(ids), None)[0]
        entries = [TokenLogprob(tokenizer.decode(ids[0, :1]), None, ())]
        for start in range(0, ids.shape[1] - 1, HEAD_CHUNK):
            logits = model.lm_head(model.norm(hidden[start : start + HEAD_CHUNK]))
            for row, token in zip(torch.log_softmax(logits.float(), dim=-1), ids[0, start + 1 : start + 1 + HEAD_CHUNK]):
                entries.append(describe(tokenizer, row, int(token), top))
    prompt = ids[0].tolist()
    return [replace(entry, offset=len(tokenizer.decode(prompt[:i], skip_special_tokens=True))) for i, entry in enumerate(entries)]


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
