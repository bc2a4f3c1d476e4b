"""A block's linear layer applied with the LoRA updates a request adds to it (served adapters, a client's own)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from meadow.models.lora import BlockLora


def project(layer: nn.Module, x: Tensor, lora: BlockLora | None, name: str) -> Tensor:
    """layer(x) plus the LoRA updates that `lora` holds for the layer called `name`, if any."""
    y = layer(x)
    for update in lora.get(name, ()) if lora else ():
        y = y + update(x)
    return y
