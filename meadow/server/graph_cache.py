"""Autograd graphs of recent forward passes, kept so that their backward need not recompute the forward.

A client that trains names its forward (`graph_id`); the server keeps that forward's graph (the activations it saved)
under (client, graph_id) and its rpc_backward uses it once. The cache holds at most `max_bytes` of activations and
drops the oldest graph first, and any graph older than `ttl` seconds: a graph that is gone only means the backward
recomputes the forward, as it would without the cache, so no client can hold a server's memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Hashable, Iterator

import torch
from torch import Tensor


@dataclass
class Graph:
    """A forward's output (with its autograd graph) and the leaves it is differentiated w.r.t., in request order."""

    output: Tensor
    leaves: list[Tensor]
    nbytes: int
    created: float


class GraphCache:
    """Graphs by key, oldest first, within a byte budget and an age limit; each graph is taken once."""

    def __init__(self, max_bytes: int, ttl: float = 60.0):
        self.max_bytes, self.ttl = max_bytes, ttl
        self.graphs: OrderedDict[Hashable, Graph] = OrderedDict()
        self.nbytes = 0

    def put(self, key: Hashable, graph: Graph) -> bool:
        """Keep `graph` unless it alone exceeds the budget; older graphs make room."""
        self.pop(key)
        self._expire()
        if graph.nbytes > self.max_bytes:
            return False
        while self.graphs and self.nbytes + graph.nbytes > self.max_bytes:
            self._drop(next(iter(self.graphs)))
        self.graphs[key] = graph
        self.nbytes += graph.nbytes
        return True

    def pop(self, key: Hashable) -> Graph | None:
        graph = self.graphs.pop(key, None)
        if graph is not None:
            self.nbytes -= graph.nbytes
        return graph

    def clear(self) -> None:
        self.graphs.clear()
        self.nbytes = 0

    def _expire(self) -> None:
        now = time.monotonic()
        while self.graphs and now - next(iter(self.graphs.values())).created > self.ttl:
            self._drop(next(iter(self.graphs)))

    def _drop(self, key: Hashable) -> None:
        self.nbytes -= self.graphs.pop(key).nbytes


@contextmanager
def counting_saved_activations() -> Iterator[list[int]]:
    """Inside, autograd's saved tensors that require grad (activations, not frozen weights) are counted:
    the yielded list's one item is their total bytes (each storage once)."""
    total, seen = [0], set()

    def pack(tensor: Tensor) -> Tensor:
        if tensor.requires_grad:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total
