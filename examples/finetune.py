"""Fine-tune a model through a loopback swarm, next to the same training run locally.

    python examples/finetune.py [--steps 30] [--mode lora|deep_ptune]

A tiny random Llama learns a synthetic task: continue the alphabet ("defgh" -> "ijklm"). The swarm (a DHT node and
two servers on 127.0.0.1) runs the blocks; the client trains only its own weights: LoRA weights for every block
(`--mode lora`, sent with each request, gradients from the servers) or deep prompts (`--mode deep_ptune`). The
local run is transformers (+ peft for LoRA) with the same initial weights, data and optimizer: both loss columns
fall, and agree to float precision.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from meadow import AutoDistributedModelForCausalLM
from meadow.local_swarm import LocalSwarm
from meadow.models.tiny import make_tiny_checkpoint

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def batch(tokenizer, step: int, rows: int = 8, length: int = 12) -> torch.Tensor:
    """Rows of consecutive letters, each starting somewhere else (wrapping around z -> a)."""
    generator = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(ALPHABET), (rows,), generator=generator).tolist()
    texts = ["".join(ALPHABET[(start + i) % len(ALPHABET)] for i in range(length)) for start in starts]
    return tokenizer(texts, return_tensors="pt", add_special_tokens=False)["input_ids"]


def local_twin(path: Path, swarm_model, mode: str) -> torch.nn.Module:
    """transformers' model with the swarm model's trainable weights, to train side by side."""
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if mode == "lora":
        local = get_peft_model(local, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        for (block, module), (A, B) in zip(swarm_model.lora.keys, swarm_model.lora.pairs()):
            parent = "mlp" if module == "down_proj" else "self_attn"
            layer = local.get_submodule(f"base_model.model.model.layers.{block}.{parent}.{module}")
            layer.lora_A["default"].weight.data.copy_(A.data)
            layer.lora_B["default"].weight.data.copy_(B.data)
        return local
    # deep prompt tuning: the prompt before the embeddings, each layer's prompt added before that layer
    local.requires_grad_(False)
    local.prefix = torch.nn.Parameter(swarm_model.prompts.prefix.detach().clone())
    local.deep = torch.nn.Parameter(swarm_model.prompts.deep.detach().clone())
    for index, layer in enumerate(local.model.layers):

        def add_prompt(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            length = local.prefix.shape[0]
            return (torch.cat([hidden[:, :length] + local.deep[index], hidden[:, length:]], dim=1), *args[1:]), kwargs

        layer.register_forward_pre_hook(add_prompt, with_kwargs=True)
    return local


def local_loss(local, mode: str, input_ids: torch.Tensor) -> torch.Tensor:
    if mode == "lora":
        return local(input_ids=input_ids, labels=input_ids).loss
    rows, length = input_ids.shape[0], local.prefix.shape[0]
    embeds = torch.cat([local.prefix.expand(rows, -1, -1), local.get_input_embeddings()(input_ids)], dim=1)
    logits = local(inputs_embeds=embeds).logits[:, length:].contiguous()
    return local.loss_function(logits=logits, labels=input_ids, vocab_size=local.config.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mode", choices=["lora", "deep_ptune"], default="lora")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder, LocalSwarm() as swarm:
        path = make_tiny_checkpoint(Path(folder) / "tiny-llama", "llama", num_layers=4, hidden_size=64, seed=0)
        tokenizer = AutoTokenizer.from_pretrained(path)
        swarm.start_dht()
        for server in [swarm.start_server(path, "--blocks", span, wait=False) for span in ("0:2", "2:4")]:
            server.wait_for(lambda line: "ready" in line, timeout=120)

        torch.manual_seed(0)
        tuning = dict(lora=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)) if args.mode == "lora" else dict(
            tuning_mode="deep_ptune", pre_seq_len=4
        )
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, **tuning)
        local = local_twin(path, model, args.mode)
        trained = [p for p in model.parameters() if p.requires_grad]
        local_trained = [p for p in local.parameters() if p.requires_grad]
        print(f"{args.mode}: {sum(p.numel() for p in trained)} trainable parameters on the client; the servers' "
              f"{sum(p.numel() for p in local.parameters()) - sum(p.numel() for p in local_trained)} stay frozen")  # fmt: skip
        optimizer = torch.optim.Adam(trained, lr=args.lr)
        local_optimizer = torch.optim.Adam(local_trained, lr=args.lr)

        print("| step | swarm loss | local loss |\n|---|---|---|")
        for step in range(args.steps):
            input_ids = batch(tokenizer, step)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            expected = local_loss(local, args.mode, input_ids)
            expected.backward()
            local_optimizer.step()
            local_optimizer.zero_grad()
            print(f"| {step} | {loss.item():.4f} | {expected.item():.4f} |", flush=True)

        prompt = tokenizer("defgh", return_tensors="pt", add_special_tokens=False)["input_ids"]
        continuation = model.generate(prompt, max_new_tokens=5, do_sample=False)[0, prompt.shape[1] :]
        print(f"after training, the swarm continues 'defgh' with {tokenizer.decode(continuation)!r}")
        model.sequence.close()


if __name__ == "__main__":
    main()
