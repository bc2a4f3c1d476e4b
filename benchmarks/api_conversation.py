"""A conversation through `meadow api`, turn after turn, with the sessions kept between requests (--keep-sessions) and
without (0): each turn sends the whole conversation so far, as chat clients do. Prints, per turn, the prompt's length,
the prompt tokens the servers held already (usage's cached_tokens) and the seconds to the answer's first token
(streamed), both ways, and their ratio. Same greedy answers both ways, or it says so.

    python benchmarks/api_conversation.py [--model PATH] [--servers 2] [--turns 6] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

from meadow.local_swarm import LocalSwarm, Process, split_evenly
from meadow.models import default_model_path, load_config

SYSTEM = ("You are a patient guide to the countryside. " * 40).strip()  # a long standing prompt, as agents have
QUESTIONS = ["What grows in a meadow?", "And by the river?", "Which of those do bees like?", "When do they flower?",
             "What about in autumn?", "Give me one more.", "Why that one?", "Thanks. Anything else?"]  # fmt: skip


def conversation(url: str, model_id: str, turns: int, tokens: int, system: str = SYSTEM) -> list[dict]:
    messages, rows = [{"role": "system", "content": system}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        body = {"model": model_id, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        began, first, text, usage = time.perf_counter(), None, "", None
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if piece and first is None:
                    first = time.perf_counter() - began
                text += piece or ""
        messages.append({"role": "assistant", "content": text})
        rows.append({"prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"],
                     "first": first or float("nan"), "text": text})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the default model, SmolLM2-135M-Instruct)")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens of each answer")
    args = parser.parse_args()
    model = args.model or str(default_model_path())
    spans = split_evenly(load_config(model).num_hidden_layers, args.servers)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(model, "--blocks", span, wait=False) for span in spans]
        apis = {keep: Process(["api", model, "--initial-peers", *swarm.initial_peers, "--port", "0", "--keep-sessions",
                               keep], f"api-keep-{keep}") for keep in ("60", "0")}  # fmt: skip
        swarm.extra += list(apis.values())
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=300)
        urls = {keep: api.wait_for(lambda line: "API ready: http://" in line, timeout=300).split()[2]
                for keep, api in apis.items()}  # fmt: skip
        model_id = json.load(urllib.request.urlopen(urls["0"] + "/v1/models"))["data"][0]["id"]
        for url in urls.values():
            conversation(url, model_id, 1, 4, "Warm up.")  # routes, pings; a prompt that shares no start with ours
        kept, fresh = (conversation(urls[keep], model_id, args.turns, args.tokens) for keep in ("60", "0"))
    print(f"{model_id} on {args.servers} servers, {args.turns} turns of up to {args.tokens} tokens")
    print("turn  prompt  cached  first token kept  first token fresh  kept / fresh")
    for turn, (k, f) in enumerate(zip(kept, fresh), 1):
        print(f"{turn:>4}  {k['prompt']:>6}  {k['cached']:>6}  {k['first']:>14.3f} s  {f['first']:>15.3f} s  "
              f"{k['first'] / f['first']:>12.2f}")  # fmt: skip
    same = all(k["text"] == f["text"] for k, f in zip(kept, fresh))
    print("greedy answers: " + ("the same both ways" if same else "DIFFERENT (see the turns above)"))


if __name__ == "__main__":
    main()
