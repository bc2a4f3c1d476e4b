"""An in-process stand-in for the swarm: every block of a checkpoint behind RemoteSequence's interface,
so the client model can be tested without processes. It also records what the client sent."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from meadow.models import KVCache, load_block, load_config


class LocalSequence:
    """All blocks of a model loaded here; `forward` is a full pass, `inference_session` keeps KV caches."""

    def __init__(self, model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.config = load_config(model)
        self.dtype, self.device = dtype, torch.device(device)
        blocks = range(self.config.num_hidden_layers)
        self.blocks = [load_block(model, self.config, index, dtype, self.device) for index in blocks]
        self.sessions: list[LocalInferenceSession] = []  # every session opened, for tests to inspect
        self.forward_calls = 0

    @torch.no_grad()
    def forward(self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor | None) -> Tensor:
        """Full pass without a cache: hidden (B, T, H) -> (B, T, H); key_mask (B, T) bool or None."""
        self.forward_calls += 1
        for block in self.blocks:
            hidden = block(hidden, position_ids, key_mask)
        return hidden

    def inference_session(self, max_length: int, batch_size: int) -> "LocalInferenceSession":
        session = LocalInferenceSession(self, max_length, batch_size)
        self.sessions.append(session)
        return session

    def close(self) -> None:
        pass


class LocalInferenceSession:
    """KV caches of every block for one session; `step` takes only the new tokens, as the servers do."""

    def __init__(self, sequence: LocalSequence, max_length: int, batch_size: int):
        self.sequence, self.max_length, self.batch_size = sequence, max_length, batch_size
        config = sequence.config
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.caches = [KVCache(*shape, sequence.dtype, sequence.device) for _ in sequence.blocks]
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=sequence.device)
        self.position = 0
        self.closed = False
        self.steps: list[int] = []  # number of tokens sent by each step

    @torch.no_grad()
    def step(self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor | None) -> Tensor:
        """hidden (B, T, H) of the new tokens; key_mask (B, T) for them only (accumulated here)."""
        if self.closed:
            raise RuntimeError("step on a closed inference session")
        batch, length = hidden.shape[:2]
        if batch != self.batch_size:
            raise ValueError(f"session opened for batch size {self.batch_size}, step has batch {batch}")
        if self.position + length > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded: {self.position} + {length} tokens")
        start, end = self.position, self.position + length
        self.key_mask[:, start:end] = True if key_mask is None else key_mask.bool()
        for block, cache in zip(self.sequence.blocks, self.caches):
            hidden = block(hidden, position_ids, self.key_mask[:, :end], cache=cache, start=start)
        self.position = end
        self.steps.append(length)
        return hidden

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "LocalInferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
