"""Mixtral and Qwen3-MoE decoder blocks: Llama's attention (with Mistral's sliding window, Qwen3's q/k norms) and a
sparse mixture-of-experts MLP. Per token, a router picks the top-k experts (softmax, then the k weights renormalised to
sum to 1, as HF does; Qwen3-MoE only with norm_topk_prob); each expert runs once on all the tokens routed to it, its
outputs scatter-added back weighted. Qwen3-MoE may keep a dense MLP in some layers (mlp_only_layers,
decoder_sparse_step).

Checkpoints come in two layouts, both read: the classic one that transformers (5 too) saves and the hub holds
(`block_sparse_moe.experts.N.w1/w2/w3.weight`, `block_sparse_moe.gate.weight`; Qwen3-MoE's
`mlp.experts.N.gate_proj/up_proj/down_proj.weight`, `mlp.gate.weight`), and transformers 5's in-memory one
(`mlp.experts.gate_up_proj` (E, 2I, H) and `mlp.experts.down_proj` (E, H, I), `mlp.gate.weight`); Qwen3-MoE's GGUF
files hold each of gate, up and down as one (E, out, in) tensor too.

LoRA applies to the attention projections, the layers peft targets in these models (their experts are 3-D tensors in
transformers 5, which peft's target_modules cannot adapt); an adapter for the experts gets an error listing these.
Checked numerically against transformers in tests/test_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meadow.models import llama
from meadow.models.config import BlockConfig
from meadow.models.family import Family
from meadow.models.llama import LlamaBlock, LlamaConfig

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora

HF_TO_MEADOW = {**llama.HF_TO_MEADOW, "block_sparse_moe": "feed_forward"}  # "mlp" (fused layout) is llama's already
EXPERT_LEAVES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Qwen3-MoE's names of an expert's layers
# every expert's layer as one (E, out, in) tensor -> the layers it holds, in row order: transformers 5's in-memory
# layout (gate_up_proj: gate rows first, down_proj) and a GGUF file's (ffn_gate_exps, ffn_up_exps, ffn_down_exps)
FUSED_EXPERTS = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",), "gate_proj": ("w1",), "up_proj": ("w3",)}
LORA_PATHS = {name: path for name, path in llama.LORA_PATHS.items() if path.startswith("self_attn.")}


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(LlamaConfig):
    """A Mixtral or Qwen3-MoE block's hyperparameters: Llama's, and its experts (intermediate_size is one expert's)."""

    num_experts: int
    experts_per_token: int
    normalize_top_k: bool = True  # the k weights renormalised to sum to 1 (Qwen3-MoE: norm_topk_prob)
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead (Qwen3-MoE) ...
    dense_intermediate_size: int = 0  # ... of this size

    @classmethod
    def from_hf(cls, hf: Any, **extra: Any) -> "MixtralConfig":
        if hf.model_type != "qwen3_moe":
            return super().from_hf(hf, num_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok,
                                   **extra)  # fmt: skip
        dense = tuple(
            layer for layer in range(hf.num_hidden_layers)
            if layer in (hf.mlp_only_layers or ()) or hf.num_experts == 0 or (layer + 1) % hf.decoder_sparse_step
        )  # fmt: skip
        config = super().from_hf(hf, num_experts=hf.num_experts, experts_per_token=hf.num_experts_per_tok,
                                 normalize_top_k=bool(hf.norm_topk_prob), dense_layers=dense,
                                 dense_intermediate_size=hf.intermediate_size, **extra)  # fmt: skip
        return replace(config, intermediate_size=hf.moe_intermediate_size)


class MixtralBlock(LlamaBlock):
    """Llama's decoder layer with the sparse mixture of experts as its MLP (or a dense one, in `dense_layers`)."""

    def __init__(self, config: MixtralConfig, layer_idx: int = 0) -> None:
        if layer_idx in config.dense_layers:
            feed_forward = llama.FeedForward(replace(config, intermediate_size=config.dense_intermediate_size))
        else:
            feed_forward = SparseMoE(config)
        super().__init__(config, layer_idx, feed_forward=feed_forward)


class SparseMoE(nn.Module):
    """Router, then each token through its top-k experts, the outputs summed with the router's weights."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_experts))

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(tokens)  # (N, k) each
        return mixed(tokens, weights, chosen, lambda expert, rows: self.experts[expert](rows)).view(x.shape)


def mixed(tokens: Tensor, weights: Tensor, chosen: Tensor, expert: Callable[[int, Tensor], Tensor]) -> Tensor:
    """The sum over each token's chosen experts (N, k) of `expert(index, rows)` times its weight (N, k): each expert
    runs once, on all the tokens routed to it."""
    # the (token, slot) pairs sorted by expert: each expert's tokens are then one contiguous run
    order = chosen.reshape(-1).argsort()
    counts = torch.bincount(chosen.reshape(-1)).tolist()
    weights = weights.reshape(-1)
    out = torch.zeros_like(tokens)
    for index, pairs in enumerate(order.split(counts)):
        if pairs.numel():
            rows = pairs // chosen.shape[1]
            y = expert(index, tokens.index_select(0, rows)) * weights[pairs, None]
            out.index_add_(0, rows, y.to(out.dtype))
    return out


class Router(nn.Module):
    """The gate: softmax over experts in float32, the top-k kept (and renormalised). A plain weight rather than an
    nn.Linear, so that quantizing a block's linear layers leaves the routing exact."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.top_k, self.normalize = config.experts_per_token, config.normalize_top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The k weights (float32) and expert indices of each token, (N, k) each."""
        probs = F.softmax(F.linear(tokens, self.weight).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True) if self.normalize else weights), chosen


class Expert(nn.Module):
    """One expert: a SwiGLU MLP, w2(silu(w1(x)) * w3(x)), named as Mixtral's checkpoints name it."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def layer_state(tensors: dict[str, Tensor], config: BlockConfig) -> dict[str, Tensor]:
    """One layer's tensors, in any of the layouts, as our block's state dict."""
    state = {}
    for name, tensor in tensors.items():
        head, _, rest = name.partition(".")
        name = f"{HF_TO_MEADOW.get(head, head)}.{rest}"
        if name.startswith("feed_forward.experts.") and tensor.ndim == 3:  # all experts' layer(s) in one (E, out, in)
            leaves = FUSED_EXPERTS[name.removeprefix("feed_forward.experts.").removesuffix(".weight")]
            for expert, weights in enumerate(tensor.unbind(0)):
                for leaf, weight in zip(leaves, weights.chunk(len(leaves), dim=0)):
                    state[f"feed_forward.experts.{expert}.{leaf}.weight"] = weight
        elif name.startswith("feed_forward.experts.") and name.count(".") == 4:  # feed_forward.experts.N.LEAF.weight
            start, leaf, suffix = name.rsplit(".", 2)
            state[f"{start}.{EXPERT_LEAVES.get(leaf, leaf)}.{suffix}"] = tensor
        else:
            state[name] = tensor
    return state


def linear_shapes(config: BlockConfig) -> dict[str, tuple[int, int]]:
    """The layers LoRA can target: the attention projections (see the module docstring)."""
    return {name: shape for name, shape in llama.linear_shapes(config).items() if name in LORA_PATHS}


FAMILY = Family(
    name="mixtral",
    config_from_hf=MixtralConfig.from_hf,
    block=MixtralBlock,
    layer_state=layer_state,
    load_client_parts=llama.load_client_parts,
    linear_shapes=linear_shapes,
    lora_paths=LORA_PATHS,
    gguf_architectures=("qwen3moe",),  # llama.cpp's Qwen3-MoE (its Mixtral files say "llama": not read)
)
