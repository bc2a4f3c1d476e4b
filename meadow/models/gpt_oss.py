"""GPT-OSS decoder block (gpt-oss-20b, gpt-oss-120b): Llama's layout with biases on the attention's projections, a
learned sink logit per head in the attention's softmax, sliding-window layers (128 tokens) between global ones, yarn
rope, and a mixture of experts: a router with a bias takes each token's top-k logits and softmaxes them; each expert is
a clamped SwiGLU, (clamp(up) + 1) * gate * sigmoid(alpha * gate) with gate clamped from above, its gate and up
columns interleaved in one fused tensor. The experts stay as the checkpoint holds them, 3-D tensors (E, in, out).

The experts may be stored in bf16 or float32, or in MXFP4 as OpenAI released them: a server unpacks its own blocks'
experts as it loads them, as transformers does on a machine without MXFP4 kernels. Served with `--quant` (the experts
are nearly all of the model: 19 of gpt-oss-20b's 21 billion weights), the experts are packed in MXFP4 again (`compress`:
exactly the released values, since an MXFP4 value stays one at any power-of-two scale that holds its group) and an
expert is unpacked only when tokens go through it. LoRA applies to the attention's projections. Checked numerically
against transformers in tests/test_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meadow.models import llama, mixtral
from meadow.models.config import BlockConfig
from meadow.models.family import Family
from meadow.models.llama import LlamaBlock, LlamaConfig

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora

@dataclass(frozen=True, kw_only=True)
class GptOssConfig(LlamaConfig):
    """A GPT-OSS block's hyperparameters: Llama's, and its experts' (intermediate_size is one expert's)."""

    num_experts: int
    experts_per_token: int
    swiglu_alpha: float
    swiglu_limit: float

    @classmethod
    def from_hf(cls, hf: Any, **extra: Any) -> "GptOssConfig":
        return super().from_hf(hf, num_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok,
                               swiglu_alpha=hf.swiglu_alpha, swiglu_limit=hf.swiglu_limit, **extra)  # fmt: skip


class GptOssBlock(LlamaBlock):
    """Llama's decoder layer with sink attention and GPT-OSS's mixture of experts."""

    def __init__(self, config: GptOssConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx, feed_forward=SparseMoE(config), attention=SinkAttention(config, layer_idx))


class SinkAttention(llama.Attention):
    """Llama's attention (biased projections) with each head's learned sink logit in the softmax."""

    def __init__(self, config: GptOssConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.sinks = nn.Parameter(torch.empty(config.num_attention_heads))


class SparseMoE(nn.Module):
    """Router (logits with a bias, the top k softmaxed), then each token through its experts, weighted."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.router(tokens)
        return mixtral.mixed(tokens, weights, chosen, self.experts).view(x.shape)


class Router(nn.Module):
    """Each token's top-k experts by its logits (with a bias), and those k logits softmaxed as their weights. Plain
    tensors rather than an nn.Linear, so that quantizing or packing a block's linear layers leaves the routing exact."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_experts))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The k weights and expert indices of each token, (N, k) each."""
        top, chosen = F.linear(tokens, self.weight, self.bias).topk(self.top_k, dim=-1)
        return top.softmax(dim=-1), chosen


FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1's: a code is the index, plus 8 when negative
MXFP4_BYTES = (4 + 8 / 32) / 8  # a weight's share of memory, packed: its 4 bits and its group's 8-bit scale


def pack_mxfp4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """An (E, in, out) weight in MXFP4, as OpenAI's release stores it: `blocks` (E, out, in / 32, 16), two 4-bit codes
    a byte (the even column in the low nibble), and `scales` (E, out, in / 32), each group of 32 values' power of two
    plus 127, the least that holds the group's largest value; each value rounds to the nearest code. One expert at a
    time: the codes of all would take several times the weights' memory."""
    middles = torch.tensor(FP4_MAGNITUDES).diff() / 2 + torch.tensor(FP4_MAGNITUDES[:-1])
    blocks, scales = [], []
    for expert in weight:
        groups = expert.float().T.reshape(expert.shape[1], -1, 32)  # (out, in / 32, 32)
        exponents = torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 6.0))
        scaled = groups / 2.0**exponents
        codes = (torch.bucketize(scaled.abs(), middles.to(scaled.device)) | (scaled < 0) << 3).to(torch.uint8)
        blocks.append(codes[..., 0::2] | (codes[..., 1::2] << 4))
        scales.append((exponents[..., 0] + 127).to(torch.uint8))
    return torch.stack(blocks), torch.stack(scales)


def unpack_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The (E, in, out) weight `pack_mxfp4` packed (or OpenAI's release holds), by transformers' own function."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # here: only packed experts need it

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


class Experts(nn.Module):
    """Every expert's weights as 3-D tensors, as the checkpoint holds them: gate_up_proj (E, hidden, 2I) with gate and
    up columns interleaved, down_proj (E, I, hidden), and their biases; or, once `compress`ed, the two weights packed
    in MXFP4, each expert's unpacked as tokens go through it."""

    packed = ("gate_up_proj", "down_proj")  # what `compress` packs, at MXFP4_BYTES a weight
    packed_bytes = MXFP4_BYTES

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        E, hidden, inner = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, hidden, 2 * inner))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * inner))
        self.down_proj = nn.Parameter(torch.empty(E, inner, hidden))
        self.down_proj_bias = nn.Parameter(torch.empty(E, hidden))
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def forward(self, expert: int, x: Tensor) -> Tensor:
        gate_up = x @ self.weight("gate_up_proj", expert) + self.gate_up_proj_bias[expert]
        gate, up = gate_up[..., ::2].clamp(max=self.limit), gate_up[..., 1::2].clamp(-self.limit, self.limit)
        glu = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        return glu @ self.weight("down_proj", expert) + self.down_proj_bias[expert]

    def weight(self, name: str, expert: int) -> Tensor:
        """One expert's (in, out) weight `name`, unpacked if packed."""
        if name in self._parameters:
            return self._parameters[name][expert]
        blocks, scales = getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales")
        return unpack_mxfp4(blocks[expert : expert + 1], scales[expert : expert + 1], self.down_proj_bias.dtype)[0]

    def compress(self) -> None:
        """Keep the two weights packed in MXFP4 (about an eighth of float32's memory, a quarter of bf16's)."""
        for name in self.packed:
            blocks, scales = pack_mxfp4(self._parameters.pop(name))
            self.register_buffer(f"{name}_blocks", blocks)
            self.register_buffer(f"{name}_scales", scales)


def layer_state(tensors: dict[str, Tensor], config: BlockConfig) -> dict[str, Tensor]:
    """One layer's tensors as our block's state dict, experts stored in MXFP4 (OpenAI's release: `X_blocks`, two 4-bit
    values a byte, and `X_scales`, a power of two per 32 values) unpacked by transformers' own function, into the
    dtype of their biases."""
    tensors = dict(tensors)
    for name in [name.removesuffix("_blocks") for name in tensors if name.endswith("_blocks")]:
        blocks, scales = tensors.pop(f"{name}_blocks"), tensors.pop(f"{name}_scales")
        tensors[name] = unpack_mxfp4(blocks, scales, dtype=tensors[f"{name}_bias"].dtype)
    return llama.FAMILY.layer_state(tensors, config)


FAMILY = Family(
    name="gpt_oss",
    config_from_hf=GptOssConfig.from_hf,
    block=GptOssBlock,
    layer_state=layer_state,
    load_client_parts=llama.load_client_parts,
    linear_shapes=mixtral.linear_shapes,  # LoRA on the attention's projections, as in Mixtral
    lora_paths=mixtral.LORA_PATHS,
)
