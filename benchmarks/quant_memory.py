"""Server memory and speed per quant, on the 100M bench model (what `meadow bench` builds: 8 blocks of hidden 768).

    python benchmarks/quant_memory.py [--servers 2] [--new-tokens 32] [--quants none,int8,nf4]

For each quant, `meadow.bench.bench` starts a loopback swarm whose servers hold their blocks' linear layers in that
quant, generates (batch 1, greedy) through it, then runs the same quantized blocks in-process (transformers with the
blocks quantized by the function `meadow serve --quant` uses). Memory is read from /proc/PID/status of each server
process: VmRSS (resident) and VmHWM (peak resident) right after the generations, and VmHWM at the end (after an 8x128
prefill and a training step too). The load average is printed: other programs on the machine slow tokens/s, not memory.
"""

from __future__ import annotations

import argparse
import os

from meadow.bench import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quants", default="none,int8,nf4")
    args = parser.parse_args()
    rows, loads = [], [os.getloadavg()[0]]
    for quant in args.quants.split(","):
        figures = bench(None, args.servers, args.new_tokens, "float32", "cpu", quant)
        rows.append((quant, figures))
        loads.append(os.getloadavg()[0])
    blocks, bounds = rows[0][1]["blocks"], rows[0][1]["bounds"]
    spans = ", ".join(f"{a}:{b}" for a, b in zip(bounds, bounds[1:]))
    print(f"\n100M bench model ({blocks} blocks of hidden 768), float32 on cpu, {args.servers} servers ({spans}), "
          f"{args.new_tokens} new tokens x 3; {os.cpu_count()} cores, load average "
          f"{', '.join(f'{load:.1f}' for load in loads)} (before, then after each quant)")  # fmt: skip
    print("| quant | server RSS after generation, MiB | server peak RSS after generation, MiB | server peak RSS at "
          "the end, MiB | tokens/s swarm | tokens/s local | swarm/local |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for quant, f in rows:
        swarm, local = f["remote"]["tokens_per_s"], f["local"]["tokens_per_s"]
        mib = lambda values: " / ".join(f"{value:.0f}" for value in values)  # noqa: E731
        print(f"| {quant} | {mib(f['generation_rss'])} | {mib(f['generation_peaks'])} | {mib(f['server_peaks'])} "
              f"| {swarm:.1f} | {local:.1f} | {swarm / local:.2f}x |")  # fmt: skip
    print("(one value per server, in span order)")


if __name__ == "__main__":
    main()
