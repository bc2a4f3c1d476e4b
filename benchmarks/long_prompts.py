"""Several users send long prompts to one server at once: does each get its answer, and how long does it take next to
prefilling the prompts locally one after another?

    python -m benchmarks.long_prompts [MODEL] [--clients 2] [--tokens 6000]

One server holds every block (on 127.0.0.1); `--clients` clients, each its own model in this process, send a prompt
of `--tokens` random tokens at once and generate 2 tokens. The server interleaves their prefills, so each takes about
`--clients` times as long as one alone. It prints each client's outcome and seconds, and the ratio of those seconds to
transformers prefilling all the prompts one after another in this process. A client that takes its busy server for a
dead one (a timeout) bans it and sends its prompt again: its seconds grow, or it fails.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.at_once import at_once
from meadow import AutoDistributedModelForCausalLM
from meadow.local_swarm import LocalSwarm
from meadow.models import default_model_path, load_config, load_reference_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=6000)
    args = parser.parse_args()
    model = str(args.model or default_model_path())
    num_blocks = load_config(model).num_hidden_layers
    prompts = [torch.randint(100, 30000, (1, args.tokens), generator=torch.Generator().manual_seed(i))
               for i in range(args.clients)]  # fmt: skip
    reference = load_reference_model(model)
    began = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            reference.model(prompt)
    local = time.perf_counter() - began
    del reference
    with LocalSwarm() as swarm:
        swarm.start_dht()
        swarm.start_server(model, "--blocks", f"0:{num_blocks}", "--max-length", str(args.tokens + 2))
        clients = [AutoDistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers) for _ in prompts]

        def send(index: int) -> str:
            clients[index].generate(prompts[index], max_new_tokens=2, do_sample=False)
            return "answered"

        outcomes = at_once(send, len(clients), local, "the local prefills")
        for client in clients:
            client.sequence.close()
    print(f"{args.clients} prompts of {args.tokens} tokens, one server of blocks 0:{num_blocks}; "
          f"transformers prefills them one after another in {local:.1f} s")  # fmt: skip
    for index, outcome in enumerate(outcomes):
        print(f"  client {index}: {outcome}")


if __name__ == "__main__":
    main()
