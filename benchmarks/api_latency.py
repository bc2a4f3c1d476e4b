"""Time to first token through `meadow api`, as a user of OpenAI's Python package sees it, and every process's peak
memory: a DHT node and servers on 127.0.0.1 (the default model split evenly), `meadow api` in front of them, and
streamed chat completions one after another (greedy, a short question). Medians over the rounds are printed, with
the decoding speed after the first token and the peak resident memory (VmHWM) of the API, each server and the DHT
node (each with its hivemind DHT and p2pd children).

    python benchmarks/api_latency.py [--model PATH] [--servers 3] [--rounds 5] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from openai import OpenAI

from meadow import DEFAULT_MODEL
from meadow.bench import peak_rss_mib
from meadow.local_swarm import LocalSwarm, Process, split_evenly
from meadow.models import load_config

QUESTION = "Name three flowers that grow in a meadow."


def children(pid: int) -> list[int]:
    """A process and all its descendants (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents.setdefault(int(text[text.rindex(")") + 2 :].split()[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        found.append(stack.pop())
        stack.extend(parents.get(found[-1], []))
    return found


def tree_peak_mib(process: Process) -> tuple[float, float]:
    """Peak memory of the process itself, and the sum of the peaks of its whole tree (DHT child, p2pd)."""
    peaks = [peak_rss_mib(pid) for pid in children(process.popen.pid)]
    return peaks[0], sum(peak for peak in peaks if peak == peak)  # nan: exited meanwhile


def one_request(client: OpenAI, model: str, max_tokens: int) -> tuple[float, float, int]:
    """Seconds to the first content chunk, seconds from it to the last, and the number of content chunks."""
    began = time.perf_counter()
    first = last = None
    chunks = 0
    stream = client.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=max_tokens, messages=[{"role": "user", "content": QUESTION}]
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            chunks += 1
    if first is None:
        raise RuntimeError("the API streamed no content")
    return first - began, last - first, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint (default: the default model)")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    spans = split_evenly(load_config(args.model).num_hidden_layers, args.servers)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(args.model, "--blocks", span, wait=False) for span in spans]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=300)
        api = Process(["api", args.model, "--initial-peers", *swarm.initial_peers, "--port", "0"], "api")
        swarm.extra.append(api)
        url = api.wait_for(lambda line: "API ready: http://" in line, timeout=300).split("http://", 1)[1].split()[0]
        client = OpenAI(base_url=f"http://{url}/v1", api_key="unused")
        model_id = client.models.list().data[0].id
        one_request(client, model_id, 4)  # warm-up: routes, pings, the tokenizer's first call
        rounds = [one_request(client, model_id, args.max_tokens) for _ in range(args.rounds)]
        first = [round_[0] for round_ in rounds]
        speed = [(chunks - 1) / rest for _, rest, chunks in rounds if chunks > 1 and rest > 0]
        peaks = {"api": tree_peak_mib(api), "dht node": tree_peak_mib(swarm.dht)}
        peaks.update({f"server {span}": tree_peak_mib(server) for span, server in zip(spans, servers)})

    print(f"\nmodel {args.model}, {args.servers} servers ({', '.join(spans)}), streamed greedy chat completions of up to "
          f"{args.max_tokens} tokens, {args.rounds} rounds; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"time to first token: median {statistics.median(first) * 1000:.0f} ms "
          f"(min {min(first) * 1000:.0f}, max {max(first) * 1000:.0f})")  # fmt: skip
    if speed:
        print(f"after it: median {statistics.median(speed):.1f} chunks/s")
    print("| process | peak memory (MiB) | sum of its tree's peaks: DHT child, p2pd (MiB; forked pages count twice) |")
    print("|---|---|---|")
    for name, (own, tree) in peaks.items():
        print(f"| {name} | {own:.0f} | {tree:.0f} |")


if __name__ == "__main__":
    main()
