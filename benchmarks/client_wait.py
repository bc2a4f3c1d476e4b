"""What a client's OpenMP threads cost while it waits for the swarm: spinning (OpenMP's default) or waiting passively
(what `meadow chat`, `generate`, `api` and `demo` set, see meadow/__main__.py).

    python benchmarks/client_wait.py [MODEL] [--servers 2] [--new-tokens 64] [--rounds 3]

A local swarm (its servers wait passively, as LocalSwarm's processes do) and one client process at a time, beside
them on the same machine, started with each policy in turn: its greedy tokens/s and the CPU time of its own process
(all threads; not its DHT process or p2pd) per token. The rounds alternate the policies; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from meadow.bench import default_bench_model, start_spans
from meadow.local_swarm import LocalSwarm, split_evenly
from meadow.models import load_config

POLICIES = {"spin (OpenMP's default)": None, "passive": "PASSIVE"}


def client(model: str, initial_peers: list[str], new_tokens: int) -> None:
    """Runs in the client process: prints {"tokens_per_s", "cpu_ms_per_token"} of one timed greedy generation."""
    import time

    import torch

    from meadow.client.model import AutoDistributedModelForCausalLM

    with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers) as distributed:
        distributed.generation_config.eos_token_id = None  # exactly new_tokens tokens
        prompt = torch.randint(0, distributed.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            distributed.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up: routes, pings
            wall, cpu = time.perf_counter(), time.process_time()
            distributed.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"tokens_per_s": new_tokens / wall, "cpu_ms_per_token": cpu * 1000 / new_tokens}))


def run_client(model: str, initial_peers: list[str], new_tokens: int, policy: str | None) -> dict[str, float]:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env.update({"OMP_WAIT_POLICY": policy} if policy else {})
    argv = [sys.executable, __file__, "--client", json.dumps([model, initial_peers, new_tokens])]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", help=argparse.SUPPRESS)  # this file, run as the client process
    args = parser.parse_args()
    if args.client:
        return client(*json.loads(args.client))
    model = str(args.model or default_bench_model())
    spans = split_evenly(load_config(model).num_hidden_layers, args.servers)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in POLICIES}
    with LocalSwarm() as swarm:
        swarm.start_dht()
        start_spans(swarm, model, spans)
        for _ in range(args.rounds):
            for name, policy in POLICIES.items():
                runs[name].append(run_client(model, swarm.initial_peers, args.new_tokens, policy))
    print(f"\nmodel {model}, servers {', '.join(spans)}, one client beside them, {args.new_tokens} greedy tokens, "
          f"median of {args.rounds} rounds, {os.cpu_count()} cores")
    print("| client's OpenMP threads | tokens/s | client CPU ms/token |\n|---|---|---|")
    for name, results in runs.items():
        speed = statistics.median(r["tokens_per_s"] for r in results)
        cpu = statistics.median(r["cpu_ms_per_token"] for r in results)
        print(f"| {name} | {speed:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
