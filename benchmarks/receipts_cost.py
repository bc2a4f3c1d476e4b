"""What receipts cost a client: tokens/s of greedy generation through a loopback swarm of two servers (half the blocks
each), for an anonymous client (no receipts) and clients that sign a receipt every N tokens of each server's work
(ClientConfig.receipt_every_tokens). Rounds alternate between the clients, so that the machine's load weighs on each
alike; medians are printed, with each client's ratio to the anonymous one and its receipts per generated token.

    python benchmarks/receipts_cost.py [--model PATH] [--new-tokens 128] [--rounds 5] [--every 64 16 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from meadow import AutoDistributedModelForCausalLM
from meadow.bench import default_bench_model
from meadow.client.config import ClientConfig
from meadow.local_swarm import LocalSwarm
from meadow.models import load_config
from meadow.points.ledger import Ledger
from meadow.points.receipts import Receipt, check_receipt
from meadow.swarm import generate_identity


def tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        began = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - began)


def receipt_costs(folder: Path, count: int = 200) -> tuple[float, float, float]:
    """Milliseconds to sign a receipt (client, on the generating thread), to verify one and to append one to a ledger
    (server, one fsync'd SQLite transaction each): the work behind each receipt, free of the swarm's noise."""
    owner = generate_identity(folder / "micro.key")
    unsigned = [Receipt(signer="", server="QmServer", client="QmClient", fingerprint="f", start=0, end=4, tokens=64,
                        params_per_block=7_000_000, kind="inference", timestamp=time.time(), seq=n) for n in range(count)]  # fmt: skip
    began = time.perf_counter()
    receipts = [receipt.signed_by(owner) for receipt in unsigned]
    sign_ms = (time.perf_counter() - began) * 1000 / count
    began = time.perf_counter()
    for receipt in receipts:
        check_receipt(receipt, "QmServer", "QmClient")
    verify_ms = (time.perf_counter() - began) * 1000 / count
    ledger, began = Ledger(folder / "micro.sqlite", "QmServer"), time.perf_counter()
    for receipt in receipts:
        ledger.append(receipt)
    return sign_ms, verify_ms, (time.perf_counter() - began) * 1000 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: meadow bench's ~100M random Llama)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", type=int, nargs="+", default=[64, 16, 1], help="tokens per receipt, per client")
    args = parser.parse_args()
    model_path = str(args.model or default_bench_model())
    config = load_config(model_path)
    prompt = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    half = config.num_hidden_layers // 2
    with LocalSwarm() as swarm, tempfile.TemporaryDirectory() as keys:
        swarm.start_dht()
        servers = [swarm.start_server(model_path, "--blocks", span, wait=False)
                   for span in (f"0:{half}", f"{half}:{config.num_hidden_layers}")]  # fmt: skip
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=300)
        owner = str(generate_identity(Path(keys) / "owner.key").path)
        configs = {"anonymous": ClientConfig()} | {
            f"every {n}": ClientConfig(points_identity=owner, receipt_every_tokens=n) for n in args.every
        }
        clients = {
            name: AutoDistributedModelForCausalLM.from_pretrained(model_path, swarm.initial_peers, client_config=c)
            for name, c in configs.items()
        }
        results: dict[str, list[float]] = {name: [] for name in clients}
        for model in clients.values():
            tokens_per_s(model, prompt, 8)  # warm-up: routes, pings, first connections
        for _ in range(args.rounds):
            for name, model in clients.items():
                results[name].append(tokens_per_s(model, prompt, args.new_tokens))
        print(f"\n{model_path}: {config.num_hidden_layers} blocks of hidden {config.hidden_size} on two servers; "
              f"{args.new_tokens} new tokens, medians of {args.rounds} rounds")  # fmt: skip
        base = statistics.median(results["anonymous"])
        print(f"{'client':>12} {'tokens/s':>10} {'ratio':>7} {'receipts/token':>15} {'refused':>8}")
        for name, model in clients.items():
            value, payer = statistics.median(results[name]), model.sequence.payer
            if payer is not None:
                payer.wait()
            receipts = 0 if payer is None else payer.seq - payer.first_seq
            generated = args.rounds * args.new_tokens + 8  # and the warm-up
            refused = 0 if payer is None else len(payer.refused)
            print(f"{name:>12} {value:10.2f} {value / base:7.3f} {receipts / generated:15.3f} {refused:>8}")
        for model in clients.values():
            model.close()
        sign_ms, verify_ms, append_ms = receipt_costs(Path(keys))
        print(f"\nper receipt: sign {sign_ms:.2f} ms (client), verify {verify_ms:.2f} ms + append {append_ms:.2f} ms "
              f"(server); at one receipt per 64 tokens per server: {2 * sign_ms / 64:.3f} ms of client time per token")


if __name__ == "__main__":
    main()
