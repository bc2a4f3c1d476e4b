"""ALiBi (attention with linear biases, BLOOM and some Falcons): per-head slopes, and attention of packed parts whose
keys get a bias of slope * (key position), over the KV cache.

The bias of a key depends on its position only, not on the query's: the query's own offset is the same for every key
of a row and cancels in the softmax. A key's position is its index in the cache, or, with a key mask (left padding),
the number of real keys before it, as transformers counts it; padded keys are masked out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from meadow.models.attention import Part, attention_mask


def alibi_slopes(num_heads: int) -> Tensor:
    """The slopes of the ALiBi paper for any head count (float32, CPU), in the order transformers computes them:
    a geometric series for the largest power of two <= num_heads, then every other slope of the next power's series."""
    closest = 2 ** math.floor(math.log2(num_heads))
    # powers of a float32 base, as transformers computes them, so that the slopes are equal to the last bit
    with torch.device("cpu"):  # even when a block is built on the meta device: the slopes are not in the checkpoint
        slopes = torch.tensor(2 ** (-8 / closest)) ** torch.arange(1, 1 + closest)
        extra = torch.tensor(2 ** (-8 / (2 * closest))) ** torch.arange(1, 1 + 2 * (num_heads - closest), 2)
        return torch.cat([slopes, extra]).float()


def alibi_bias(slopes: Tensor, key_mask: Tensor | None, length: int, round_to_bfloat16: bool = False) -> Tensor:
    """Bias (rows or 1, heads, 1, length) of each key, float32: slope * position.

    round_to_bfloat16: Falcon's transformers code multiplies the slopes in bfloat16, and its biases carry that
    rounding; we repeat it so that logits match within float32 tolerance."""
    if key_mask is None:
        positions = torch.arange(length, device=slopes.device)[None]
    else:
        mask = key_mask.long()
        positions = (mask.cumsum(-1) - 1) * mask
    if round_to_bfloat16:
        return (slopes.bfloat16()[None, :, None, None] * positions[:, None, None, :]).float()
    return slopes[None, :, None, None] * positions[:, None, None, :]


def attend_parts_alibi(
    q: Tensor, k: Tensor, v: Tensor, parts: list[Part], slopes: Tensor, bias_scale: float = 1.0,
    round_to_bfloat16: bool = False,
) -> Tensor:  # fmt: skip
    """Attention of packed tokens with ALiBi, each part over its own cached and new keys: q (N, heads, D), k and v
    (N, kv_heads, D) -> (N, heads * D). The bias is multiplied by bias_scale (Falcon divides it by sqrt(D))."""
    if slopes.device != q.device:
        slopes = slopes.to(q.device)
    outputs, offset = [], 0
    head_dim = q.shape[-1]
    for part in parts:
        n = part.batch * part.length
        q_part, k_part, v_part = (
            t[offset : offset + n].view(part.batch, part.length, -1, head_dim).transpose(1, 2) for t in (q, k, v)
        )
        if part.cache is not None:
            k_part, v_part = part.cache.update(part.start, k_part, v_part)
        T, S = part.length, k_part.shape[2]
        bias = alibi_bias(slopes, part.key_mask, S, round_to_bfloat16) * bias_scale
        allowed = attention_mask(T, S, part.start, part.key_mask, None, q.device)
        bias = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)  # every row allows its own key: never all -inf
        y = F.scaled_dot_product_attention(q_part, k_part, v_part, attn_mask=bias, enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(y.transpose(1, 2).reshape(n, -1))
        offset += n
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
