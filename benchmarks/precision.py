"""How far the swarm's float32 logits and training gradients are from transformers' run locally, next to how far
transformers' own float32 is from float64: rounding, grown through the blocks.

    python benchmarks/precision.py [MODEL] [--lengths 16 128 512] [--exact]

Two servers (0:half, half:end) on 127.0.0.1, the default model unless MODEL is given. For each length: the largest
absolute difference of the logits of one random sequence, and the relative error (largest difference / largest
value) of the gradient w.r.t. the input embeddings of a 2-row batch (the first row a quarter left-padded) with labels.
--exact starts the servers with `meadow serve --exact` (torch's own products instead of oneDNN's packed ones).
"""

from __future__ import annotations

import argparse

import torch

from meadow import AutoDistributedModelForCausalLM
from meadow.client.model import positions_from_mask
from meadow.local_swarm import LocalSwarm
from meadow.models import load_config
from meadow.models.default import default_model_path
from meadow.models.reference import load_reference_model


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits.float()


def embedding_gradient(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    positions = positions_from_mask(mask.bool())  # transformers derives none from the mask
    model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
    return embeds.grad.float()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--exact", action="store_true", help="the servers run with --exact")
    args = parser.parse_args()
    model = str(args.model or default_model_path())
    config = load_config(model)
    half, total = config.num_hidden_layers // 2, config.num_hidden_layers
    local, exact = load_reference_model(model), load_reference_model(model, dtype=torch.float64)
    rows = []
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(model, "--blocks", span, *(["--exact"] if args.exact else []), wait=False)
                   for span in (f"0:{half}", f"{half}:{total}")]  # fmt: skip
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=600)
        with AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.initial_peers) as swarm_model:
            for length in args.lengths:
                generator = torch.Generator().manual_seed(length)
                input_ids = torch.randint(100, config.vocab_size, (2, length), generator=generator)
                mask = torch.ones_like(input_ids)
                mask[0, : length // 4] = 0
                labels = input_ids.masked_fill(mask == 0, -100)
                labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # nothing is predicted from a pad
                expected = logits(local, input_ids[1:])
                truth = logits(exact, input_ids[1:])
                grads = [embedding_gradient(m, input_ids, mask, labels) for m in (swarm_model, local, exact)]
                rows.append((
                    length,
                    (logits(swarm_model, input_ids[1:]) - expected).abs().max().item(),
                    (expected - truth).abs().max().item(),
                    relative_error(grads[0], grads[1]),
                    relative_error(grads[1], grads[2]),
                ))  # fmt: skip
    print(f"\nmodel {model} ({total} blocks), servers 0:{half} and {half}:{total}, float32"
          f"{', --exact' if args.exact else ''}")  # fmt: skip
    print("| tokens | logits: swarm - transformers | transformers - float64 | gradient: swarm vs transformers "
          "| transformers vs float64 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for length, *errors in rows:
        print(f"| {length} | " + " | ".join(f"{error:.2e}" for error in errors) + " |")
    print("logits: largest absolute difference; gradient w.r.t. the input embeddings: relative error")


if __name__ == "__main__":
    main()
