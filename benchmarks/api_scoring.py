"""What scoring a prompt through `meadow api` costs: lm-eval-harness's loglikelihood request (token ids, echo,
logprobs 1, max_tokens 1) against a plain one-token completion of the same prompt, both against the same work done
locally by transformers in this process (a forward pass over the prompt, with every position's logprobs for echo).
The default model on two servers on 127.0.0.1; random prompts; the first round warms up, means over the others.

    python benchmarks/api_scoring.py [--lengths 300 1500] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import urllib.request

import torch

from meadow import DEFAULT_MODEL
from meadow.local_swarm import LocalSwarm, Process
from meadow.models import load_reference_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[300, 1500], help="prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    model, rng = str(DEFAULT_MODEL), random.Random(0)
    local = load_reference_model(model)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        for span in ("0:15", "15:30"):
            swarm.start_server(model, "--blocks", span, wait=False)
        api = Process(["api", model, "--initial-peers", *swarm.initial_peers, "--port", "0"], "api")
        swarm.extra.append(api)
        for server in swarm.servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        url = api.wait_for(lambda line: line.startswith("API ready"), timeout=180).split()[2]
        name = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]

        def ask(body: dict) -> float:
            data = json.dumps({"model": name, **body}).encode()
            request = urllib.request.Request(url + "/v1/completions", data, {"Content-Type": "application/json"})
            began = time.perf_counter()
            json.load(urllib.request.urlopen(request, timeout=600))
            return time.perf_counter() - began

        def locally(prompt: list[int], echo: bool) -> float:
            began = time.perf_counter()
            with torch.no_grad():
                logits = local(torch.tensor([prompt])).logits[0]
                rows = torch.log_softmax(logits if echo else logits[-1:], dim=-1)
                rows.topk(1)
            return time.perf_counter() - began

        for length in args.lengths:
            times: dict[str, list[float]] = {"plain": [], "echo": [], "local plain": [], "local echo": []}
            for round in range(args.rounds):
                prompt = [rng.randrange(100, 40000) for _ in range(length)]
                measured = {
                    "plain": ask({"prompt": [prompt], "max_tokens": 1, "temperature": 0}),
                    "echo": ask({"prompt": [prompt], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}),
                    "local plain": locally(prompt, echo=False),
                    "local echo": locally(prompt, echo=True),
                }
                for kind, seconds in measured.items():
                    if round:  # the first round warms up
                        times[kind].append(seconds)
            mean = {kind: statistics.mean(values) for kind, values in times.items()}
            plain, echo = mean["plain"], mean["echo"]
            print(
                f"{length}-token prompt: plain {plain:.3f} s ({plain / mean['local plain']:.2f}x local), "
                f"echo+logprobs {echo:.3f} s ({echo / mean['local echo']:.2f}x local), echo / plain {echo / plain:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
