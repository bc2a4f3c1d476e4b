"""What a client holds of a model: the token embeddings, the norms it runs around the blocks, and the LM head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from meadow.models.layout import column_major

TensorReader = Callable[[list[str]], dict[str, torch.Tensor]]  # HF names -> tensors; a clear error if one is missing


class ClientParts(nn.Module):
    """Token embeddings, an optional norm right after them (BLOOM's word_embeddings_layernorm), the final norm
    (any module: RMSNorm, LayerNorm with bias, ...) and the LM head; no block weights."""

    def __init__(
        self, embed_tokens: nn.Embedding, norm: nn.Module, lm_head: nn.Linear, embed_norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.embed_tokens, self.norm, self.lm_head, self.embed_norm = embed_tokens, norm, lm_head, embed_norm

    @classmethod
    def with_head(
        cls, embeddings: torch.Tensor, norm: nn.Module, head: torch.Tensor | None, embed_norm: nn.Module | None = None,
        embed_scale: float | None = None, logit_softcap: float | None = None,
    ) -> "ClientParts":  # fmt: skip
        """Frozen parts from the embedding matrix and the head's weight; head None: tied to the embeddings. On a CPU
        the head is stored column by column (see column_major); a tied embedding shares that copy: looking up a few
        rows barely notices the layout (1024 tokens: 0.35 -> 7.6 ms, next to seconds through the blocks).
        Gemma's: `embed_scale` multiplies the embeddings, `logit_softcap` bounds the logits (see the classes below)."""
        tied = head is None
        head = column_major(embeddings if tied else head)
        embed = ScaledEmbedding(head if tied else embeddings, embed_scale)
        lm_head = SoftcappedHead(embeddings.shape[1], embeddings.shape[0], logit_softcap)
        lm_head.weight = embed.weight if tied else nn.Parameter(head, requires_grad=False)
        return cls(embed, norm.requires_grad_(False), lm_head, embed_norm)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first block's input for these tokens."""
        return self.embedded(self.embed_tokens(input_ids))

    def embedded(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The first block's input from token embeddings (the embedding norm applied, if the family has one)."""
        return embeddings if self.embed_norm is None else self.embed_norm(embeddings)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output."""
        return self.lm_head(self.norm(hidden))


class ScaledEmbedding(nn.Embedding):
    """Frozen token embeddings, multiplied by `scale` (Gemma's sqrt(hidden_size), rounded to the embeddings' dtype as
    transformers rounds it) unless it is None: what `get_input_embeddings()` gives is what the first block takes, as in
    transformers, so inputs_embeds and trained prompts mean the same there and here."""

    def __init__(self, weight: torch.Tensor, scale: float | None = None) -> None:
        super().__init__(*weight.shape, _weight=weight, _freeze=True)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = super().forward(input_ids)
        return embeddings if self.scale is None else embeddings * torch.tensor(self.scale, dtype=embeddings.dtype)


class SoftcappedHead(nn.Linear):
    """The LM head (no bias), its logits bounded by softcap * tanh(logits / softcap) when `softcap` is set (Gemma 2)."""

    def __init__(self, in_features: int, out_features: int, softcap: float | None = None) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta")  # the weight is assigned after
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap
