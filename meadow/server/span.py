"""The blocks a server hosts, and how work runs through them: a request or an inference step is cut into pieces
(a generator yields each piece, is sent its output, and returns the whole result), and the pieces of many sessions
run through the blocks together in one packed pass (`Span.run_pieces`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Generator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meadow.models import BlockConfig, KVCache, Part
from meadow.models.attention import lengthened
from meadow.models.lora import BlockLora
from meadow.models.packed import unpacked_products
from meadow.server.graph_cache import Graph, counting_saved_activations
from meadow.server.tuning import TuningInputs, add_prompt
from meadow.wire import BadRequest, BlockRange


@dataclass
class Piece:
    """Tokens of one session or request for a packed pass: hidden (b, t, H) at positions [start, start + t) of its
    caches (none: a request without a cache, start 0), with its session's deep prompts and LoRA updates."""

    hidden: Tensor
    position_ids: Tensor
    key_mask: Tensor | None  # (b, start + t) on the CPU, True = real key; None: nothing padded
    blocks: BlockRange
    start: int = 0
    caches: list[KVCache] | None = None
    prompts: Tensor | None = None  # (blocks, P, H)
    lora: list[BlockLora | None] | None = None

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


@dataclass
class Separate:
    """A piece that cannot join a packed pass (it needs autograd: a training forward or backward): run on its own."""

    run: Callable[[], Any]
    tokens: int


Pieces = Generator["Piece | Separate", Any, Any]  # yields pieces, is sent each one's output, returns the result


def row_groups(batch: int, length: int, chunk_tokens: int) -> list[slice]:
    """Rows of a (batch, length) request in groups of about chunk_tokens tokens (one row at least)."""
    rows = max(1, chunk_tokens // length)
    return [slice(start, start + rows) for start in range(0, batch, rows)]


def run_alone(span: "Span", pieces: Pieces) -> Any:
    """Run a generator of packed pieces to its end with nothing batched alongside: its result."""
    piece = next(pieces)
    while True:
        try:
            piece = pieces.send(span.run_pieces([piece])[0])
        except StopIteration as stop:
            return stop.value


class RowsUpdate:
    """A LoRA update that applies to rows [start, stop) of a packed batch only: one session's adapter."""

    def __init__(self, update: Callable[[Tensor], Tensor], start: int, stop: int):
        self.update, self.start, self.stop = update, start, stop

    def __call__(self, x: Tensor) -> Tensor:
        y = self.update(x[:, self.start : self.stop])
        return F.pad(y, (0, 0, self.start, x.shape[1] - self.stop))


@dataclass
class Span:
    """Blocks [first, first + len(blocks)) of a model, loaded on one device in one dtype, and the LoRA adapters
    served for them (name -> one set of updates per hosted block)."""

    blocks: list[nn.Module]
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
    ) -> Tensor:
        """x (B, T, H) on this span's device and dtype through `blocks`, without a cache; differentiable w.r.t. x,
        prompts and lora (training runs here; inference runs packed, in run_pieces)."""
        # no padding: the blocks may then use attention's fast causal path, with no mask to build
        key_mask = None if bool(key_mask.all()) else key_mask.to(self.device)
        position_ids = position_ids.to(self.device)
        for offset, index in enumerate(range(blocks.start, blocks.end)):
            if prompts is not None:
                x = add_prompt(x, prompts[offset], 0)
            block_lora = lora[offset] if lora is not None else None
            x = self.blocks[index - self.first](x, position_ids, key_mask, lora=block_lora)
        return x

    @torch.inference_mode()
    def run_pieces(self, pieces: list[Piece]) -> list[Tensor]:
        """Several pieces as one pass: at each block, the tokens of every piece that uses it run as one batch through
        the norms, projections and MLP, and attend per piece over the piece's own cache. Each output is on the CPU in
        its input's dtype, equal (up to float rounding) to running the piece alone."""
        # one copy to the device and one back per pass, not one per piece: on a GPU each copy waits for the device
        sizes = [piece.tokens for piece in pieces]
        width = self.config.hidden_size
        flat = torch.cat([piece.hidden.reshape(-1, width) for piece in pieces]).to(self.device, self.dtype)
        hidden = [rows.view(piece.hidden.shape) for rows, piece in zip(flat.split(sizes), pieces)]
        masks = [None if piece.key_mask is None else piece.key_mask.to(self.device) for piece in pieces]
        active: list[int] = []  # pieces in the batch now, in order
        x = positions = None
        for index in range(min(p.blocks.start for p in pieces), max(p.blocks.end for p in pieces)):
            using = [i for i, p in enumerate(pieces) if p.blocks.start <= index < p.blocks.end]
            if using != active:  # pieces join or leave: regroup their rows
                self._unpack(x, active, hidden)
                active = using
                x = torch.cat([hidden[i].reshape(1, -1, self.config.hidden_size) for i in active], dim=1)
                positions = torch.cat([pieces[i].position_ids.reshape(-1) for i in active]).to(self.device)[None]
            x = self._add_prompts(x, index, [pieces[i] for i in active])
            parts = [
                Part(*hidden[i].shape[:2], pieces[i].start, masks[i],
                     pieces[i].caches[index - pieces[i].blocks.start] if pieces[i].caches else None)
                for i in active
            ]  # fmt: skip
            lora = self._rows_lora(index, [pieces[i] for i in active])
            x = self.blocks[index - self.first](x, positions, lora=lora, parts=parts)
        self._unpack(x, active, hidden)
        flat = torch.cat([h.reshape(-1, width) for h in hidden]).cpu()
        return [rows.view(piece.hidden.shape).to(piece.hidden.dtype) for rows, piece in zip(flat.split(sizes), pieces)]

    @staticmethod
    def _unpack(x: Tensor | None, active: list[int], hidden: list[Tensor]) -> None:
        """Write the packed rows of x back to the hidden states of the pieces they belong to."""
        offset = 0
        for i in active:
            n = hidden[i].shape[0] * hidden[i].shape[1]
            hidden[i] = x[0, offset : offset + n].view(hidden[i].shape)
            offset += n

    @staticmethod
    def _add_prompts(x: Tensor, index: int, pieces: list[Piece]) -> Tensor:
        """Add each piece's deep prompt for block `index` to its tokens at prefix positions (in place: x is always
        the pass's own tensor, made by torch.cat or a block)."""
        offset = 0
        for piece in pieces:
            batch, length = piece.hidden.shape[:2]
            if piece.prompts is not None:
                prompt = piece.prompts[index - piece.blocks.start]
                n = min(prompt.shape[0] - piece.start, length)
                if n > 0:
                    rows = x[0, offset : offset + batch * length].view(batch, length, -1)
                    rows[:, :n] += prompt[piece.start : piece.start + n].to(x.dtype)
            offset += batch * length
        return x

    @staticmethod
    def _rows_lora(index: int, pieces: list[Piece]) -> BlockLora | None:
        """The LoRA updates of block `index` for a packed batch: each piece's own, applied to its rows only."""
        loras = [piece.lora[index - piece.blocks.start] if piece.lora else None for piece in pieces]
        if len(pieces) == 1 or not any(loras):
            return loras[0]
        merged: BlockLora = {}
        offset = 0
        for piece, lora in zip(pieces, loras):
            stop = offset + piece.tokens
            for name, updates in (lora or {}).items():
                merged[name] = merged.get(name, ()) + tuple(RowsUpdate(update, offset, stop) for update in updates)
            offset = stop
        return merged

    def forward_pieces(
        self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor, blocks: BlockRange, tuning: TuningInputs | None,
        chunk_tokens: int,
    ) -> Pieces:  # fmt: skip
        """rpc_forward without autograd, in pieces of about chunk_tokens tokens: groups of whole rows; a row longer
        than a chunk goes through a temporary KV cache, a chunk of its tokens at a time. Returns the output."""
        batch, length = hidden.shape[:2]
        tuning = (tuning or TuningInputs(blocks)).to(self.device, self.dtype)
        prompts, lora = tuning.prompts, tuning.block_loras(self.config)
        padded = not bool(key_mask.all())
        outputs = []
        for rows in row_groups(batch, length, chunk_tokens):
            if length <= chunk_tokens:
                mask = key_mask[rows] if padded else None
                outputs.append((yield Piece(hidden[rows], position_ids[rows], mask, blocks, prompts=prompts, lora=lora)))
            else:
                session = Session.open(self, blocks, hidden[rows].shape[0], length, tuning)
                outputs.append((yield from session.step_pieces(hidden[rows], position_ids[rows], key_mask[rows], chunk_tokens)))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def graph_pieces(
        self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor, blocks: BlockRange, tuning: TuningInputs | None,
        chunk_tokens: int,
    ) -> Pieces:  # fmt: skip
        """rpc_forward of a training client, a group of rows at a time (row_groups): returns the output and each
        group's autograd graph, for its backward."""
        outputs, graphs = [], []
        for rows in row_groups(*hidden.shape[:2], chunk_tokens):
            run = partial(self.run_keeping_graph, hidden[rows], position_ids[rows], key_mask[rows], blocks, tuning)
            output, graph = yield Separate(run, hidden[rows].shape[0] * hidden.shape[1])
            outputs.append(output)
            graphs.append(graph)
        return torch.cat(outputs), graphs

    def backward_pieces(
        self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor, blocks: BlockRange, grad_output: Tensor,
        tuning: TuningInputs | None, graphs: list[Graph | None], chunk_tokens: int,
    ) -> Pieces:  # fmt: skip
        """rpc_backward, a group of rows at a time (the groups of graph_pieces, whose `graphs` it uses where kept):
        gradients w.r.t. the hidden states joined, those w.r.t. the shared deep prompts and LoRA weights summed."""
        grads = []
        for rows, graph in zip(row_groups(*hidden.shape[:2], chunk_tokens), graphs):
            run = partial(
                self.backward, hidden[rows], position_ids[rows], key_mask[rows], blocks, grad_output[rows], tuning, graph
            )
            grads.append((yield Separate(run, hidden[rows].shape[0] * hidden.shape[1])))
        first, *rest = zip(*grads)
        return [torch.cat(first)] + [sum(parts[1:], parts[0]) for parts in rest]

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
        recomputes the forward block by block (_backward_by_block). The served weights never require grad, so they
        get none."""
        tuning = tuning or TuningInputs(blocks)
        sent = [t for t in (hidden, tuning.prompts, tuning.lora_flat) if t is not None]
        if graph is not None and graph.output.shape == grad_output.shape and len(graph.leaves) == len(sent):
            grads = torch.autograd.grad(graph.output, graph.leaves, grad_output.to(self.device, self.dtype))
        else:
            grads = self._backward_by_block(hidden, position_ids, key_mask, blocks, grad_output, tuning)
        return [grad.to("cpu", original.dtype) for grad, original in zip(grads, sent)]

    def _backward_by_block(
        self, hidden: Tensor, position_ids: Tensor, key_mask: Tensor, blocks: BlockRange, grad_output: Tensor,
        tuning: TuningInputs,
    ) -> list[Tensor]:  # fmt: skip
        """The gradients w.r.t. hidden and the tuning tensors sent, holding one block's activations at a time, so
        that a backward's memory does not grow with the span: the forward runs again without autograd, keeping only
        each block's input; then each block, last first, runs again with autograd and hands the gradient w.r.t. its
        input to the block before it. Gradients w.r.t. deep prompts and LoRA weights add up over the blocks."""
        tuning = tuning.to(self.device, self.dtype)
        tuned = [t.detach().requires_grad_() for t in (tuning.prompts, tuning.lora_flat) if t is not None]
        prompts = tuned[0] if tuning.prompts is not None else None
        lora_flat = tuned[-1] if tuning.lora_flat is not None else None
        key_mask = None if bool(key_mask.all()) else key_mask.to(self.device)  # as in forward: the fast causal path
        position_ids = position_ids.to(self.device)

        def run_block(x: Tensor, offset: int) -> Tensor:
            lora = tuning.block_loras(self.config, lora_flat)  # views of lora_flat, made in the current grad mode
            if prompts is not None:
                x = add_prompt(x, prompts[offset], 0)
            return self.blocks[blocks.start + offset - self.first](x, position_ids, key_mask, lora=lora[offset] if lora else None)

        inputs, x = [], hidden.to(self.device, self.dtype)
        with torch.no_grad(), unpacked_products():  # the products the forward under autograd ran (packed.py)
            for offset in range(len(blocks)):
                inputs.append(x)
                x = run_block(x, offset)
        grad, tuned_grads = grad_output.to(self.device, self.dtype), [torch.zeros_like(t) for t in tuned]
        for offset in reversed(range(len(blocks))):
            with torch.enable_grad():
                x = inputs.pop().detach().requires_grad_()
                grad, *parts = torch.autograd.grad(run_block(x, offset), [x, *tuned], grad, allow_unused=True)
            for total, part in zip(tuned_grads, parts):
                if part is not None:
                    total += part
        return [grad, *tuned_grads]

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


@dataclass(eq=False)  # sessions are compared by identity
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
    padded: bool = False  # some stored token is padding: attention needs the key mask

    @classmethod
    def open(
        cls, span: Span, blocks: BlockRange, batch_size: int, max_length: int, tuning: TuningInputs | None = None
    ) -> "Session":
        config = span.config
        caches = [
            KVCache(batch_size, config.num_key_value_heads, max_length, config.head_dim, span.dtype, span.device)
            for _ in range(len(blocks))
        ]
        # on the CPU whatever the span's device: the event loop reads and writes it at every step, and on a GPU each
        # access would wait for the pass in flight on the compute thread (run_pieces moves the mask when padded)
        key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool)
        tuning = (tuning or TuningInputs(blocks)).to(span.device, span.dtype)
        return cls(blocks, batch_size, max_length, caches, key_mask, tuning.prompts, tuning.block_loras(config))

    def check_step(self, hidden: Tensor) -> None:
        batch, length = hidden.shape[:2]
        if batch != self.batch_size:
            raise BadRequest(f"session was opened for batch size {self.batch_size}, step has {batch}")
        if self.position + length > self.max_length:
            raise BadRequest(
                f"step of {length} tokens at position {self.position} exceeds the session's max_length {self.max_length}"
            )

    def grow(self, max_length: int) -> None:
        """Hold up to `max_length` tokens per row from now on (the client's conversation outgrew what it opened)."""
        for cache in self.caches:
            cache.grow(max_length, self.position)
        self.key_mask = lengthened(self.key_mask, max_length, self.position, dim=1)
        self.max_length = max_length

    def rewind(self, position: int) -> None:
        """Forget the tokens from `position` on (speculative decoding: drafts the client rejected); the next step
        overwrites their keys and values. BadRequest if `position` lies beyond what the session holds."""
        if not 0 <= position <= self.position:
            raise BadRequest(f"cannot rewind to position {position}: the session holds tokens [0, {self.position})")
        self.position = position
        self.padded = not bool(self.key_mask[:, :position].all())

    def step_pieces(self, hidden: Tensor, position_ids: Tensor, new_mask: Tensor, chunk_tokens: int) -> Pieces:
        """One step in pieces of about chunk_tokens tokens (one token per row at least), in order; each piece's
        keys go to the cache when it runs. Returns the step's output. BadRequest at once if the step does not fit."""
        self.check_step(hidden)
        length = hidden.shape[1]
        size = max(1, chunk_tokens // self.batch_size)
        outputs = []
        for begin in range(0, length, size):
            end = min(begin + size, length)
            stop = self.position + end - begin
            mask = new_mask[:, begin:end].cpu()
            self.key_mask[:, self.position : stop] = mask
            self.padded = self.padded or not bool(mask.all())
            key_mask = self.key_mask[:, :stop] if self.padded else None
            piece = Piece(hidden[:, begin:end], position_ids[:, begin:end], key_mask, self.blocks, self.position,
                          self.caches, self.prompts, self.lora)  # fmt: skip
            outputs.append((yield piece))
            self.position = stop
        self.steps += 1
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def step(self, span: Span, hidden: Tensor, position_ids: Tensor, new_mask: Tensor) -> Tensor:
        """One whole step, run at once with no other session alongside."""
        return run_alone(span, self.step_pieces(hidden, position_ids, new_mask, chunk_tokens=hidden.shape[0] * hidden.shape[1]))
