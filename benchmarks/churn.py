"""Clients that come and go, many of them killed mid-generation: do the answers stay right and the servers bounded?

    python benchmarks/churn.py [MODEL] [--minutes 10] [--clients 4] [--server-churn SECONDS] [--balance]
                               [--cache-tokens N] [--api | --chat | --train [--lora] | --speculative K | --mix]

Two servers (0:half and half:end) on 127.0.0.1. `--clients` client processes run at all times. Each is a new peer
that opens a session, generates greedily and exits; 30 % of them are SIGKILLed and 10 % get Ctrl-C (SIGINT) at a
random moment. Those that finish are checked against transformers' greedy tokens for the same prompt. Every 60 s it
prints each server's resident memory, open files and threads (its Python process, DHT process and p2pd) and the
KV-cache slots it announces free. At the end, after the servers' idle timeout, every slot must be free again.

With --server-churn S, each span has two servers, and every S seconds one of them, chosen at random, is SIGKILLed
with its DHT process and p2pd (a machine that vanishes) and a new server for its span is started in its place: the
clients fail over, and their answers must stay right. With --balance, servers pick their own blocks instead
(`--num-blocks` half the model, a balance check every 15 s on average), and a replacement, or a server that sees a gap
the killed one left, goes where the swarm needs it: clients lose servers that move too.

With --cache-tokens N, servers have KV cache for N tokens (the default 16384 holds every client at once): with a
few hundred, sessions wait for room, and killed clients' sessions hold theirs until the servers' idle timeout.

With --speculative K, clients generate with `prompt_lookup_num_tokens=K`: they draft K tokens from n-grams of the
text so far, the servers score them in one step and roll their caches back past the rejected ones, and a failover
replays only the accepted tokens. The answers must still be transformers' plain greedy tokens.

With --train, each client runs three training steps instead of generating: forward and backward through the swarm
on a batch of 2 rows (one left-padded) with labels, and the loss and the gradient w.r.t. the input embeddings must
equal transformers' (relative error <= 1e-4), as in tests/test_training.py. With --server-churn, servers die during
forwards and backwards. With --train --lora, each client trains its own LoRA weights instead (rank 4 on q_proj and
v_proj of every block, random A and B), and the loss and every A's and B's gradient must equal peft's on transformers.

With --chat, each client is a conversation of three turns kept in one inference session, as `meadow chat` keeps it
(greedy, up to 24 tokens a reply): each reply must be transformers' greedy reply to the conversation's tokens so far.
With --server-churn, servers die between turns and during them, and the sessions must go on.

With --api, the clients are HTTP requests to one `meadow api` process (streamed /v1/completions, greedy, the prompt
as token ids, two choices with their tokens' logprobs: both must be transformers' text and logprobs), and a killed
client is a connection dropped mid-reply, as by a closed browser tab. The API process's
memory, files and threads are printed with the servers'.

With --mix, every new client is one of these kinds, picked at random: plain, speculative (K=4), chat, train, train
with LoRA, or an API request. They share the servers at once, as a swarm's users do: a server's batches mix sessions
with and without LoRA, drafts rolled back and conversations, between training forwards and backwards. The counts are
also printed for each kind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from meadow.client.chat_prompt import stop_strings
from meadow.client.model import positions_from_mask
from meadow.local_swarm import LocalSwarm, Process
from meadow.models import load_config, load_tokenizer
from meadow.models.default import default_model_path
from meadow.models.reference import load_reference_model
from meadow.swarm import dht_prefix_for, fetch_servers, start_dht

CLIENT = """
import json, sys, torch
from meadow import AutoDistributedModelForCausalLM
model, peers, prompt, expected = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
options = json.loads(sys.argv[5])  # more arguments of generate
with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=peers) as swarm_model:
    out = swarm_model.generate(torch.tensor([prompt]), max_new_tokens=len(expected), do_sample=False, **options)
print("right" if out[0, len(prompt):].tolist() == expected else f"WRONG {out[0, len(prompt):].tolist()}", flush=True)
"""
API_CLIENT = """
import json, sys, urllib.request
url, prompt, expected = sys.argv[1], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = json.load(urllib.request.urlopen(url + "/v1/models"))["data"][0]["id"]
body = {"model": model, "prompt": prompt, "max_tokens": len(expected["tokens"]), "temperature": 0, "stream": True,
        "n": 2, "logprobs": 0}
request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
texts, logprobs = ["", ""], [[], []]
for line in urllib.request.urlopen(request, timeout=600):
    line = line.decode().strip()
    if line.startswith("data: {"):
        choice = json.loads(line[6:])["choices"][0]
        texts[choice["index"]] += choice["text"]
        logprobs[choice["index"]] += (choice["logprobs"] or {}).get("token_logprobs", [])
# the servers' packed products put the default model's logits up to ~1e-3 from transformers': so its logprobs too
lengths = [len(got) for got in logprobs] == [len(expected["logprobs"])] * 2
off = max((abs(a - b) for got in logprobs for a, b in zip(got, expected["logprobs"])), default=0.0)
right = texts == [expected["text"]] * 2 and lengths and off < 5e-3
print("right" if right else f"WRONG {texts!r}, logprobs {[len(got) for got in logprobs]} off by {off}", flush=True)
"""
TRAIN_CLIENT = """
import json, sys, torch
from meadow import AutoDistributedModelForCausalLM
model, peers, case = sys.argv[1], json.loads(sys.argv[2]), torch.load(sys.argv[3])
error = lambda got, expected: ((got - expected).abs().max() / expected.abs().max()).item()
with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=peers) as swarm_model:
    for step in range(3):
        embeds = swarm_model.get_input_embeddings()(case["input_ids"]).detach().requires_grad_()
        loss = swarm_model(inputs_embeds=embeds, attention_mask=case["mask"], labels=case["labels"]).loss
        loss.backward()
        errors = abs(loss.item() - case["loss"]) / abs(case["loss"]), error(embeds.grad, case["grad"])
        if max(errors) > 1e-4:
            print(f"WRONG step {step}: relative errors of loss and gradient {errors}", flush=True)
            break
    else:
        print("right", flush=True)
"""
CHAT_CLIENT = """
import json, sys, threading, torch
from meadow import AutoDistributedModelForCausalLM
from meadow.client.chat import Conversation, Sampling
from meadow.models import load_tokenizer
model, peers, messages = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
turns = []
with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=peers) as swarm_model:
    generate = swarm_model.generate
    def recorded(ids, **kwargs):  # each turn's ids as sent and the reply's tokens, for the harness to check
        output = generate(ids, **kwargs)
        turns.append((ids[0].tolist(), output[0, ids.shape[1] :].tolist()))
        return output
    swarm_model.generate = recorded
    conversation = Conversation(swarm_model, load_tokenizer(model), max_length=1024)
    for message in messages:
        conversation.reply(message, Sampling(max_new_tokens=24), stop=threading.Event(), write=lambda text: None)
    conversation.close()
print("turns " + json.dumps(turns), flush=True)
"""
CONVERSATIONS = [
    ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"],
    ["Name three flowers.", "Which one smells best?", "Thank you!"],
    ["Write a haiku about rain.", "Now one about the sun.", "Which do you like more?"],
    ["What is 12 times 12?", "And 13 times 13?", "Explain how you got it."],
]
LORA_CLIENT = """
import json, sys, torch
from peft import LoraConfig
from meadow import AutoDistributedModelForCausalLM
model, peers, case = sys.argv[1], json.loads(sys.argv[2]), torch.load(sys.argv[3])
error = lambda got, expected: ((got - expected).abs().max() / expected.abs().max()).item()
lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=peers, lora=lora) as swarm_model:
    weights = {"A": swarm_model.lora.lora_A, "B": swarm_model.lora.lora_B}
    with torch.no_grad():
        for (kind, key), value in case["lora"].items():
            weights[kind][key].copy_(value)
    for step in range(3):
        swarm_model.zero_grad()
        loss = swarm_model(input_ids=case["input_ids"], attention_mask=case["mask"], labels=case["labels"]).loss
        loss.backward()
        worst = max(error(weights[kind][key].grad, grad) for (kind, key), grad in case["grads"].items())
        if max(abs(loss.item() - case["loss"]) / abs(case["loss"]), worst) > 1e-4:
            print(f"WRONG step {step}: loss {loss.item()}, worst LoRA gradient's relative error {worst}", flush=True)
            break
    else:
        print("right", flush=True)
"""
FATES = {"finish": 0.6, "kill": 0.3, "interrupt": 0.1}
# seconds from a client's start, for each kind of client: a process imports and connects first
KILL_AFTER = {"plain": (3, 12), "speculative": (3, 12), "api": (0.2, 3), "train": (3, 12), "lora": (3, 12),
              "chat": (3, 20)}  # fmt: skip
MIX_LOOKUP = 4  # with --mix, speculative clients draft this many tokens
IDLE_TIMEOUT = 30  # the servers' --idle-timeout: a session whose client vanished holds its cache this long at most
# info lines: points changed, a reply, a server that stays where it is, and a moving server's progress bar
ROUTINE = ("meadow.server.server: points: ", "meadow.api.generation: generation ", "balance check: staying",
           "loading blocks")


def prompts_with_answers(model: str, rng: random.Random) -> list[tuple[list[int], dict]]:
    """Prompts of 3 to 300 random tokens and transformers' greedy continuation of each, as tokens, as text and as
    the log-probabilities of its tokens up to an end of sequence."""
    reference, tokenizer, cases = load_reference_model(model), load_tokenizer(model), []
    ends = reference.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends, tokenizer.eos_token_id])
    for length, new_tokens in ((3, 30), (17, 12), (60, 30), (150, 4), (300, 12)):
        prompt = torch.tensor([[rng.randrange(100, 40000) for _ in range(length)]])
        with torch.no_grad():
            out = reference.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        tokens = out.sequences[0, length:].tolist()
        rows = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
        kept = next((i for i, token in enumerate(tokens) if token in ends), len(tokens))
        logprobs = [rows[i, token].item() for i, token in enumerate(tokens[:kept])]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cases.append((prompt[0].tolist(), {"tokens": tokens, "text": text, "logprobs": logprobs}))
    return cases


def training_cases(model: str, rng: random.Random, folder: Path, lora: bool) -> list[str]:
    """Batches of 2 rows (the first left-padded) of 8 to 128 random tokens with labels, each saved to a file with
    transformers' loss and gradient w.r.t. the input embeddings, or with `lora` peft's random LoRA weights and their
    gradients; the files."""
    reference, cases = load_reference_model(model), []
    if lora:
        from peft import LoraConfig, get_peft_model  # imported here: only --lora needs it

        reference = get_peft_model(reference, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        weights = {name: param for name, param in reference.named_parameters() if "lora_" in name}
        # peft starts B at zero, which would leave A without a gradient. Small weights: with 0.2 x randn (loss 21 on
        # random tokens, where the base model gives ~11) one case's gradients were 1.4e-4 from float64's in
        # transformers' own float32 (meadow's: 1.2e-4), and the two 1.7e-4 apart, past the check's 1e-4
        with torch.no_grad():
            for param in weights.values():
                generator = torch.Generator().manual_seed(rng.randrange(2**31))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    for index, length in enumerate((8, 33, 128)):
        input_ids = torch.tensor([[rng.randrange(100, 40000) for _ in range(length)] for _ in range(2)])
        mask = torch.ones_like(input_ids)
        mask[0, : length // 4] = 0
        labels = input_ids.masked_fill(mask == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # nothing is predicted from a pad
        embeds = reference.get_input_embeddings()(input_ids).detach().requires_grad_()
        positions = positions_from_mask(mask.bool())
        loss = reference(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels).loss
        reference.zero_grad()
        loss.backward()
        path = folder / f"{'lora' if lora else 'train'}{index}.pt"
        case = {"input_ids": input_ids, "mask": mask, "labels": labels, "loss": loss.item(), "grad": embeds.grad}
        if lora:  # peft's name ...layers.3.self_attn.q_proj.lora_A.default.weight is meadow's ("A", "3_q_proj")
            found = {name: re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])", name) for name in weights}
            keys = {name: (match[3], f"{match[1]}_{match[2]}") for name, match in found.items()}
            case["lora"] = {keys[name]: param.detach().clone() for name, param in weights.items()}
            case["grads"] = {keys[name]: param.grad.clone() for name, param in weights.items()}
        torch.save(case, path)
        cases.append(str(path))
    return cases


def turn_checker(model: str):
    """A function that takes a conversation's turns, [(the ids sent, the reply's tokens)], and says "right" when each
    reply is transformers' greedy reply to its ids, or "WRONG ..." naming the first that is not."""
    reference, tokenizer, known = load_reference_model(model), load_tokenizer(model), {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = dict(stop_strings=stop_strings(tokenizer), tokenizer=tokenizer) if stop_strings(tokenizer) else {}

    def check(turns: list[tuple[list[int], list[int]]]) -> str:
        for number, (ids, reply) in enumerate(turns):
            if tuple(ids) not in known:
                inputs = torch.tensor([ids])
                with torch.no_grad():
                    output = reference.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=24,
                                                do_sample=False, pad_token_id=pad, **extra)  # fmt: skip
                known[tuple(ids)] = output[0, len(ids) :].tolist()
            if reply != known[tuple(ids)]:
                return f"WRONG turn {number}: {reply} where transformers replies {known[tuple(ids)]}"
        return "right" if len(turns) == 3 else f"WRONG: {len(turns)} turns"

    return check


def resources(server: Process) -> str:
    """Resident MiB / open files / threads of each process in the server's group (server, DHT process, p2pd)."""
    group = subprocess.run(["pgrep", "-g", str(server.popen.pid)], capture_output=True, text=True).stdout.split()
    parts = []
    for pid in group:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            files = len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # a helper that just ended
        rss = int(status["VmRSS"].split()[0]) // 1024
        parts.append(f"{status['Name'].strip()} {rss} MiB/{files} files/{status['Threads'].strip()} threads")
    return ", ".join(parts)


def free_slots(dht, dht_prefix: str, num_blocks: int) -> dict[str, int]:
    """The KV-cache slots each server announces free, by its blocks, in span order."""
    first = {peer: info for block in fetch_servers(dht, dht_prefix, num_blocks) for peer, info in block.items()}
    ordered = sorted(first.items(), key=lambda item: item[1].start)
    return {f"{info.start}:{info.end} {str(peer)[-6:]}": info.cache_tokens_left for peer, info in ordered}


@dataclass(frozen=True)
class Kind:
    """A kind of client: the script its processes run and, for each of its cases, the script's arguments."""

    name: str
    script: str
    arguments: list[list[str]]


def client_kinds(
    names: list[str], model: str, peers: list[str], url: str | None, rng: random.Random, folder: Path, lookup: int
) -> list[Kind]:
    """The kinds of client `names` asks for, their cases made (with transformers' answers to check them against)."""
    prompts = prompts_with_answers(model, rng) if {"plain", "speculative", "api"} & set(names) else []
    arguments = lambda target, cases, options={}: [  # noqa: E731
        [target, json.dumps(peers), case, expected, json.dumps(options)] for case, expected in cases]  # fmt: skip
    tokens = [(json.dumps(prompt), json.dumps(answer["tokens"])) for prompt, answer in prompts]
    makers = {
        "plain": lambda: (CLIENT, arguments(model, tokens)),
        "speculative": lambda: (CLIENT, arguments(model, tokens, {"prompt_lookup_num_tokens": lookup})),
        "api": lambda: (API_CLIENT, arguments(url, [(json.dumps(p), json.dumps(answer)) for p, answer in prompts])),
        "chat": lambda: (CHAT_CLIENT, arguments(model, [(json.dumps(messages), "") for messages in CONVERSATIONS])),
        "train": lambda: (TRAIN_CLIENT, arguments(model, [(f, "") for f in training_cases(model, rng, folder, False)])),
        "lora": lambda: (LORA_CLIENT, arguments(model, [(f, "") for f in training_cases(model, rng, folder, True)])),
    }
    return [Kind(name, *makers[name]()) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4, help="client processes running at all times")
    parser.add_argument("--server-churn", type=float, default=0, help="seconds between server kills (0: none)")
    parser.add_argument("--balance", action="store_true", help="servers choose their blocks and move (--num-blocks)")
    parser.add_argument("--cache-tokens", type=int, default=16384, help="each server's KV cache token slots")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--api", action="store_true", help="clients are HTTP requests to one `meadow api` process")
    group.add_argument("--chat", action="store_true", help="clients are conversations of three turns")
    group.add_argument("--train", action="store_true", help="clients run training steps instead of generating")
    group.add_argument("--mix", action="store_true", help="every kind of client at once, each new one picked at random")
    parser.add_argument("--lora", action="store_true", help="with --train: clients train their own LoRA weights")
    parser.add_argument("--speculative", type=int, default=0, metavar="K",
                        help="clients generate with prompt_lookup_num_tokens=K (speculative decoding)")  # fmt: skip
    args = parser.parse_args()
    if args.lora and not args.train:
        parser.error("--lora goes with --train")
    if args.speculative and (args.api or args.chat or args.train or args.mix):
        parser.error("--speculative goes with plain clients")
    model = str(args.model or default_model_path())
    num_blocks, rng = load_config(model).num_hidden_layers, random.Random(0)
    folder = tempfile.TemporaryDirectory()
    chosen = {"train": args.train and not args.lora, "lora": args.lora, "chat": args.chat, "api": args.api,
              "speculative": bool(args.speculative)}  # fmt: skip
    names = list(KILL_AFTER) if args.mix else [next((name for name, on in chosen.items() if on), "plain")]
    counts = dict.fromkeys(["right", "wrong", "failed", "kill", "interrupt", "servers killed"], 0)
    by_kind = {name: dict.fromkeys(["right", "wrong", "failed", "kill", "interrupt"], 0) for name in names}
    with LocalSwarm() as swarm:
        peers = swarm.start_dht()
        half = num_blocks // 2
        spans = [f"0:{half}", f"{half}:{num_blocks}"] * (2 if args.server_churn else 1)
        if args.balance:
            spans = ["moves"] * len(spans)
        balance = ["--num-blocks", str(half), "--balance-period", "15"]
        serve = lambda span, wait=True: swarm.start_server(  # noqa: E731
            model, *(balance if args.balance else ["--blocks", span]), "--update-period", "5",
            "--idle-timeout", str(IDLE_TIMEOUT), "--cache-tokens", str(args.cache_tokens), wait=wait)  # fmt: skip
        servers = {serve(span): span for span in spans}
        dht, dht_prefix = start_dht(peers, client_mode=True), dht_prefix_for(model)
        url = None
        if "api" in names:
            api = Process(["api", model, "--initial-peers", *peers], "api")
            swarm.extra.append(api)
            ready = api.wait_for(lambda line: "http://" in line, timeout=120)
            url = "http://" + ready.split("http://", 1)[1].split()[0]
        kinds = client_kinds(names, model, peers, url, rng, Path(folder.name), args.speculative or MIX_LOOKUP)
        check_turns = turn_checker(model) if "chat" in names else None

        def report(label: str) -> None:
            print(f"{label}: {counts}; free cache slots {free_slots(dht, dht_prefix, num_blocks)}", flush=True)
            for process, role in [*servers.items(), *((api, "api") for api in swarm.extra)]:
                print(f"  {process.name} ({role}): {resources(process)}", flush=True)

        report("start")
        full = set(free_slots(dht, dht_prefix, num_blocks).values())  # a server's free slots with no session open
        running, end, next_report = [], time.monotonic() + args.minutes * 60, time.monotonic() + 60
        next_server_kill = time.monotonic() + (args.server_churn or float("inf"))
        while time.monotonic() < end:
            while len(running) < args.clients:
                kind = rng.choice(kinds)
                fate = rng.choices(list(FATES), list(FATES.values()))[0]
                client = subprocess.Popen([sys.executable, "-c", kind.script, *rng.choice(kind.arguments)],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
                running.append((client, kind.name, fate, time.monotonic() + rng.uniform(*KILL_AFTER[kind.name])))
            time.sleep(0.5)
            for client, name, fate, when in list(running):
                if client.poll() is None:
                    if fate != "finish" and time.monotonic() > when:
                        client.send_signal(signal.SIGKILL if fate == "kill" else signal.SIGINT)
                    continue
                running.remove((client, name, fate, when))
                output = client.stdout.read()
                verdict = output.strip().splitlines()[-1] if output.strip() else ""
                if verdict.startswith("turns "):
                    verdict = check_turns(json.loads(verdict[6:]))
                if verdict == "right" or verdict.startswith("WRONG"):
                    outcome = "right" if verdict == "right" else "wrong"
                    if verdict != "right":
                        print(f"a {name} client was wrong: {verdict}", flush=True)
                elif fate == "finish":
                    outcome = "failed"
                    print(f"a {name} client failed:\n{output[-2000:]}", flush=True)
                else:
                    outcome = fate
                counts[outcome] += 1
                by_kind[name][outcome] += 1
            if time.monotonic() > next_server_kill:
                next_server_kill += args.server_churn
                victim = rng.choice(list(servers))
                victim.signal(signal.SIGKILL)
                span = servers.pop(victim)
                servers[serve(span, wait=False)] = span  # it loads and joins while the loop goes on
                counts["servers killed"] += 1
            if time.monotonic() > next_report:
                next_report += 60
                report(time.strftime("%H:%M:%S"))
        for client, *_ in running:
            client.kill()
        time.sleep(IDLE_TIMEOUT + 15)  # the sessions of the last killed clients time out, then the servers announce
        report(f"{IDLE_TIMEOUT + 15} s after the last client")
        held = [slots for slots in free_slots(dht, dht_prefix, num_blocks).values() if slots not in full]
        dht.shutdown()
        logged = [f"{p.name}: {line}" for p in [*swarm.servers, *swarm.extra] for line in after_ready(p.lines)
                  if not any(routine in line for routine in ROUTINE)]  # fmt: skip
        print(f"lines logged after ready, other than points and replies: {len(logged)}", *logged[:30], sep="\n  ")
        if args.mix:
            print("by kind of client:", *(f"{name}: {outcomes}" for name, outcomes in by_kind.items()), sep="\n  ")
    if counts["wrong"] or counts["failed"] or held:
        raise SystemExit(f"FAILED: {counts['wrong']} wrong answers, {counts['failed']} failed clients, "
                         f"{len(held)} servers still holding cache slots")  # fmt: skip
    print("every answer right, every cache slot free again")


def after_ready(lines: list[str]) -> list[str]:
    ready = next((i for i, line in enumerate(lines) if "ready" in line), len(lines))
    return lines[ready + 1 :]


if __name__ == "__main__":
    main()
