"""Phi-3 decoder block (Phi-3 mini and medium, Phi-4): Llama's, with the query, key and value projections fused into one
(`qkv_proj`, rows [q | k | v]) and the MLP's gate and up projections into another (`gate_up_proj`, rows [gate | up]).
They stay fused here, as transformers and peft have them: one product each, and LoRA adapters for Phi-3 (which target
`qkv_proj` and `gate_up_proj`) fit. Long-context variants (rope type "longrope": Phi-3 128k, Phi-3.5, Phi-4-mini) and a
partial rotary factor are refused.

Checked numerically against transformers in tests/test_families.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from meadow.models import llama
from meadow.models.config import BlockConfig, UnsupportedModelError
from meadow.models.family import Family, renamed
from meadow.models.linear import project
from meadow.models.llama import ACTIVATIONS, LlamaBlock, LlamaConfig

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora

LORA_PATHS = {"qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj", "gate_up_proj": "mlp.gate_up_proj",
              "down_proj": "mlp.down_proj"}  # fmt: skip


def config_from_hf(hf: Any) -> LlamaConfig:
    """Llama's config read from a Phi-3 one; UnsupportedModelError for a partial rotary factor."""
    factor = (hf.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor {factor} is not supported (only 1.0)")
    return LlamaConfig.from_hf(hf)


class Phi3Block(LlamaBlock):
    """Llama's decoder layer with the fused attention and MLP."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        attention, feed_forward = FusedAttention(config, layer_idx), FusedFeedForward(config)
        super().__init__(config, layer_idx, feed_forward=feed_forward, attention=attention)


class FusedAttention(llama.Attention):
    """Llama's attention whose q, k and v come from one product."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        del self.q_proj, self.k_proj, self.v_proj  # (built on the meta device: nothing was allocated)
        self.qkv_proj = nn.Linear(config.hidden_size, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)

    def projected(self, x: Tensor, lora: BlockLora | None) -> tuple[Tensor, Tensor, Tensor]:
        qkv = project(self.qkv_proj, x, lora, "qkv_proj").view(-1, self.n_head + 2 * self.n_kv_head, self.head_dim)
        return qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)


class FusedFeedForward(nn.Module):
    """down(act(gate) * up), gate and up the two halves of one product."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, lora: BlockLora | None = None) -> Tensor:
        gate, up = project(self.gate_up_proj, x, lora, "gate_up_proj").chunk(2, dim=-1)
        return project(self.down_proj, self.act(gate) * up, lora, "down_proj")


def linear_shapes(config: BlockConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a block, by its HF leaf name."""
    hidden, q, ffn = config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size
    qkv = q + 2 * config.num_key_value_heads * config.head_dim
    return {"qkv_proj": (hidden, qkv), "o_proj": (q, hidden), "gate_up_proj": (hidden, 2 * ffn),
            "down_proj": (ffn, hidden)}  # fmt: skip


FAMILY = Family(
    name="phi3",
    config_from_hf=config_from_hf,
    block=Phi3Block,
    layer_state=renamed(llama.HF_TO_MEADOW),
    load_client_parts=llama.load_client_parts,
    linear_shapes=linear_shapes,
    lora_paths=LORA_PATHS,
    gguf_architectures=("phi3",),  # llama.cpp's name for Phi-3 and Phi-4 files
)
