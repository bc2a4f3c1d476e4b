"""The blocks a server hosts, and how one request or one inference step runs through them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from meadow.models import BlockConfig, KVCache, LlamaBlock
from meadow.models.lora import BlockLora
from meadow.server.graph_cache import Graph, counting_saved_activations
from meadow.server.tuning import TuningInputs, add_prompt
from meadow.wire import BadRequest, BlockRange


@dataclass
class Span:
    """Blocks [first, first + len(blocks)) of a model, loaded on one device in one dtype, and the LoRA adapters
    served for them (name -> one set of updates per hosted block)."""

    blocks: list[LlamaBlock]
    first: int
    config: BlockConfig
    dtype: torch.dtype
    device: torch.device
    adapters: dict[str, list[BlockLora]] = field(default_factory=dict)

    @property
    def range(self) -> BlockRange:
        return BlockRange(start=self.first, end=self.first + len(self.blocks))

    def forward(
        self,
        x: Tensor,
        position_ids: Tensor,
        key_mask: Tensor,
        blocks: BlockRange,
        prompts: Tensor | None = None,
        lora: list[BlockLora | None] | None = None,
        caches: list[KVCache] | None = None,
        start: int = 0,
    ) -> Tensor:
        """x (B, T, H) on this span's device and dtype through `blocks`; differentiable w.r.t. x, prompts and lora."""
        position_ids, key_mask = position_ids.to(self.device), key_mask.to(self.device)
        if bool(key_mask.all()):
            key_mask = None  # no padding: the blocks may then use attention's fast causal path, with no mask to build
        for offset, index in enumerate(range(blocks.start, blocks.end)):
            if prompts is not None:
                x = add_prompt(x, prompts[offset], start)
            cache = caches[offset] if caches is not None else None
            block_lora = lora[offset] if lora is not None else None
            x = self.blocks[index - self.first](x, position_ids, key_mask, cache=cache, start=start, lora=block_lora)
        return x

    @torch.inference_mode()
    def run(
        self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor, blocks: BlockRange, tuning: TuningInputs | None = None
    ) -> Tensor:
        """rpc_forward: the output hidden states, on the CPU in the input's dtype."""
        tuning = (tuning or TuningInputs(blocks)).to(self.device, self.dtype)
        x = hidden.to(self.device, self.dtype)
        out = self.forward(x, position_ids, key_mask, blocks, tuning.prompts, tuning.block_loras(self.config))
        return out.to("cpu", hidden.dtype)

    def run_keeping_graph(
        self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor, blocks: BlockRange, tuning: TuningInputs | None = None
    ) -> tuple[Tensor, Graph]:
        """rpc_forward of a training client: the output, and the autograd graph for its backward."""
        graph = self._graph(hidden, position_ids, key_mask, blocks, tuning or TuningInputs(blocks))
        return graph.output.detach().to("cpu", hidden.dtype), graph

    def backward(
        self,
        hidden: Tensor,
        position_ids: Tensor,
        key_mask: Tensor,
        blocks: BlockRange,
        grad_output: Tensor,
        tuning: TuningInputs | None = None,
        graph: Graph | None = None,
    ) -> list[Tensor]:
        """rpc_backward: the gradients w.r.t. the hidden states and, if sent, the deep prompts and the client's LoRA
        weights, each on the CPU in the dtype it came in. Uses the forward's kept `graph` if there is one, else
        recomputes the forward with autograd on. The served weights never require grad, so they get none."""
        tuning = tuning or TuningInputs(blocks)
        sent = [t for t in (hidden, tuning.prompts, tuning.lora_flat) if t is not None]
        if graph is None or graph.output.shape != grad_output.shape or len(graph.leaves) != len(sent):
            graph = self._graph(hidden, position_ids, key_mask, blocks, tuning)
        grads = torch.autograd.grad(graph.output, graph.leaves, grad_output.to(self.device, self.dtype))
        return [grad.to("cpu", original.dtype) for grad, original in zip(grads, sent)]

    def _graph(self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor, blocks: BlockRange, tuning: TuningInputs) -> Graph:
        """The forward with autograd on, differentiable w.r.t. the hidden states and the tuning tensors sent."""
        sent = [t for t in (hidden, tuning.prompts, tuning.lora_flat) if t is not None]
        with torch.enable_grad(), counting_saved_activations() as saved:
            leaves = [t.detach().to(self.device, self.dtype).requires_grad_() for t in sent]
            x, rest = leaves[0], iter(leaves[1:])
            prompts = next(rest) if tuning.prompts is not None else None
            lora_flat = next(rest) if tuning.lora_flat is not None else None
            lora = tuning.to(self.device, self.dtype).block_loras(self.config, lora_flat)
            output = self.forward(x, position_ids, key_mask, blocks, prompts, lora)
        return Graph(output, leaves, saved[0], time.monotonic())


@dataclass
class Session:
    """One client's inference session: the KV cache of its blocks, the key mask of every stored token, and the
    session's tuning (deep prompts apply to the first positions; LoRA to every step)."""

    blocks: BlockRange
    batch_size: int
    max_length: int
    caches: list[KVCache]
    key_mask: Tensor  # (batch, max_length) bool, True where a stored token is real
    prompts: Tensor | None = None
    lora: list[BlockLora | None] | None = None
    position: int = 0  # tokens stored so far
    steps: int = field(default=0)

    @classmethod
    def open(
        cls, span: Span, blocks: BlockRange, batch_size: int, max_length: int, tuning: TuningInputs | None = None
    ) -> "Session":
        config = span.config
        caches = [
            KVCache(batch_size, config.num_key_value_heads, max_length, config.head_dim, span.dtype, span.device)
            for _ in range(len(blocks))
        ]
        key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=span.device)
        tuning = (tuning or TuningInputs(blocks)).to(span.device, span.dtype)
        return cls(blocks, batch_size, max_length, caches, key_mask, tuning.prompts, tuning.block_loras(config))

    @torch.inference_mode()
    def step(self, span: Span, hidden: Tensor, position_ids: Tensor, new_mask: Tensor) -> Tensor:
        batch, length = hidden.shape[:2]
        if batch != self.batch_size:
            raise BadRequest(f"session was opened for batch size {self.batch_size}, step has {batch}")
        end = self.position + length
        if end > self.max_length:
            raise BadRequest(
                f"step of {length} tokens at position {self.position} exceeds the session's max_length {self.max_length}"
            )
        self.key_mask[:, self.position : end] = new_mask.to(self.key_mask.device)
        x = hidden.to(span.device, span.dtype)
        out = span.forward(
            x, position_ids, self.key_mask[:, :end], self.blocks, self.prompts, self.lora, self.caches, self.position
        )
        self.position, self.steps = end, self.steps + 1
        return out.to("cpu", hidden.dtype)
