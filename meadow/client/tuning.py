"""What a client trains and the servers apply: deep prompts and the client's own LoRA weights for the remote
blocks. They live here, travel with each request (each server gets the part for its blocks), and their gradients
come back from rpc_backward; servers keep nothing."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from meadow.models import BlockConfig, linear_shapes
from meadow.models.lora import init_lora_pair, lora_scale, save_peft_adapter
from meadow.wire import BlockRange, LoraEntry


@dataclass(frozen=True)
class RemoteTuning:
    """The tensors a client sends with its requests, for every block: deep prompts (num_blocks, P, H) and LoRA
    weights flattened in `entries` order (sorted by block), `sizes` values each."""

    prompts: Tensor | None = None
    lora_flat: Tensor | None = None
    entries: tuple[LoraEntry, ...] = ()
    sizes: tuple[int, ...] = ()

    def with_tensors(self, prompts: Tensor | None, lora_flat: Tensor | None) -> "RemoteTuning":
        return replace(self, prompts=prompts, lora_flat=lora_flat)

    def lora_range(self, blocks: BlockRange) -> tuple[int, int]:
        """Where the LoRA weights of `blocks` lie in `lora_flat`."""
        before = sum(size for entry, size in zip(self.entries, self.sizes) if entry.block < blocks.start)
        inside = sum(size for entry, size in zip(self.entries, self.sizes) if blocks.start <= entry.block < blocks.end)
        return before, before + inside

    def for_hop(self, blocks: BlockRange) -> tuple[dict, list[Tensor]]:
        """The tuning fields of a request for `blocks` and the tensors that go with them."""
        entries = tuple(entry for entry in self.entries if blocks.start <= entry.block < blocks.end)
        tensors = []
        if self.prompts is not None:
            tensors.append(self.prompts[blocks.start : blocks.end])
        if entries:
            start, end = self.lora_range(blocks)
            tensors.append(self.lora_flat[start:end])
        return {"prompts": self.prompts is not None, "lora": entries}, tensors


class PromptTuning(nn.Module):
    """Trainable prompts: `prefix` (P, H) embeddings put before every sequence ("ptune"), and for "deep_ptune"
    `deep` (num_blocks, P, H) added to those P positions' hidden states before each remote block."""

    def __init__(self, config: BlockConfig, pre_seq_len: int, deep: bool, init_std: float = 0.02):
        super().__init__()
        if pre_seq_len <= 0:
            raise ValueError(f"pre_seq_len must be positive for prompt tuning, got {pre_seq_len}")
        self.prefix = nn.Parameter(torch.randn(pre_seq_len, config.hidden_size) * init_std)
        # zeros: a fresh deep prompt changes nothing beyond the shallow one, as in Petals
        self.deep = nn.Parameter(torch.zeros(config.num_hidden_layers, pre_seq_len, config.hidden_size)) if deep else None

    @property
    def length(self) -> int:
        return self.prefix.shape[0]


class ClientLora(nn.Module):
    """LoRA weights the client owns and trains for the remote blocks: for each block and target module, A (rank, in)
    initialised like peft's and B (out, rank) zero. `save_pretrained` writes a peft adapter (servable with
    `meadow serve --adapters`)."""

    def __init__(
        self,
        config: BlockConfig,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
        use_rslora: bool = False,
    ):
        super().__init__()
        shapes = linear_shapes(config)
        unknown = set(target_modules) - shapes.keys()
        if unknown:
            raise ValueError(f"LoRA target modules {sorted(unknown)} are not in a block; choose from {', '.join(shapes)}")
        self.rank, self.alpha, self.use_rslora, self.model_type = rank, alpha, use_rslora, config.model_type
        self.keys = [(block, module) for block in range(config.num_hidden_layers) for module in shapes if module in target_modules]
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for block, module in self.keys:
            A, B = init_lora_pair(*shapes[module], rank)
            self.lora_A[f"{block}_{module}"], self.lora_B[f"{block}_{module}"] = nn.Parameter(A), nn.Parameter(B)

    @classmethod
    def from_peft_config(cls, config: BlockConfig, peft_config) -> "ClientLora":
        """From a peft LoraConfig (r, lora_alpha, target_modules, use_rslora); without target_modules, peft's defaults
        for the model type (q_proj, v_proj for Llama; query_key_value for BLOOM and Falcon)."""
        # imported here: peft is slow to import, and only clients with LoRA need it
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS

        targets = peft_config.target_modules or PEFT_DEFAULT_TARGETS.get(config.model_type)
        if isinstance(targets, str):
            raise ValueError(f"target_modules as a regex ({targets!r}) is not supported: list the module names")
        if not targets:
            raise ValueError(f"peft has no default LoRA targets for {config.model_type!r}: set target_modules")
        return cls(config, peft_config.r, peft_config.lora_alpha, sorted(targets), peft_config.use_rslora)

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.lora_A[f"{b}_{m}"], self.lora_B[f"{b}_{m}"]) for b, m in self.keys]

    def remote_tuning(self) -> RemoteTuning:
        """The weights as one flat tensor (differentiable: gradients reach every A and B) and its layout."""
        scale = lora_scale(self.rank, self.alpha, self.use_rslora)
        entries = tuple(LoraEntry(block=b, module=m, rank=self.rank, scale=scale) for b, m in self.keys)
        pairs = self.pairs()
        flat = torch.cat([t.reshape(-1) for pair in pairs for t in pair])
        return RemoteTuning(lora_flat=flat, entries=entries, sizes=tuple(A.numel() + B.numel() for A, B in pairs))

    def save_pretrained(self, path: str | Path, base_model: str | None = None) -> None:
        weights = dict(zip(self.keys, self.pairs()))
        save_peft_adapter(path, weights, self.rank, self.alpha, self.use_rslora, base_model, self.model_type)
