"""How far honest servers' outputs lie apart in a spot-check, next to the tolerance the client allows them.

    python -m benchmarks.spot_check_tolerance [MODEL] [--spans 0:15 15:30 0:30] [--dtype float32]

A spot-check of an inference session compares the tokens a server decoded one at a time with another server's
prefill of the same history (meadow/client/verify.py). For each span and each pair of quantizations (none, int8,
nf4), this runs both in-process through the server's own code (serving_blocks, Span, Session): the first through a
session (an 8-token prefill, then one token a step), the second in one forward pass, on the three paragraphs of
benchmarks/quant_agreement.py and a chat prompt. It prints the largest per-token relative difference over the texts
(verify.disagreement) and `verify.tolerance` for the pair ("-" where the two cannot check each other).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.quant_agreement import PARAGRAPHS
from meadow.client.verify import disagreement, tolerance
from meadow.models import default_model_path, load_config, load_reference_model, load_tokenizer
from meadow.server.server import serving_blocks
from meadow.server.span import Session, Span
from meadow.server.tuning import TuningInputs
from meadow.wire import BlockRange

QUANTS = ("none", "int8", "nf4")
PROMPT_TOKENS = 8  # the session's first step; the rest are decoded one at a time


@torch.no_grad()
def outputs(span: Span, blocks: BlockRange, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`blocks`' outputs for `hidden` (1, T, H): decoded one token at a time in a session, and in one forward pass."""
    length = hidden.shape[1]
    positions, mask = torch.arange(length)[None], torch.ones(1, length, dtype=torch.bool)
    prefill = span.forward(hidden, positions, mask, blocks)
    session = Session.open(span, blocks, 1, length, TuningInputs(blocks, None, None, ()))
    cuts = [0, PROMPT_TOKENS, *range(PROMPT_TOKENS + 1, length + 1)]
    steps = [session.step(span, *(t[:, a:b] for t in (hidden, positions, mask))) for a, b in itertools.pairwise(cuts)]
    return torch.cat(steps, dim=1), prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--spans", nargs="+", default=["0:15", "15:30", "0:30"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    model = args.model or default_model_path()
    config, tokenizer, reference = load_config(model), load_tokenizer(model), load_reference_model(model)
    chat = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]
    texts = [*PARAGRAPHS.values(), tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]
    with torch.no_grad():
        states = [reference(tokenizer(text, return_tensors="pt")["input_ids"], output_hidden_states=True).hidden_states
                  for text in texts]  # fmt: skip
    dtype = getattr(torch, args.dtype)
    print(f"model {model}, {args.dtype} on cpu; decoded one token at a time (rows) against one prefill (columns)")
    for text in args.spans:
        start, end = map(int, text.split(":"))
        blocks = BlockRange(start=start, end=end)
        results = {}
        for quant in QUANTS:
            span = Span(serving_blocks(model, config, blocks, dtype, torch.device("cpu"), quant), start, config, dtype,
                        torch.device("cpu"))  # fmt: skip
            results[quant] = [outputs(span, blocks, hidden[start].to(dtype)) for hidden in states]
        print(f"\nblocks {blocks}: largest difference over {len(texts)} texts (tolerance)")
        print("| decoded \\ prefilled | " + " | ".join(QUANTS) + " |")
        print("|---" * (len(QUANTS) + 1) + "|")
        for primary in QUANTS:
            cells = []
            for witness in QUANTS:
                found = max(disagreement([steps], [prefill]) for (steps, _), (_, prefill)
                            in zip(results[primary], results[witness]))  # fmt: skip
                allowed = tolerance({"dtype": args.dtype, "quant": primary}, {"dtype": args.dtype, "quant": witness})
                cells.append(f"{found:.3g} ({allowed:.3g})" if allowed != float("inf") else f"{found:.3g} (-)")
            print(f"| {primary} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
