"""The CUDA paths against transformers on the same GPU: servers started with `--device cuda` in float32, bfloat16
and float16, and with int8 / nf4 weights; the client's embeddings and head on the GPU too, in the servers' dtype.

    python benchmarks/cuda_paths.py [MODEL] [--configs float32 bfloat16 float16 int8 nf4] [--device cuda]

MODEL: a checkpoint folder (default: `meadow bench`'s ~100M random Llama). For each configuration, two servers
(0:half, half:end) on 127.0.0.1 and one client; the local reference is transformers' model in the same dtype on the
same device, its blocks quantized by the function the servers use (int8 / nf4). Printed per configuration: the
largest logit difference on a 2 x 64-token random batch (and that over the largest logit), teacher-forced top-1
agreement on it, how many of 32 greedy tokens match from the start, the relative error of the gradient w.r.t. the
input embeddings (float32 only), and generation tokens/s, swarm over local. Runs without a GPU too (`--device cpu`).
"""

from __future__ import annotations

import argparse
import time

import torch

from meadow import AutoDistributedModelForCausalLM
from meadow.bench import default_bench_model, start_spans
from meadow.local_swarm import LocalSwarm, split_evenly
from meadow.models import load_config, load_reference_model
from meadow.models.quant import quantize_block
from meadow.models.registry import family_of

CONFIGS = {  # name: (dtype, quant); quantized weights compute in float16, as they mostly do on GPUs
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "float16": ("float16", "none"),
    "int8": ("float16", "int8"),
    "nf4": ("float16", "nf4"),
}
NEW_TOKENS = 32


def reference(model: str, dtype: torch.dtype, quant: str, device: str):
    local = load_reference_model(model, dtype=dtype)
    if quant != "none":
        layers = local.get_submodule(family_of(load_config(model)).layer_prefix.partition(".{}")[0])
        for layer in layers:
            quantize_block(layer, quant, device)
    return local.to(device).eval()


def greedy_tokens_per_s(model, prompt: torch.Tensor) -> tuple[torch.Tensor, float]:
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    model.generate(prompt, **kwargs)  # warm-up
    began = time.perf_counter()
    tokens = model.generate(prompt, **kwargs).cpu()
    return tokens[0, prompt.shape[1]:], NEW_TOKENS / (time.perf_counter() - began)


def embedding_gradient(model, input_ids: torch.Tensor) -> torch.Tensor:
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=input_ids).loss.backward()
    return embeds.grad.float().cpu()


def check(model: str, name: str, device: str) -> dict:
    dtype_name, quant = CONFIGS[name]
    dtype = getattr(torch, dtype_name)
    vocab_size, blocks = load_config(model).vocab_size, load_config(model).num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab_size, (2, 64), generator=generator).to(device)
    prompt = torch.randint(0, vocab_size, (1, 16), generator=generator).to(device)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        start_spans(swarm, model, split_evenly(blocks, 2), "--device", device, "--dtype", dtype_name, "--quant", quant)
        with AutoDistributedModelForCausalLM.from_pretrained(
            model, swarm.initial_peers, dtype=dtype, device=device
        ) as remote:
            with torch.no_grad():
                remote_logits = remote(batch).logits.float().cpu()
                remote_tokens, remote_speed = greedy_tokens_per_s(remote, prompt)
            remote_grad = embedding_gradient(remote, batch) if dtype == torch.float32 else None
    local = reference(model, dtype, quant, device)
    with torch.no_grad():
        local_logits = local(batch).logits.float().cpu()
        local_tokens, local_speed = greedy_tokens_per_s(local, prompt)
    local.requires_grad_(False)
    grad_error = None
    if remote_grad is not None:
        local_grad = embedding_gradient(local, batch)
        grad_error = ((remote_grad - local_grad).abs().max() / local_grad.abs().max()).item()
    difference = (remote_logits - local_logits).abs().max().item()
    same = (remote_tokens == local_tokens).int()
    return dict(
        name=name, dtype=dtype_name, quant=quant, difference=difference,
        relative=difference / local_logits.abs().max().item(),
        agreement=(remote_logits.argmax(-1) == local_logits.argmax(-1)).float().mean().item(),
        greedy=int(same.cumprod(0).sum()), grad_error=grad_error, speed=remote_speed / local_speed,
        local_speed=local_speed, remote_speed=remote_speed,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model = str(args.model or default_bench_model())
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"model {model}, servers 0:half and half:end on {args.device} ({where}), client on {args.device}")
    print("| config | logits: largest difference (/ largest logit) | top-1 agreement | greedy tokens matching "
          "| gradient rel. error | tokens/s local, swarm (swarm/local) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        try:
            row = check(model, name, args.device)
        except Exception as e:  # one broken path must not hide the others' figures
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:300]} |||||", flush=True)
            continue
        grad = "-" if row["grad_error"] is None else f"{row['grad_error']:.1e}"
        print(f"| {name} | {row['difference']:.2e} ({row['relative']:.1e}) | {row['agreement']:.1%} "
              f"| {row['greedy']}/{NEW_TOKENS} | {grad} | {row['local_speed']:.1f}, {row['remote_speed']:.1f} "
              f"({row['speed']:.2f}x) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
