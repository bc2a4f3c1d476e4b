"""Server memory and speed per quant, on the 100M bench model (8 blocks of hidden 768) or a bigger one (--big, --model).

    python benchmarks/quant_memory.py [--servers 2] [--new-tokens 32] [--quants none,int8,nf4] [--model PATH]
    python benchmarks/quant_memory.py --big    # 8 blocks of hidden 2048 (made once under MEADOW_HOME): blocks dominate

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
    parser.add_argument("--model", help="a checkpoint (default: the 100M bench model)")
    parser.add_argument("--big", action="store_true", help="8 blocks of hidden 2048, where the blocks' weights dominate")
    args = parser.parse_args()
    model = big_model() if args.big else args.model
    rows, loads = [], [os.getloadavg()[0]]
    for quant in args.quants.split(","):
        figures = bench(model, args.servers, args.new_tokens, "float32", "cpu", quant)
        rows.append((quant, figures))
        loads.append(os.getloadavg()[0])
    blocks, spans = rows[0][1]["blocks"], ", ".join(rows[0][1]["spans"])
    name = model or "100M bench model"
    print(f"\n{name} ({blocks} blocks), float32 on cpu, {args.servers} servers ({spans}), "
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


def big_model() -> str:
    """A random Llama of 8 blocks of hidden 2048 (1.6 GB in float32), where the blocks' weights dominate a server's
    memory; made once."""
    from meadow.home import meadow_home
    from meadow.models.tiny import make_tiny_checkpoint

    path = meadow_home() / "bench-llama-8x2048"
    if not (path / "config.json").is_file():
        make_tiny_checkpoint(path, "llama", num_layers=8, hidden_size=2048, intermediate_size=5632,
                             num_heads=16, num_kv_heads=16)  # fmt: skip
    return str(path)


if __name__ == "__main__":
    main()
