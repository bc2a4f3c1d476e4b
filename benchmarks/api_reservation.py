"""Many chat users through `meadow api` on a server whose KV cache is short, with each request reserving its whole
`max_tokens` up front (`--reserve-tokens 0`, the API's default until it was measured here) against reserving a part
and growing as the reply is written (`--reserve-tokens N`, 128 by default now). One server of the default model
(every block, `--cache-tokens`), one API at a time over it; each user asks its own question once, greedy, with the
chat default of 512 max_tokens, all at once. Prints,
per setting: the seconds until every reply is done, the mean and worst seconds per request, the replies' tokens,
and how many sessions were rebuilt (a growth refused for lack of room: the reply waits and is replayed). Same replies
both ways, or it says so.

    PYTHONPATH=. python benchmarks/api_reservation.py [--users 8] [--cache-tokens 2400] [--reserve 128] [--rounds 1]
        [--reserve-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from meadow.local_swarm import LocalSwarm, Process
from meadow.models import default_model_path, load_config

QUESTIONS = ["Name three flowers.", "What is a meadow?", "Why do bees make honey?", "How do rivers form?",
             "What is the moon made of?", "Give me a tip for a garden.", "What do owls eat?", "Why is the sky blue?",
             "What is rain?", "How tall do oak trees grow?", "What is a fox?", "Why do leaves fall?"]  # fmt: skip


def run(swarm: LocalSwarm, model: str, users: int, reserve: int) -> dict:
    api = Process(["api", model, "--initial-peers", *swarm.initial_peers, "--port", "0", "--keep-sessions", "0",
                   "--reserve-tokens", str(reserve)], "api")  # fmt: skip
    try:
        url = api.wait_for(lambda line: "API ready: http://" in line, timeout=300).split()[2]
        model_id = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]

        def ask(user: int) -> tuple[float, str, int]:
            body = {"model": model_id, "temperature": 0,
                    "messages": [{"role": "user", "content": QUESTIONS[user % len(QUESTIONS)]}]}  # fmt: skip
            request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            began = time.perf_counter()
            reply = json.load(urllib.request.urlopen(request, timeout=900))
            text, tokens = reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]
            return time.perf_counter() - began, text, tokens

        began = time.perf_counter()
        with ThreadPoolExecutor(users) as pool:
            results = list(pool.map(ask, range(users)))
        seconds = [result[0] for result in results]
        return {"all": time.perf_counter() - began, "mean": statistics.mean(seconds), "worst": max(seconds),
                "texts": [result[1] for result in results], "tokens": sum(result[2] for result in results),
                "rebuilt": sum("rebuilt the cache" in line for line in api.lines)}  # fmt: skip
    finally:
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--cache-tokens", type=int, default=2400, help="the server's KV cache, in tokens")
    parser.add_argument("--reserve", type=int, default=128, help="--reserve-tokens of the API compared with 0")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, one after the other (and means)")
    parser.add_argument("--reserve-only", action="store_true",
                        help="run --reserve's setting alone: to compare two versions of the server")  # fmt: skip
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    blocks = f"0:{load_config(model).num_hidden_layers}"
    settings = [args.reserve] if args.reserve_only else [0, args.reserve]
    with LocalSwarm() as swarm:
        swarm.start_dht()
        swarm.start_server(model, "--blocks", blocks, "--cache-tokens", str(args.cache_tokens), timeout=600)
        runs = {reserve: [run(swarm, model, args.users, reserve) for _ in range(args.rounds)] for reserve in settings}
    print(f"\nmodel {model}, one server ({blocks}, --cache-tokens {args.cache_tokens}), {args.users} users at once "
          f"through `meadow api`, each one greedy chat reply (max_tokens 512); {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print("| --reserve-tokens | all done s | mean s | worst s | reply tokens | sessions rebuilt |")
    print("|---|---|---|---|---|---|")
    means = {}
    for reserve, rows in runs.items():
        shown = [(str(reserve), row) for row in rows]
        means[reserve] = {key: statistics.mean(row[key] for row in rows) for key in ("all", "mean", "worst", "rebuilt")}
        if len(rows) > 1:
            shown.append((f"{reserve}, mean of {len(rows)}", {**means[reserve], "tokens": rows[0]["tokens"]}))
        for label, row in shown:
            print(f"| {label} | {row['all']:.1f} | {row['mean']:.1f} | {row['worst']:.1f} | {row['tokens']} | "
                  f"{row['rebuilt']:.3g} |")  # fmt: skip
    if not args.reserve_only:
        ratios = {key: means[args.reserve][key] / means[0][key] for key in ("all", "mean", "worst")}
        print(f"ratios {args.reserve} / 0: all done {ratios['all']:.2f}, mean {ratios['mean']:.2f}, "
              f"worst {ratios['worst']:.2f}")  # fmt: skip
    texts = [row["texts"] for rows in runs.values() for row in rows]
    print("same replies in every run:", "yes" if all(text == texts[0] for text in texts) else "NO")


if __name__ == "__main__":
    main()
