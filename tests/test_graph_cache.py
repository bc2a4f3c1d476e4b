"""A server keeps a training client's forward graph for its backward: same gradients as recomputing, bounded memory."""

from __future__ import annotations

import time

import torch

from meadow.models import load_block, load_config
from meadow.server.graph_cache import Graph, GraphCache
from meadow.server.span import Span
from meadow.server.tuning import TuningInputs
from meadow.wire import LoraEntry


def span_of(path) -> Span:
    config = load_config(path)
    blocks = [load_block(path, config, index, torch.float32) for index in range(config.num_hidden_layers)]
    return Span(blocks, 0, config, torch.float32, torch.device("cpu"))


def test_backward_from_the_kept_graph_equals_recomputing(checkpoints):
    span = span_of(checkpoints("llama", num_layers=3))
    blocks, hidden_size = span.range, span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, hidden_size, generator=generator)
    positions, mask = torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.bool)
    entries = (LoraEntry(block=1, module="v_proj", rank=2, scale=0.5),)
    lora = torch.randn(2 * hidden_size + 2 * (span.config.num_key_value_heads * span.config.head_dim), generator=generator)
    tuning = TuningInputs(blocks, torch.randn(3, 2, hidden_size, generator=generator), lora, entries)
    grad = torch.randn(2, 5, hidden_size, generator=generator)

    output, graph = span.run_keeping_graph(hidden, positions, mask, blocks, tuning)
    assert torch.allclose(output, span.run(hidden, positions, mask, blocks, tuning))
    assert graph.nbytes > 2 * 5 * hidden_size * 4 * 3  # at least one activation per block was counted
    kept = span.backward(hidden, positions, mask, blocks, grad, tuning, graph)
    recomputed = span.backward(hidden, positions, mask, blocks, grad, tuning)
    assert len(kept) == 3 and all(torch.equal(a, b) for a, b in zip(kept, recomputed))


def graph(nbytes: int, created: float | None = None) -> Graph:
    return Graph(torch.zeros(1), [], nbytes, time.monotonic() if created is None else created)


def test_cache_drops_the_oldest_graphs_to_stay_within_its_budget():
    cache = GraphCache(max_bytes=100)
    assert cache.put("a", graph(40)) and cache.put("b", graph(40))
    assert cache.put("c", graph(40))  # a makes room
    assert cache.pop("a") is None and cache.nbytes == 80
    assert not cache.put("huge", graph(101)) and cache.nbytes == 80  # never kept, nothing dropped for it
    assert cache.pop("b").nbytes == 40 and cache.pop("b") is None  # each graph is taken once
    assert cache.nbytes == 40


def test_cache_forgets_graphs_older_than_its_ttl():
    cache = GraphCache(max_bytes=100, ttl=10.0)
    cache.put("old", graph(10, created=time.monotonic() - 11))
    cache.put("new", graph(10))
    assert cache.pop("old") is None and cache.pop("new") is not None and cache.nbytes == 0
