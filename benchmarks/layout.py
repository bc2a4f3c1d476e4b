"""Row-major against column-major float weights: ms per product on one core, for the shapes a decoding step uses.

    python -m benchmarks.layout [--threads 1]

The bench model's LM head (32000x768, one row: a client's work per token) and its block projections (768x768,
2048x768, 768x2048) for 1 to 16 rows (the sessions of a server's decoding pass) and 128 (a prefill chunk). Each
product reads the whole weight, as a pass does; 40 different weights per call keep them out of the caches, like the
weights of a span. Both layouts give the same numbers up to float rounding (the largest difference is printed).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from meadow.models.layout import column_major

SHAPES = {"LM head": (32000, 768, 3), "q/o 768x768": (768, 768, 40), "gate/up 2048x768": (2048, 768, 40),
          "down 768x2048": (768, 2048, 40)}  # fmt: skip
ROWS = (1, 2, 3, 4, 8, 16, 128)


def ms_per_product(x: torch.Tensor, weights: list[torch.Tensor], seconds: float = 0.3) -> float:
    [F.linear(x, w) for w in weights]  # warm-up
    calls, began = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - began < seconds:
        [F.linear(x, w) for w in weights]
        calls += 1
    return (time.perf_counter() - began) / (calls * len(weights)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"float32, {args.threads} thread(s); ms per product, row-major / column-major (ratio)")
    print("| weight | " + " | ".join(f"{rows} rows" for rows in ROWS) + " | largest difference |")
    print("|---|" + "---|" * (len(ROWS) + 1))
    for name, (out_features, in_features, count) in SHAPES.items():
        rows_major = [torch.randn(out_features, in_features) for _ in range(count)]
        cols_major = [column_major(w) for w in rows_major]
        cells, difference = [], 0.0
        for rows in ROWS:
            if name == "LM head" and rows > 1:
                cells.append("")
                continue
            x = torch.randn(rows, in_features)
            before, after = ms_per_product(x, rows_major), ms_per_product(x, cols_major)
            difference = max(difference, (F.linear(x, rows_major[0]) - F.linear(x, cols_major[0])).abs().max().item())
            cells.append(f"{before:.3f} / {after:.3f} ({after / before:.2f})")
        print(f"| {name} | " + " | ".join(cells) + f" | {difference:.1e} |")


if __name__ == "__main__":
    main()
