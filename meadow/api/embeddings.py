"""Embeddings of texts, for search and retrieval: the served model's last hidden states (after its final norm), averaged
over each text's tokens and scaled to length 1, as OpenAI's and Ollama's embedding routes return them. Computed by
full passes through the swarm (no inference session), texts of similar length batched together."""

from __future__ import annotations

import asyncio
from typing import Callable

import torch

from meadow.api.errors import APIError, api_error

MAX_INPUTS = 2048  # texts in one request, as OpenAI allows
MAX_TOKENS = 300_000  # tokens in one request, as OpenAI allows: minutes of work for a swarm of small machines
BATCH_TOKENS = 4096  # tokens (batch x longest text, padding included) in one pass through the swarm


def none_empty(inputs: str | list) -> str | list:
    """A request's `input`, checked: no text (or list of token ids) in it is empty, as an empty one means nothing."""
    items = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else inputs
    if not items:
        raise ValueError("no input to embed")
    if empty := [i for i, item in enumerate(items) if len(item) == 0]:
        raise ValueError(f"input {empty[0]} is empty: there is nothing to embed")
    return inputs


def batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of the texts, grouped by similar length so that little is padding, each group of at most `budget`
    tokens padded (a longer text alone)."""
    groups, group = [], []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and (len(group) + 1) * lengths[index] > budget:
            groups.append(group)
            group = []
        group.append(index)
    return groups + [group] if group else groups


@torch.no_grad()
def mean_pooled(model, rows: list[list[int]]) -> torch.Tensor:
    """(len(rows), hidden size) float32: each row's final hidden states averaged over its tokens, of length 1. Rows
    are padded on the right, where causal attention keeps the padding out of every real token's state."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
    hidden = model.remote_hidden(ids, None, mask, None).to(model.lm_head.weight.device)
    hidden = model.norm(hidden).float().cpu()
    mean = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    return torch.nn.functional.normalize(mean, dim=-1)


async def embed(
    model, rows: list[list[int]], context_length: int, gone: Callable, truncate: bool = False
) -> torch.Tensor:
    """`mean_pooled` for every row, a batch at a time on a worker thread; a row longer than `context_length` is cut to
    it with `truncate`, refused without. Stops between batches once `gone()` (an async check: the client left)."""
    if len(rows) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request, got {len(rows)}", param="input")
    if empty := [i for i, row in enumerate(rows) if not row]:  # a text of no tokens
        raise APIError(400, f"input {empty[0]} has no tokens: there is nothing to embed", param="input")
    if truncate:
        rows = [row[:context_length] for row in rows]
    elif long := [i for i, row in enumerate(rows) if len(row) > context_length]:
        message = (f"input {long[0]} has {len(rows[long[0]])} tokens, more than this model's maximum context length "
                   f"of {context_length}")  # fmt: skip
        raise APIError(400, message, param="input", code="context_length_exceeded")
    if (tokens := sum(map(len, rows))) > MAX_TOKENS:
        raise APIError(400, f"at most {MAX_TOKENS} tokens per request, got {tokens}", param="input")
    vectors = torch.empty(len(rows), model.config.hidden_size)
    for group in batches([len(row) for row in rows]):
        if await gone():
            raise APIError(499, "the client went away")  # nobody reads this: it only stops the work
        try:
            vectors[group] = await asyncio.to_thread(mean_pooled, model, [rows[i] for i in group])
        except Exception as e:
            raise api_error(e) from None
    return vectors
