"""What Meadow knows about one model architecture (a `Family`): the registry (registry.py) maps HF model types and
GGUF architectures to these."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from meadow.models.client_parts import ClientParts, TensorReader
from meadow.models.config import BlockConfig


@dataclass(frozen=True)
class Family:
    """One architecture's block math and checkpoint layout: how to build its config from an HF config, its block
    module, where layer N's tensors lie in a checkpoint and what they are called in our modules, the parts a client
    runs, and the linear layers LoRA (peft) and quantization can target."""

    name: str
    config_from_hf: Callable[[Any], BlockConfig]  # UnsupportedModelError for options without block math here
    block: Callable[[BlockConfig, int], nn.Module]  # (config, layer index) -> a block, called as block(x, positions, ...)
    # one layer's tensors under HF names relative to layer_prefix -> our block's state dict
    layer_state: Callable[[dict[str, Tensor], BlockConfig], dict[str, Tensor]]
    load_client_parts: Callable[[TensorReader, BlockConfig], ClientParts]
    linear_shapes: Callable[[BlockConfig], dict[str, tuple[int, int]]]  # LoRA targets: leaf name -> (in, out)
    lora_paths: Mapping[str, str]  # LoRA target leaf name -> its HF module path inside a layer, as peft names it
    layer_prefix: str = "model.layers.{}."  # HF name prefix of layer N's tensors, formatted with N
    gguf_architectures: tuple[str, ...] = ()  # llama.cpp's general.architecture values of this family
    # where layer N sits in transformers' model (peft's adapters name it so), if not where its tensors are stored
    module_prefix: str | None = None

    def layer_tensor_prefix(self, index: int) -> str:
        return self.layer_prefix.format(index)

    def layer_module_prefix(self, index: int) -> str:
        return (self.module_prefix or self.layer_prefix).format(index)


def renamed(names: Mapping[str, str]) -> Callable[[dict[str, Tensor], BlockConfig], dict[str, Tensor]]:
    """A layer_state that renames the first component of each name ('self_attn.q_proj.weight' ->
    'attention.q_proj.weight' for {'self_attn': 'attention'}) and keeps the rest."""

    def layer_state(tensors: dict[str, Tensor], config: BlockConfig) -> dict[str, Tensor]:
        state = {}
        for name, tensor in tensors.items():
            head, _, rest = name.partition(".")
            state[f"{names.get(head, head)}.{rest}"] = tensor
        return state

    return layer_state
