"""Attention over a KV cache, shared by every family: the per-session cache, the parts of a packed batch (several
sessions' tokens run through a block at once), and the masks (causal, padding, sliding window)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lengthened(tensor: Tensor, length: int, keep: int, dim: int) -> Tensor:
    """A copy of `tensor` `length` long along `dim` that holds its first `keep` entries there, zeros after."""
    shape = list(tensor.shape)
    shape[dim] = length
    new = tensor.new_zeros(shape)
    new.narrow(dim, 0, keep).copy_(tensor.narrow(dim, 0, keep))
    return new


class KVCache(nn.Module):
    """Preallocated keys/values of one block for one session."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_length(self) -> int:
        return self.k_cache.shape[2]

    def grow(self, max_length: int, keep: int) -> None:
        """Hold up to `max_length` tokens from now on, keeping the first `keep` stored (new buffers: views of the old
        ones handed out before stay as they were)."""
        self.k_cache = lengthened(self.k_cache, max_length, keep, dim=2)
        self.v_cache = lengthened(self.v_cache, max_length, keep, dim=2)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv, T, D) at positions [start, start+T); return views of [0, start+T)."""
        end = start + k.shape[2]
        if start < 0 or end > self.max_length:
            raise ValueError(f"cache positions [{start}, {end}) do not fit a cache of length {self.max_length}")
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


@dataclass
class Part:
    """One sequence group of a packed batch (several sessions' tokens run through a block at once): `batch` rows of
    `length` tokens, the next batch x length tokens of the flattened input, at cache positions [start, start+length).
    key_mask (batch, start + length) is True for real keys (None: nothing padded); no cache: start is 0."""

    batch: int
    length: int
    start: int = 0
    key_mask: Tensor | None = None
    cache: KVCache | None = None


def packed_parts(
    x: Tensor, key_mask: Tensor | None, cache: KVCache | None, start: int, parts: list[Part] | None
) -> list[Part]:
    """The parts of a block's input x (B, T, H): `parts` when packed, else the one part that x is."""
    if parts is not None:
        return parts
    B, T = x.shape[:2]
    return [Part(B, T, start if cache is not None else 0, key_mask, cache)]


def attend_parts(
    q: Tensor, k: Tensor, v: Tensor, parts: list[Part], sliding_window: int | None = None,
    scale: float | None = None, softcap: float | None = None, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Attention of packed tokens, each part over its own cached and new keys: q (N, heads, D), k and v
    (N, kv_heads, D) -> (N, heads * D). `scale` multiplies the scores (None: 1 / sqrt(D)); `softcap` bounds them
    to (-softcap, softcap) with tanh before the softmax (Gemma 2); `sinks` (heads,) are logits the softmax counts as
    one more key's, whose value is nothing (GPT-OSS)."""
    outputs, offset = [], 0
    head_dim = q.shape[-1]
    for part in parts:
        n = part.batch * part.length
        q_part, k_part, v_part = (
            t[offset : offset + n].view(part.batch, part.length, -1, head_dim).transpose(1, 2) for t in (q, k, v)
        )
        y = attend(q_part, k_part, v_part, part, sliding_window, scale, softcap, sinks)
        outputs.append(y.transpose(1, 2).reshape(n, -1))
        offset += n
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def attend(
    q: Tensor, k: Tensor, v: Tensor, part: Part, sliding_window: int | None = None, scale: float | None = None,
    softcap: float | None = None, sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Attention of one part's queries (b, heads, t, D) over its cached and new keys/values (b, kv_heads, t, D)."""
    T, start, key_mask = q.shape[2], part.start, part.key_mask
    if part.cache is not None:
        k, v = part.cache.update(start, k, v)
    gqa = q.shape[1] != k.shape[1]  # each kv head serves heads / kv_heads query heads; SDPA needs no copies
    eager = softcap is not None or sinks is not None  # what no SDPA kernel takes
    plain = key_mask is None and (start == 0 or T == 1) and (sliding_window is None or k.shape[2] <= sliding_window)
    if plain and not eager and T == 1 and gqa:
        # one new token: the query heads that share a kv head go as that head's queries, so no kernel needs GQA (on a
        # GPU in float32, none of SDPA's fast kernels takes it)
        batch, heads, _, head_dim = q.shape
        folded = q.reshape(batch, k.shape[1], heads // k.shape[1], head_dim)
        return F.scaled_dot_product_attention(folded, k, v, scale=scale).reshape(batch, heads, 1, head_dim)
    if plain and not eager:  # plain causal (or one new token that sees everything): SDPA's fastest kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa, scale=scale)
    mask = attention_mask(T, k.shape[2], start, key_mask, sliding_window, q.device)
    if eager:
        return eager_attention(q, k, v, mask, scale, softcap, sinks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None, softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Attention written out, as transformers computes Gemma 2's (scores through softcap * tanh(scores / softcap)
    before the mask, a float32 softmax) and GPT-OSS's (each head's sink logit in the softmax, then dropped; the softmax
    in the scores' dtype). Shapes as attend's; mask True = attend."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(2, 3) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    else:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        weights = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1].to(v.dtype)
    return weights @ v


def attention_mask(
    T: int, S: int, start: int, key_mask: Tensor | None, sliding_window: int | None, device: torch.device
) -> Tensor:
    """Boolean (B or 1, 1, T, S) mask, True = attend. Query i sits at key index start + i."""
    q_idx = torch.arange(start, start + T, device=device)[:, None]
    k_idx = torch.arange(S, device=device)[None, :]
    mask = k_idx <= q_idx
    if sliding_window is not None:
        mask = mask & (k_idx > q_idx - sliding_window)
    if key_mask is not None:
        # every query also sees itself, so that a padded row never softmaxes over nothing (NaN that
        # would leak into real rows through 0 * NaN in later layers)
        mask = mask & (key_mask[:, None, None, :].bool() | (k_idx == q_idx))
    else:
        mask = mask[None, None]
    return mask
