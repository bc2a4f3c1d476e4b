"""More chat users than a server's KV cache holds, each pausing between turns as people do (`meadow chat`: one
session per conversation, open from turn to turn), on a server that closes idle sessions for those who wait
(`--reclaim-idle`) and on one that does not (0). Prints, both ways: each turn's seconds to its reply's first token
(mean and worst), the seconds until every conversation is done, and how many sessions were rebuilt after being
closed. Same greedy replies both ways, or it says so.

    python benchmarks/idle_sessions.py [--model PATH] [--users 8] [--room 3] [--turns 3] [--pause 4] [--reclaim 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time

from meadow.client.chat import Conversation, Sampling
from meadow.client.model import AutoDistributedModelForCausalLM
from meadow.local_swarm import LocalSwarm
from meadow.models import default_model_path, load_config, load_tokenizer

SYSTEM = ("You are a patient guide to the countryside, and you answer in a sentence or two. " * 6).strip()
QUESTIONS = ["What grows in a meadow?", "And by the river?", "Which of those do bees like?", "When do they flower?"]
SESSION_TOKENS = 250  # about what one conversation here grows to: the server holds `--room` of them


class Rebuilds(logging.Handler):
    """Counts the client's "rebuilt the cache" lines: sessions replayed after their server closed them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "rebuilt the cache" in record.getMessage()


def chat(model, tokenizer, turns: int, pause: float, tokens: int, start: threading.Barrier) -> dict:
    """One user's conversation: a question, the reply, a pause, the next question...; each reply's wait and text."""
    conversation, waits, replies = Conversation(model, tokenizer, max_length=2048, system=SYSTEM), [], []
    start.wait()
    try:
        for turn in range(turns):
            began, first = time.perf_counter(), []
            write = lambda text, **_: first.append(time.perf_counter() - began) if text and not first else None
            replies.append(conversation.reply(QUESTIONS[turn % len(QUESTIONS)], Sampling(max_new_tokens=tokens),
                                              threading.Event(), write))  # fmt: skip
            waits.append(first[0] if first else time.perf_counter() - began)
            if turn < turns - 1:
                time.sleep(pause)  # the user reads the reply and types the next question
    finally:
        conversation.close()
    return {"waits": waits, "replies": replies}


def run(model: str, args, reclaim: float) -> dict:
    tokenizer = load_tokenizer(model)
    rebuilds = Rebuilds()
    logging.getLogger("meadow.client.session").addHandler(rebuilds)
    logging.getLogger("meadow.client.session").setLevel(logging.INFO)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        blocks = f"0:{load_config(model).num_hidden_layers}"
        swarm.start_server(model, "--blocks", blocks, "--cache-tokens", str(args.room * SESSION_TOKENS),
                           "--reclaim-idle", str(reclaim))  # fmt: skip
        # one client per user, as each user runs their own: a peer of its own to the server
        models = [AutoDistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers)
                  for _ in range(args.users)]  # fmt: skip
        results, start = [None] * args.users, threading.Barrier(args.users + 1)

        def user(i: int) -> None:
            results[i] = chat(models[i], tokenizer, args.turns, args.pause, args.tokens, start)

        threads = [threading.Thread(target=user, args=(i,)) for i in range(args.users)]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - began
        for distributed in models:
            distributed.close()
    logging.getLogger("meadow.client.session").removeHandler(rebuilds)
    waits = [wait for result in results for wait in result["waits"]]
    return {"waits": waits, "seconds": seconds, "rebuilds": rebuilds.count,
            "replies": [result["replies"] for result in results]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--room", type=int, default=3, help=f"sessions of {SESSION_TOKENS} tokens the server holds")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--pause", type=float, default=4.0, help="seconds a user pauses between turns")
    parser.add_argument("--tokens", type=int, default=24, help="longest reply")
    parser.add_argument("--reclaim", type=float, default=2.0, help="the server's --reclaim-idle, against 0")
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    runs = {reclaim: run(model, args, reclaim) for reclaim in (args.reclaim, 0.0)}
    print(f"{args.users} users, {args.turns} turns each, {args.pause:.0f} s pauses; one server, room for {args.room} "
          f"conversations of {SESSION_TOKENS} tokens")  # fmt: skip
    print("--reclaim-idle  first token: mean    worst  all done  sessions rebuilt")
    for reclaim, result in runs.items():
        waits = result["waits"]
        print(f"{reclaim:>13.1f}  {statistics.mean(waits):>12.2f} s {max(waits):>6.2f} s {result['seconds']:>7.1f} s  "
              f"{result['rebuilds']:>16}")  # fmt: skip
    first, second = runs.values()
    print("greedy replies: " + ("the same both ways" if first["replies"] == second["replies"] else "DIFFERENT"))


if __name__ == "__main__":
    main()
