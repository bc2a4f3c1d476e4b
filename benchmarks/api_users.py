"""Many users through one `meadow api`, as a shared chat service sees them: N requests at once, each its own greedy
completion of exactly --tokens tokens (the end-of-sequence token banned with logit_bias), against a DHT node and servers
on 127.0.0.1. Prints, per N, the aggregate and per-user tokens/s, the efficiency (aggregate / N x one user alone, as
`meadow bench --clients` reports it for client processes) and the CPU time per token of the API's process tree (its DHT
child and p2pd included) and of the servers'.

    python benchmarks/api_users.py [--model PATH] [--servers 2] [--users 1,4,8] [--tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from meadow.bench import cpu_seconds, default_bench_model
from meadow.local_swarm import LocalSwarm, Process, split_evenly
from meadow.models import load_config, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the 100M bench model of `meadow bench`)")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--users", default="1,4,8", help="numbers of users at once, comma-separated")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs per number of users (the median is printed)")
    args = parser.parse_args()
    model = args.model or str(default_bench_model())
    spans = split_evenly(load_config(model).num_hidden_layers, args.servers)
    eos = load_tokenizer(model).eos_token_id
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(model, "--blocks", span, wait=False) for span in spans]
        api = Process(["api", model, "--initial-peers", *swarm.initial_peers, "--port", "0"], "api")
        swarm.extra.append(api)
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=300)
        url = api.wait_for(lambda line: "API ready: http://" in line, timeout=300).split()[2]
        model_id = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]

        def complete(user: int) -> int:
            body = {"model": model_id, "prompt": f"User {user} writes:", "max_tokens": args.tokens, "temperature": 0,
                    "logit_bias": {} if eos is None else {str(eos): -100}}  # fmt: skip
            request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            return json.load(urllib.request.urlopen(request, timeout=600))["usage"]["completion_tokens"]

        complete(0)  # warm-up: routes, pings
        rows, alone = [], None
        for users in [int(n) for n in args.users.split(",")]:
            runs = []
            for _ in range(args.rounds):
                server_pids = [server.popen.pid for server in servers]
                cpu = (cpu_seconds([api.popen.pid]), cpu_seconds(server_pids))
                began = time.perf_counter()
                with ThreadPoolExecutor(users) as pool:
                    tokens = sum(pool.map(complete, range(users)))
                seconds = time.perf_counter() - began
                used = (cpu_seconds([api.popen.pid]) - cpu[0], cpu_seconds(server_pids) - cpu[1])
                runs.append((tokens / seconds, used[0] / tokens * 1000, used[1] / tokens * 1000))
            aggregate = statistics.median(run[0] for run in runs)
            alone = alone or aggregate
            api_ms, servers_ms = (statistics.median(run[i] for run in runs) for i in (1, 2))
            rows.append((users, aggregate, aggregate / users, aggregate / (users * alone), api_ms, servers_ms))

    print(f"\nmodel {model}, {args.servers} servers ({', '.join(spans)}), `meadow api` in front; each user a greedy "
          f"completion of {args.tokens} tokens, all at once; median of {args.rounds} runs; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print("| users | aggregate tokens/s | per user | efficiency | CPU ms/token: API | servers |")
    print("|---|---|---|---|---|---|")
    for users, aggregate, each, efficiency, api_ms, servers_ms in rows:
        print(f"| {users} | {aggregate:.1f} | {each:.1f} | {efficiency:.2f} | {api_ms:.1f} | {servers_ms:.1f} |")


if __name__ == "__main__":
    main()
