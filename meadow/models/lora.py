"""LoRA for our blocks: the low-rank update of a linear layer, and peft's adapter folder format
(`adapter_config.json` + `adapter_model.safetensors`), read for a span of blocks and written from a client's weights.
Checked against peft itself in tests."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from meadow.models.config import BlockConfig
from meadow.models.family import Family
from meadow.models.registry import family_for, family_of, linear_shapes

PEFT_PREFIX = "base_model.model."  # peft's prefix before the model's own tensor names


class AdapterError(ValueError):
    """A LoRA adapter that this model cannot use (unsupported options, wrong shapes, unknown modules)."""


@dataclass(frozen=True)
class LoraPair:
    """The low-rank update of one linear layer: y += scale * B(A(x)); A is (rank, in), B is (out, rank)."""

    A: Tensor
    B: Tensor
    scale: float

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x.to(self.A.dtype), self.A), self.B).to(x.dtype) * self.scale


BlockLora = dict[str, tuple[LoraPair, ...]]  # linear layer name ("q_proj") -> the updates added to its output


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's scaling: alpha / rank, or alpha / sqrt(rank) for rank-stabilized LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def merge(*loras: BlockLora | None) -> BlockLora | None:
    """Several sets of updates for one block (a served adapter and a client's own) applied together."""
    merged: BlockLora = {}
    for lora in loras:
        for name, pairs in (lora or {}).items():
            merged[name] = merged.get(name, ()) + pairs
    return merged or None


def load_peft_adapter(
    path: str | Path, config: BlockConfig, start: int, end: int, dtype: torch.dtype, device: str | torch.device
) -> list[BlockLora]:
    """The updates of blocks [start, end) from a peft LoRA adapter folder, one BlockLora per block; AdapterError
    if the adapter does not fit this model or uses an option Meadow does not implement."""
    path = Path(path)
    settings = _read_adapter_config(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"{path} has no adapter_model.safetensors")
    shapes, peft_key = linear_shapes(config), peft_key_pattern(family_of(config))
    blocks: list[BlockLora] = [{} for _ in range(start, end)]
    pending: dict[tuple[int, str], dict[str, Tensor]] = {}
    with safe_open(weights_file, framework="pt") as f:
        for key in f.keys():
            match = peft_key.match(key)
            if match is None:
                raise AdapterError(f"{path}: {key} is not a LoRA weight of a transformer block; Meadow servers only "
                                   f"apply adapters to these linear layers of their blocks: {', '.join(shapes)}")  # fmt: skip
            index, module, which = int(match[1]), match[2].rpartition(".")[2], match[3]
            if module not in shapes:
                raise AdapterError(f"{path}: {key} adapts unknown module {module!r}; supported: {', '.join(shapes)}")
            if not 0 <= index < config.num_hidden_layers:
                raise AdapterError(f"{path}: {key} names block {index}, the model has {config.num_hidden_layers}")
            if start <= index < end:
                pending.setdefault((index, module), {})[which] = f.get_tensor(key)
    for (index, module), pair in sorted(pending.items()):
        if pair.keys() != {"A", "B"}:
            raise AdapterError(f"{path}: block {index} {module} has lora_{''.join(pair)} without its other half")
        A, B = pair["A"], pair["B"]
        rank = A.shape[0]
        in_features, out_features = shapes[module]
        if A.shape != (rank, in_features) or B.shape != (out_features, rank):
            raise AdapterError(f"{path}: block {index} {module} has A {tuple(A.shape)} and B {tuple(B.shape)}; this "
                               f"model needs ({rank}, {in_features}) and ({out_features}, {rank})")  # fmt: skip
        scale = lora_scale(rank, settings["lora_alpha"], settings["use_rslora"])
        blocks[index - start][module] = (LoraPair(A.to(device, dtype), B.to(device, dtype), scale),)
    return blocks


def peft_key_pattern(family: Family) -> re.Pattern:
    """peft's names of a family's LoRA weights: groups (layer index, module path inside the layer, A or B)."""
    layer = re.escape(family.module_prefix or family.layer_prefix).replace(re.escape("{}"), r"(\d+)")
    return re.compile(rf"^{re.escape(PEFT_PREFIX)}{layer}([\w.]+)\.lora_([AB])\.weight$")


def _read_adapter_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a peft adapter folder: it has no adapter_config.json")
    settings = json.loads(config_file.read_text())
    if settings.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {settings.get('peft_type')!r} is not supported, only LORA")
    unsupported = {
        "use_dora": bool(settings.get("use_dora")),
        "fan_in_fan_out": bool(settings.get("fan_in_fan_out")),
        "bias": settings.get("bias", "none") != "none",
        "modules_to_save": bool(settings.get("modules_to_save")),
        "alpha_pattern": bool(settings.get("alpha_pattern")),
        "rank_pattern": bool(settings.get("rank_pattern")),
    }
    if any(unsupported.values()):
        raise AdapterError(f"{path}: adapter options {[k for k, v in unsupported.items() if v]} are not supported")
    return {"lora_alpha": float(settings["lora_alpha"]), "use_rslora": bool(settings.get("use_rslora"))}


def save_peft_adapter(
    path: str | Path, weights: dict[tuple[int, str], tuple[Tensor, Tensor]], rank: int, alpha: float,
    use_rslora: bool = False, base_model: str | None = None, model_type: str = "llama",
) -> None:  # fmt: skip
    """Write LoRA weights {(block, module): (A, B)} of a `model_type` model as a peft adapter folder, loadable by peft
    and `meadow serve --adapters`."""
    path, family = Path(path), family_for(model_type)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (index, module), (A, B) in weights.items():
        prefix = f"{PEFT_PREFIX}{family.layer_module_prefix(index)}{family.lora_paths[module]}"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().cpu().contiguous()
    save_file(tensors, path / "adapter_model.safetensors")
    settings = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora, "lora_dropout": 0.0,
        "target_modules": sorted({module for _, module in weights}), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": base_model, "task_type": "CAUSAL_LM", "inference_mode": True,
    }  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(settings, indent=2))


def init_lora_pair(in_features: int, out_features: int, rank: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """peft's default initialisation: A Kaiming-uniform, B zero, so a new adapter changes nothing at first."""
    A = torch.empty(rank, in_features, dtype=dtype)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, torch.zeros(out_features, rank, dtype=dtype)
