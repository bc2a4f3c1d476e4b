"""More users than a server has room for: does each wait its turn and get its answer?

    python -m benchmarks.full_server [MODEL] [--clients 6] [--room 2] [--new-tokens 300] [--stagger SECONDS]
                                     [--servers 1]

One server holds every block (on 127.0.0.1), or `--servers` servers hold a part each (a chain through all of them),
each with KV cache for `--room` sessions; `--clients` clients, each its own
model in this process, generate `--new-tokens` greedy tokens at once from a 20-token prompt. Those that find the
server full wait for room. It prints each client's outcome, whether its tokens are transformers' greedy tokens, and
its seconds as a ratio to transformers generating the same tokens alone in this process. With `--stagger`, each
client starts that many seconds after the one before, and the order in which they are served shows: waiting clients
should get room in the order they came.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.at_once import at_once
from meadow import AutoDistributedModelForCausalLM
from meadow.local_swarm import LocalSwarm
from meadow.models import default_model_path, load_config, load_reference_model

PROMPT_TOKENS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--room", type=int, default=2, help="sessions the server's KV cache holds at once")
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--servers", type=int, default=1, help="servers holding a part of the blocks each")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between one client's start and the next")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")  # the clients' "waiting" lines
    model = str(args.model or default_model_path())
    num_blocks = load_config(model).num_hidden_layers
    prompts = [torch.randint(100, 30000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(i))
               for i in range(args.clients)]  # fmt: skip
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    reference = load_reference_model(model)
    expected = [reference.generate(prompt, attention_mask=torch.ones_like(prompt), **options) for prompt in prompts]
    began = time.perf_counter()
    reference.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), **options)
    local = time.perf_counter() - began
    del reference
    session_tokens = PROMPT_TOKENS + args.new_tokens
    # a peer may hold 3/4 of a server's cache: room for `room` sessions, and not one more
    cache = max(args.room * session_tokens + session_tokens // 2, (4 * session_tokens + 2) // 3)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        bounds = [num_blocks * i // args.servers for i in range(args.servers + 1)]
        for start, end in zip(bounds, bounds[1:]):
            swarm.start_server(model, "--blocks", f"{start}:{end}", "--cache-tokens", str(cache))
        clients = [AutoDistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers) for _ in prompts]

        def generate(index: int) -> str:
            tokens = clients[index].generate(prompts[index], **options)
            return "right" if torch.equal(tokens, expected[index]) else "WRONG tokens"

        outcomes = at_once(generate, len(clients), local, "one local generation", args.stagger)
        for client in clients:
            client.close()
    servers = "one server" if args.servers == 1 else f"{args.servers} servers in a chain, each"
    print(f"{args.clients} clients, {servers} with room for {args.room} sessions of {session_tokens} tokens "
          f"({cache} cache token slots); one local generation of {args.new_tokens} tokens: {local:.1f} s")  # fmt: skip
    for index, outcome in enumerate(outcomes):
        print(f"client {index}: {outcome}")


if __name__ == "__main__":
    main()
