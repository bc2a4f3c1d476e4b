"""The client's LM head stored column by column on a CPU, where the product with one token's hidden state runs faster.

Servers' blocks use oneDNN's packed layout instead (packed.py): faster still, for every number of rows. For this one-row
product it was barely faster on one thread (3.6 vs 3.9 ms with pauses between products, as between tokens) and, on
two, took 7.6 ms of CPU for 2.9 ms of wall time: a client shares its machine's cores with other work."""

from __future__ import annotations

import torch


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column, on a CPU (elsewhere: as it is). MKL streams this layout faster for a
    product with one row, which reads the whole matrix: one core, float32, the bench model's 32000x768 LM head takes
    3.7 ms instead of 5.8 per generated token (benchmarks/layout.py)."""
    return weight.t().contiguous().t() if weight.device.type == "cpu" and weight.dim() == 2 else weight

