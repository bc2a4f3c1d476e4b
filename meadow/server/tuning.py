"""What a request adds to the served blocks, checked at the edge: deep prompts, a client's own LoRA weights,
and the name of a served adapter. Turned into per-block LoRA updates only when the blocks run, so that
rpc_backward can take gradients w.r.t. the client's weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meadow.models import BlockConfig, linear_shapes
from meadow.models.lora import BlockLora, LoraPair, merge
from meadow.wire import BadRequest, BlockRange, LoraEntry, Tuning, WrongServer

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class TuningInputs:
    """A request's checked additions: deep prompts (blocks, P, H), the client's flat LoRA weights and their layout,
    and the served adapter's updates for the requested blocks."""

    blocks: BlockRange
    prompts: Tensor | None = None
    lora_flat: Tensor | None = None
    entries: tuple[LoraEntry, ...] = ()
    adapter: list[BlockLora] | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> "TuningInputs":
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return TuningInputs(self.blocks, move(self.prompts), move(self.lora_flat), self.entries, self.adapter)

    def block_loras(self, config: BlockConfig, lora_flat: Tensor | None = None) -> list[BlockLora | None] | None:
        """One set of LoRA updates per requested block: the served adapter's plus the client's, cut from
        `lora_flat` (default: the weights as sent; pass a tensor that requires grad to differentiate)."""
        lora_flat = self.lora_flat if lora_flat is None else lora_flat
        client: list[BlockLora] = [{} for _ in range(len(self.blocks))]
        if lora_flat is not None:
            shapes, offset = linear_shapes(config), 0
            for entry in self.entries:
                in_features, out_features = shapes[entry.module]
                a_size, b_size = entry.rank * in_features, out_features * entry.rank
                A = lora_flat[offset : offset + a_size].view(entry.rank, in_features)
                B = lora_flat[offset + a_size : offset + a_size + b_size].view(out_features, entry.rank)
                offset += a_size + b_size
                client[entry.block - self.blocks.start][entry.module] = (LoraPair(A, B, entry.scale),)
        adapter = self.adapter or [None] * len(self.blocks)
        merged = [merge(served, own) for served, own in zip(adapter, client)]
        return merged if any(merged) else None


def check_tuning(
    request: Tuning,
    blocks: BlockRange,
    tensors: list[Tensor],
    config: BlockConfig,
    adapters: dict[str, list[BlockLora]],
    first_block: int,
    max_prompt_tokens: int,
    max_lora_rank: int,
) -> TuningInputs:
    """Check a request's tuning fields against the tensors that carry them (prompts first, then LoRA weights)."""
    announced = int(request.prompts) + bool(request.lora)
    if len(tensors) != announced:
        raise BadRequest(f"the request's tuning fields announce {announced} tensors (deep prompts, then LoRA weights), "
                         f"got {len(tensors)}")  # fmt: skip
    tuning = TuningInputs(blocks, entries=tuple(request.lora))
    tensors = list(tensors)
    if request.prompts:
        tuning.prompts = prompts = tensors.pop(0)
        shape = (len(blocks), "prefix length", config.hidden_size)
        if prompts.ndim != 3 or prompts.shape[0] != len(blocks) or prompts.shape[2] != config.hidden_size:
            raise BadRequest(f"deep prompts must have shape {shape}, got {tuple(prompts.shape)}")
        if not 0 < prompts.shape[1] <= max_prompt_tokens:
            raise BadRequest(f"deep prompts of {prompts.shape[1]} tokens; this server takes 1 to {max_prompt_tokens}")
        _check_float("deep prompts", prompts)
    if request.lora:
        tuning.lora_flat = flat = tensors.pop(0)
        shapes, seen, expected = linear_shapes(config), set(), 0
        for entry in request.lora:
            if entry.module not in shapes:
                raise BadRequest(f"LoRA for unknown module {entry.module!r}; modules: {', '.join(shapes)}")
            if not blocks.start <= entry.block < blocks.end:
                raise BadRequest(f"LoRA for block {entry.block}, outside the requested blocks {blocks}")
            if (entry.block, entry.module) in seen:
                raise BadRequest(f"two LoRA entries for block {entry.block} {entry.module}")
            if entry.rank > max_lora_rank:
                raise BadRequest(f"LoRA rank {entry.rank} exceeds this server's limit {max_lora_rank}")
            seen.add((entry.block, entry.module))
            in_features, out_features = shapes[entry.module]
            expected += entry.rank * (in_features + out_features)
        if flat.ndim != 1 or flat.numel() != expected:
            raise BadRequest(f"LoRA weights must be one flat tensor of {expected} values, got shape {tuple(flat.shape)}")
        _check_float("LoRA weights", flat)
    if request.adapter is not None:
        if request.adapter not in adapters:
            served = ", ".join(adapters) or "none"
            raise WrongServer(f"adapter {request.adapter!r} is not served here (this server has: {served})")
        offset = blocks.start - first_block
        tuning.adapter = adapters[request.adapter][offset : offset + len(blocks)]
    return tuning


def _check_float(what: str, tensor: Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise BadRequest(f"{what} must be float32, float16 or bfloat16, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise BadRequest(f"{what} contain NaN or infinity")


def add_prompt(x: Tensor, prompt: Tensor, start: int) -> Tensor:
    """Add a block's deep prompt (P, H) to the hidden states of prefix positions [0, P) that x (B, T, H) holds,
    x being the tokens at positions [start, start + T). Out of place, so that autograd sees it."""
    n = min(prompt.shape[0] - start, x.shape[1])
    if n <= 0:
        return x
    return torch.cat([x[:, :n] + prompt[start : start + n].to(x.dtype), x[:, n:]], dim=1)
