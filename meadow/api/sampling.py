"""OpenAI's sampling parameters as transformers logits processors.

transformers has temperature and top-p, but no additive presence / frequency penalty (its repetition penalty
divides logits, a different rule), and its sampling draws from torch's global generator, which concurrent
requests share, so a request's `seed` could not make its own text reproducible. Two small processors fill the gap:
`OpenAIPenalties` and `SeededSampler`, which draws the token itself with the request's own generator and leaves
generate's greedy step nothing to choose.
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from meadow.api.json_mode import PrefixChooser


class OpenAIPenalties(LogitsProcessor):
    """logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty, counting the tokens generated
    so far (not the prompt's), as OpenAI defines them."""

    def __init__(self, prompt_length: int, presence_penalty: float, frequency_penalty: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence_penalty, frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class RecentRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (a seen token's logit divided by `penalty` if positive, multiplied if not),
    counting only the last `window` tokens, the prompt's included, as Ollama does; window -1: every token."""

    def __init__(self, penalty: float, window: int):
        self.penalty, self.window = RepetitionPenaltyLogitsProcessor(penalty), window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.penalty(input_ids if self.window < 0 else input_ids[:, -self.window :], scores)


class SeededSampler(LogitsProcessor):
    """Samples the next token from softmax(scores) with its own generator; returns scores that keep only that token,
    so that a greedy generate picks it."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1).cpu()
        chosen = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A request's own generator: `seed`, or a fresh random one."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def logits_processors(
    prompt_length: int,
    temperature: float,
    top_p: float,
    presence_penalty: float,
    frequency_penalty: float,
    seed: int | None,
    logit_bias: tuple[tuple[int, float], ...] = (),
    top_k: int = 0,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    constraint=None,
    token_texts: tuple[str | None, ...] = (),
    eos_ids: list[int] = (),
) -> LogitsProcessorList:
    """What turns the model's logits into the next token for one request; temperature 0 means greedy, top_k 0 keeps
    every token, repeat_penalty 1 or repeat_last_n 0 penalizes no repetition. With a `constraint` (a JsonPrefix or a
    ToolCallPrefix, and each token's text), the token is chosen so that the reply follows it, ended by one of
    `eos_ids`."""
    processors = LogitsProcessorList()
    if repeat_penalty != 1.0 and repeat_last_n != 0:
        processors.append(RecentRepetitionPenalty(repeat_penalty, repeat_last_n))
    if logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[token], bias] for token, bias in logit_bias]))
    if presence_penalty or frequency_penalty:
        processors.append(OpenAIPenalties(prompt_length, presence_penalty, frequency_penalty))
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    generator = seeded_generator(seed) if temperature > 0 else None
    if constraint is not None:
        processors.append(PrefixChooser(constraint, token_texts, list(eos_ids), generator))
    elif generator is not None:
        processors.append(SeededSampler(generator))
    return processors
