"""`make demo`: the default model split over three servers on 127.0.0.1 answers a question; then everything stops.

The answer is checked against the same model run whole in this process (transformers): the tokens must match.
`meadow demo --keep` leaves the swarm and the HTTP API running and prints the chat page's address.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time

import torch
import transformers
from transformers import TextStreamer

from meadow.client.chat_prompt import chat_prompt_ids
from meadow.listening import CannotListen, check_port_free
from meadow.local_swarm import LocalSwarm, Process, split_evenly
from meadow.models import default_model_path, load_config, load_reference_model, load_tokenizer

DEMO_QUESTION = "What is the capital of France?"
API_PORT = 8000  # meadow api's default


def start_servers(swarm: LocalSwarm, model: str, spans: list[str]) -> None:
    """Start one server per span at once and show how many are ready while they load."""
    began = time.perf_counter()
    servers = [swarm.start_server(model, "--blocks", span, wait=False) for span in spans]
    ready: set[int] = set()
    shown = ""
    while len(ready) < len(servers):
        for i, server in enumerate(servers):
            if i not in ready and any("ready" in line for line in server.lines):
                ready.add(i)
            elif server.popen.poll() is not None:
                server.wait_for(lambda line: "ready" in line, 0)  # raises with the server's last output
        line = f"Starting {len(servers)} servers (blocks {', '.join(spans)}): {len(ready)}/{len(servers)} ready, " \
               f"{time.perf_counter() - began:.0f} s"  # fmt: skip
        if line != shown:
            print(f"\r{line}", end="", flush=True)
            shown = line
        time.sleep(0.2)
    print()


def run_demo(model: str | None, question: str, max_new_tokens: int, servers: int = 3, keep: bool = False) -> None:
    from meadow.client.model import AutoDistributedModelForCausalLM

    model = str(model or default_model_path())
    spans = split_evenly(load_config(model).num_hidden_layers, servers)
    began = time.perf_counter()
    with LocalSwarm() as swarm:
        swarm.start_dht()
        print(f"Model: {model}\nDHT node: {swarm.initial_peers[0]}")
        start_servers(swarm, model, spans)

        tokenizer = load_tokenizer(model)
        prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])
        settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        with AutoDistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers) as distributed:
            print(f"Client ready after {time.perf_counter() - began:.1f} s.\n\nYou: {question}\nSwarm: ", end="", flush=True)
            began = time.perf_counter()
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            swarm_ids = distributed.generate(prompt, streamer=streamer, **settings)
            elapsed, new_tokens = time.perf_counter() - began, swarm_ids.shape[1] - prompt.shape[1]
            print(f"({new_tokens} tokens in {elapsed:.1f} s, {new_tokens / elapsed:.1f} tokens/s through {servers} servers)")

        print("Running the same model locally (transformers) to compare...", flush=True)
        transformers.utils.logging.disable_progress_bar()
        # transformers' GGUF loader draws its own tqdm bar, which disable_progress_bar() does not reach; a failed load
        # still raises, with its traceback
        with contextlib.redirect_stderr(io.StringIO()):
            reference = load_reference_model(model)
        with torch.no_grad():
            local_ids = reference.generate(prompt, **settings)
        same = torch.equal(local_ids, swarm_ids)
        print(f"Same tokens as the whole model run locally (transformers): {'yes' if same else 'NO'}")
        if not same:
            print(f"Local: {tokenizer.decode(local_ids[0, prompt.shape[1]:], skip_special_tokens=True)}")
        if keep:
            keep_running(swarm, model)
    print("All processes stopped.")
    if not same:
        raise SystemExit(1)


def keep_running(swarm: LocalSwarm, model: str) -> None:
    """Leave the swarm up with the HTTP API and its chat page until Ctrl-C: on the API's usual port, 8000, or on
    another if that one is taken (its address is printed either way)."""
    try:
        check_port_free("127.0.0.1", API_PORT)
        port = API_PORT
    except CannotListen:
        port = 0
    api = Process(["api", model, "--initial-peers", *swarm.initial_peers, "--port", str(port)], "api")
    swarm.extra.append(api)
    url = api.wait_for(lambda line: "http://" in line, timeout=120).split("http://", 1)[1].split()[0]
    print(f"\nThe swarm keeps running. Chat page: http://{url}/  monitor: http://{url}/monitor\n"
          f"OpenAI-compatible API: http://{url}/v1  Ollama-compatible API: http://{url}\n"
          f"For meadow chat, generate, serve, status... in another terminal:\n"
          f"  export MEADOW_INITIAL_PEERS='{' '.join(swarm.initial_peers)}'\nCtrl-C stops it all.")  # fmt: skip
    try:
        while all(p.popen.poll() is None for p in swarm.servers + swarm.extra):
            time.sleep(0.5)
        print("A process of the swarm exited.", file=sys.stderr)
    except KeyboardInterrupt:
        print()
