"""The first blocks of the model, run by the client itself (`from_pretrained(..., local_blocks=N)`): servers then see
only hidden states after N blocks, never the token embeddings, from which the text is easy to read back."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from meadow.client.session import grown_length
from meadow.models import BlockConfig, KVCache
from meadow.models.attention import lengthened


class LocalBlocks(nn.Module):
    """Blocks [0, N) of a model, loaded here (frozen, like the servers' blocks: gradients flow through them to the
    inputs). Called as a full pass without cache; `session` keeps KV caches for an inference session."""

    def __init__(self, blocks: list[nn.Module], config: BlockConfig):
        super().__init__()
        self.layers, self.config = nn.ModuleList(blocks), config

    def forward(self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor | None) -> Tensor:
        """hidden (B, T, H); position_ids (B, T); key_mask (B, T) bool, True for real tokens, or None."""
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None  # no padding: attention takes its fast causal path
        for block in self.layers:
            hidden = block(hidden, position_ids, key_mask)
        return hidden

    def session(self, batch_size: int, max_length: int) -> "LocalSession":
        return LocalSession(self, batch_size, max_length)


class LocalSession:
    """The local blocks' KV caches for one inference session and the key mask of every token stored in them; they grow
    as the servers' do."""

    def __init__(self, blocks: LocalBlocks, batch_size: int, max_length: int):
        config, weight = blocks.config, next(blocks.parameters())
        self.blocks, self.max_length = blocks, max_length
        self.caches = [
            KVCache(batch_size, config.num_key_value_heads, max_length, config.head_dim, weight.dtype, weight.device)
            for _ in blocks.layers
        ]
        self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=weight.device)

    @torch.no_grad()
    def step(self, hidden: Tensor, position_ids: Tensor, new_mask: Tensor, start: int) -> Tensor:
        """The hidden states (B, T, H) of the tokens at session positions [start, start + T) through the local blocks;
        `new_mask` (B, T) is theirs only. Tokens from `start` on are overwritten: a step the servers failed can be
        sent again."""
        end = start + hidden.shape[1]
        if end > self.max_length:
            self.max_length = grown_length(self.max_length, end)
            for cache in self.caches:
                cache.grow(self.max_length, start)
            self.key_mask = lengthened(self.key_mask, self.max_length, start, dim=1)
        self.key_mask[:, start:end] = new_mask.to(self.key_mask.device)
        key_mask = self.key_mask[:, :end]
        key_mask = None if bool(key_mask.all()) else key_mask
        for block, cache in zip(self.blocks.layers, self.caches):
            hidden = block(hidden, position_ids, key_mask, cache=cache, start=start)
        return hidden
