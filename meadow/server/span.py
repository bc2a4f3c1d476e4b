"""The blocks a server hosts, and how one request or one inference step runs through them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from meadow.models import BlockConfig, KVCache, LlamaBlock
from meadow.wire import BadRequest, BlockRange


@dataclass
class Span:
    """Blocks [first, first + len(blocks)) of a model, loaded on one device in one dtype."""

    blocks: list[LlamaBlock]
    first: int
    config: BlockConfig
    dtype: torch.dtype
    device: torch.device

    @property
    def range(self) -> BlockRange:
        return BlockRange(start=self.first, end=self.first + len(self.blocks))

    @torch.inference_mode()
    def run(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor,
        blocks: BlockRange,
        caches: list[KVCache] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = hidden.to(self.device, self.dtype)
        position_ids, key_mask = position_ids.to(self.device), key_mask.to(self.device)
        for offset, index in enumerate(range(blocks.start, blocks.end)):
            cache = caches[offset] if caches is not None else None
            x = self.blocks[index - self.first](x, position_ids, key_mask, cache=cache, start=start)
        return x.to("cpu", hidden.dtype)


@dataclass
class Session:
    """One client's inference session: the KV cache of its blocks and the key mask of every stored token."""

    blocks: BlockRange
    batch_size: int
    max_length: int
    caches: list[KVCache]
    key_mask: torch.Tensor  # (batch, max_length) bool, True where a stored token is real
    position: int = 0  # tokens stored so far
    steps: int = field(default=0)

    @classmethod
    def open(cls, span: Span, blocks: BlockRange, batch_size: int, max_length: int) -> "Session":
        config = span.config
        caches = [
            KVCache(batch_size, config.num_key_value_heads, max_length, config.head_dim, span.dtype, span.device)
            for _ in range(len(blocks))
        ]
        key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=span.device)
        return cls(blocks, batch_size, max_length, caches, key_mask)

    def step(self, span: Span, hidden: torch.Tensor, position_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        if batch != self.batch_size:
            raise BadRequest(f"session was opened for batch size {self.batch_size}, step has {batch}")
        end = self.position + length
        if end > self.max_length:
            raise BadRequest(
                f"step of {length} tokens at position {self.position} exceeds the session's max_length {self.max_length}"
            )
        self.key_mask[:, self.position : end] = new_mask.to(self.key_mask.device)
        out = span.run(hidden, position_ids, self.key_mask[:, :end], self.blocks, self.caches, start=self.position)
        self.position, self.steps = end, self.steps + 1
        return out
