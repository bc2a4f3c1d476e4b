"""`make demo`: a DHT node and two servers on 127.0.0.1, text generated through them, then everything stopped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TextStreamer

from meadow.local_swarm import LocalSwarm
from meadow.models import load_config, load_tokenizer

DEFAULT_MODEL_DIR = Path(os.environ.get("MEADOW_HOME", "~/.cache/meadow")).expanduser() / "demo-llama"


def default_model() -> Path:
    """The built-in demo model. Until a trained one ships, a tiny random Llama made on first run."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        from meadow.models.tiny import make_tiny_checkpoint

        print(f"Creating a tiny random Llama checkpoint in {DEFAULT_MODEL_DIR} (no trained default model ships yet; "
              "its text is gibberish, but the swarm must reproduce it exactly)")  # fmt: skip
        make_tiny_checkpoint(DEFAULT_MODEL_DIR, "llama", num_layers=8, hidden_size=256, intermediate_size=512,
                             num_heads=8, num_kv_heads=4, seed=0)  # fmt: skip
    return DEFAULT_MODEL_DIR


def run_demo(model: str | None, prompt: str, max_new_tokens: int) -> None:
    from meadow.client.model import AutoDistributedModelForCausalLM

    model = str(model or default_model())
    num_blocks = load_config(model).num_hidden_layers
    half = num_blocks // 2
    began = time.perf_counter()
    with LocalSwarm() as swarm:
        swarm.start_dht()
        print(f"DHT node: {swarm.initial_peers[0]}")
        swarm.start_server(model, "--blocks", f"0:{half}")
        swarm.start_server(model, "--blocks", f"{half}:{num_blocks}")
        print(f"Two servers ready (blocks 0:{half} and {half}:{num_blocks}) after {time.perf_counter() - began:.1f} s")

        tokenizer = load_tokenizer(model)
        inputs = tokenizer(prompt, return_tensors="pt")
        distributed = AutoDistributedModelForCausalLM.from_pretrained(model, swarm.initial_peers)
        print("Swarm: ", end="", flush=True)
        began = time.perf_counter()
        swarm_ids = distributed.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=TextStreamer(tokenizer, skip_special_tokens=True)
        )
        elapsed = time.perf_counter() - began
        print(f"  ({max_new_tokens} tokens in {elapsed:.2f} s, {max_new_tokens / elapsed:.1f} tokens/s)")

        local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        local_ids = local.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        same = torch.equal(local_ids, swarm_ids)
        print(f"Local: {tokenizer.decode(local_ids[0], skip_special_tokens=True)}")
        print(f"Same tokens as the whole model run locally: {'yes' if same else 'NO'}")
        distributed.sequence.close()
    print("All processes stopped.")
    if not same:
        raise SystemExit(1)
