"""Float weight layouts on a CPU: ms per product on one core, for the shapes a decoding step uses.

    python -m benchmarks.layout [--threads 1]

Row-major (nn.Linear's own, through MKL), column-major (MKL too: the client's LM head) and oneDNN's packed layout
(meadow.models.packed: servers' blocks). The bench model's LM head
(32000x768, one row: a client's work per token) and its block projections (768x768, 2048x768, 768x2048) for 1 to 16
rows (the sessions of a server's decoding pass) and 128 (a prefill chunk). Each product reads the whole weight, as a
pass does; 40 different weights per call keep them out of the caches, like the weights of a span. The layouts give
the same numbers up to float rounding (the largest difference from row-major is printed).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn

from meadow.models.packed import PackedLinear

SHAPES = {"LM head": (32000, 768, 3), "q/o 768x768": (768, 768, 40), "gate/up 2048x768": (2048, 768, 40),
          "down 768x2048": (768, 2048, 40)}  # fmt: skip
ROWS = (1, 2, 3, 4, 8, 16, 128)


def column_major(linear: nn.Linear) -> nn.Linear:
    """The same layer with its weight stored column by column."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta").requires_grad_(False)
    copy.weight = nn.Parameter(linear.weight.t().contiguous().t(), requires_grad=False)
    return copy


LAYOUTS: dict[str, Callable[[nn.Linear], nn.Module]] = {"row-major": lambda linear: linear, "column-major": column_major,
                                                         "packed": PackedLinear}  # fmt: skip


@torch.inference_mode()
def ms_per_product(x: torch.Tensor, layers: list[nn.Module], seconds: float = 0.3) -> float:
    [layer(x) for layer in layers]  # warm-up
    calls, began = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - began < seconds:
        [layer(x) for layer in layers]
        calls += 1
    return (time.perf_counter() - began) / (calls * len(layers)) * 1e3


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    others = [name for name in LAYOUTS if name != "row-major"]
    print(f"float32, {args.threads} thread(s); ms per product: row-major, then " + " and ".join(others) +
          " with their ratio to row-major")  # fmt: skip
    print("| weight | rows | row-major | " + " | ".join(others) + " | largest difference |")
    print("|---|---|---|" + "---|" * (len(others) + 1))
    for name, (out_features, in_features, count) in SHAPES.items():
        plain = [nn.Linear(in_features, out_features, bias=False).requires_grad_(False) for _ in range(count)]
        layouts = {layout: [make(linear) for linear in plain] for layout, make in LAYOUTS.items()}
        for rows in ROWS[:1] if name == "LM head" else ROWS:
            x = torch.randn(rows, in_features)
            times = {layout: ms_per_product(x, layers) for layout, layers in layouts.items()}
            base = times["row-major"]
            difference = max((layers[0](x) - plain[0](x)).abs().max().item() for layers in layouts.values())
            cells = [f"{times[layout]:.3f} ({times[layout] / base:.2f})" for layout in others]
            print(f"| {name} | {rows} | {base:.3f} | " + " | ".join(cells) + f" | {difference:.1e} |")


if __name__ == "__main__":
    main()
