"""What spot-checks cost: tokens/s of greedy generation, and seconds of a forward pass and a training step, through a
loopback swarm of two servers that both hold every block (so a check always finds a second server), for clients that
check at several rates (ClientConfig.verify). Rounds alternate between the clients, so that the machine's load
weighs on each alike; medians are printed.

    python benchmarks/verify_cost.py [--model PATH] [--new-tokens 128] [--rounds 5] [--rates 0 0.02 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from meadow import AutoDistributedModelForCausalLM
from meadow.bench import PREFILL_BATCH, PREFILL_LENGTH, default_bench_model
from meadow.client.config import ClientConfig
from meadow.local_swarm import LocalSwarm
from meadow.models import load_config


def one_round(model, prompt: torch.Tensor, batch: torch.Tensor, new_tokens: int) -> dict[str, float]:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        began = time.perf_counter()
        model.generate(prompt, **kwargs)
        tokens_per_s = new_tokens / (time.perf_counter() - began)
        began = time.perf_counter()
        model(batch)
        forward_s = time.perf_counter() - began
    began = time.perf_counter()
    embeds = model.get_input_embeddings()(batch).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=batch).loss.backward()
    return {"tokens/s": tokens_per_s, "forward s": forward_s, "train step s": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: meadow bench's ~100M random Llama)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.02, 1.0])
    args = parser.parse_args()
    model_path = str(args.model or default_bench_model())
    config = load_config(model_path)
    prompt = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    batch = torch.randint(0, config.vocab_size, (PREFILL_BATCH, PREFILL_LENGTH), generator=torch.Generator().manual_seed(1))
    span = f"0:{config.num_hidden_layers}"
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(model_path, "--blocks", span, wait=False) for _ in range(2)]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=300)
        clients = {
            rate: AutoDistributedModelForCausalLM.from_pretrained(
                model_path, swarm.initial_peers, client_config=ClientConfig(verify=rate)
            )
            for rate in args.rates
        }
        results: dict[float, list[dict[str, float]]] = {rate: [] for rate in args.rates}
        for rate, model in clients.items():
            one_round(model, prompt, batch, 8)  # warm-up: routes, pings, first connections
            model.requires_grad_(False)
        for _ in range(args.rounds):
            for rate, model in clients.items():
                results[rate].append(one_round(model, prompt, batch, args.new_tokens))
        print(f"\n{model_path}: {config.num_hidden_layers} blocks of hidden {config.hidden_size}, two servers holding "
              f"all of them; {args.new_tokens} new tokens, forward/train on {PREFILL_BATCH}x{PREFILL_LENGTH} tokens; "
              f"medians of {args.rounds} rounds")  # fmt: skip
        base = {key: statistics.median(r[key] for r in results[args.rates[0]]) for key in results[args.rates[0]][0]}
        print(f"{'verify':>8} " + " ".join(f"{key:>22}" for key in base) + f" {'checks (caught)':>16}")
        for rate, model in clients.items():
            cells = []
            for key, reference in base.items():
                value = statistics.median(r[key] for r in results[rate])
                cells.append(f"{value:10.3f} ({value / reference:5.2f}x)".rjust(22))
            checker = model.sequence.checker
            print(f"{rate:>8} " + " ".join(cells) + f" {checker.checked:>9} ({checker.caught})")
            model.close()


if __name__ == "__main__":
    main()
