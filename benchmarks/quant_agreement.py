"""How much quantized server blocks change a real model's predictions: teacher-forced next-token top-1 agreement of
int8 and nf4 blocks with the unquantized blocks, on three paragraphs (prose, Python, a technical how-to).

    python benchmarks/quant_agreement.py [MODEL]    # default: SmolLM2-135M-Instruct (meadow.DEFAULT_MODEL)

Each paragraph is run once through the model with every block's linear layers as loaded (float32) and once with
them quantized by meadow.models.quant.quantize_block, the function `meadow serve --quant` uses; embeddings, norms
and the head stay float32, as on a client. At each position both see the same true prefix (teacher forcing), and
agree if their most likely next token is the same. Targets: int8 >= 95 %, nf4 >= 75 %.

The "(transformers)" rows quantize the same float32 weights through transformers' BitsAndBytesConfig, as a check
on ours. Both quantize the same 210 layers into the same bytes (blocksize 64, double quant, head and embeddings
left float). int8 agrees exactly; nf4 differs only because on CPUs with AVX512-BF16 transformers' layers switch to
bitsandbytes' bfloat16 kernel, which meadow turns off (it has no backward); with it off, both give the same tokens.
So the gap to the targets (int8 94.4 %, nf4 71.7 % here) is not in how meadow quantizes: the default model is itself
a 4-bit (Q4_1) GGUF, and re-quantizing it compounds two roundings; the issue's 98 % / 80 % must have been measured
on other weights (likely the original bfloat16 checkpoint, not available offline here to check).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from meadow.models import default_model_path, load_reference_model, load_tokenizer
from meadow.models.quant import quantize_block

PARAGRAPHS = {
    "prose": (
        "The printing press changed how knowledge moved through Europe. Before Gutenberg built his machine around "
        "1440, a book was copied by hand, and a single Bible could take a scribe more than a year. Movable metal type, "
        "oil-based ink and a press adapted from those used for wine let a small workshop print hundreds of pages a "
        "day. Within fifty years, printers were working in more than two hundred cities, and millions of books had "
        "been made. Cheaper books meant that more people learned to read, and ideas that once stayed in a monastery "
        "library could now spread across a continent in a few months."
    ),
    "python": (
        "def binary_search(items: list[int], target: int) -> int:\n"
        '    """Return the index of target in the sorted list items, or -1 if it is absent."""\n'
        "    low, high = 0, len(items) - 1\n"
        "    while low <= high:\n"
        "        middle = (low + high) // 2\n"
        "        if items[middle] == target:\n"
        "            return middle\n"
        "        if items[middle] < target:\n"
        "            low = middle + 1\n"
        "        else:\n"
        "            high = middle - 1\n"
        "    return -1\n"
        "\n"
        "\n"
        "if __name__ == \"__main__\":\n"
        "    numbers = [1, 3, 5, 7, 9, 11]\n"
        "    print(binary_search(numbers, 7))\n"
        "    print(binary_search(numbers, 4))\n"
    ),
    "how-to": (
        "To install the package, first create a virtual environment with python -m venv .venv and activate it. Then "
        "run pip install -e . from the root of the repository, which installs the library in editable mode together "
        "with its dependencies. The tests use pytest: run python -m pytest -x -q to stop at the first failure. If a "
        "test needs a GPU and none is available, it is skipped with a message that says so. Configuration is read "
        "from a file named config.toml in the current directory; every option has a default, so the file may be "
        "empty."
    ),
}
QUANTS = ("int8", "nf4")
# transformers' own bitsandbytes path, with the settings `meadow serve --quant` means (its defaults otherwise: the
# LLM.int8() threshold 6.0, and the head, tied to the embeddings here, left unquantized)
TRANSFORMERS_CONFIGS = {
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32),  # fmt: skip
}


@torch.no_grad()
def top1(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids).logits[0, :-1].argmax(-1)  # the last position predicts past the text: not scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="checkpoint folder or GGUF file (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    model_path = args.model or default_model_path()
    tokenizer = load_tokenizer(model_path)
    texts = {name: tokenizer(text, return_tensors="pt").input_ids for name, text in PARAGRAPHS.items()}

    reference = load_reference_model(model_path, torch.float32)
    expected = {name: top1(reference, ids) for name, ids in texts.items()}
    truth = {name: ids[0, 1:] for name, ids in texts.items()}
    rows = {"none": {name: expected[name] for name in texts}}
    # the same float32 weights (a GGUF dequantized by transformers) saved as safetensors, for transformers to quantize
    # (transformers refuses to save a model it still marks as GGUF-quantized, though its weights are plain floats)
    saved = tempfile.TemporaryDirectory()
    reference.hf_quantizer = None
    del reference.config.quantization_config
    reference.save_pretrained(saved.name)
    del reference
    for quant in QUANTS:
        model = load_reference_model(model_path, torch.float32)
        for layer in model.model.layers:
            quantize_block(layer, quant, "cpu")
        rows[quant] = {name: top1(model, ids) for name, ids in texts.items()}
        del model
    for quant, config in TRANSFORMERS_CONFIGS.items():
        model = AutoModelForCausalLM.from_pretrained(saved.name, quantization_config=config, dtype=torch.float32)
        rows[f"{quant} (transformers)"] = {name: top1(model.eval(), ids) for name, ids in texts.items()}
        del model
    saved.cleanup()

    names = list(texts)
    print(f"\nmodel {model_path}, float32 on cpu; teacher-forced top-1 agreement with the unquantized blocks "
          f"(and, for context, accuracy on the text's own next token)")  # fmt: skip
    print(f"| quant | {' | '.join(f'{name} ({len(truth[name])} tokens)' for name in names)} | all | next-token accuracy |")
    print("|---" * (len(names) + 3) + "|")
    total = sum(len(truth[name]) for name in names)
    for quant, predictions in rows.items():
        same = {name: (predictions[name] == expected[name]).sum().item() for name in names}
        correct = sum((predictions[name] == truth[name]).sum().item() for name in names)
        cells = " | ".join(f"{same[name] / len(truth[name]):.1%}" for name in names)
        print(f"| {quant} | {cells} | {sum(same.values()) / total:.1%} | {correct / total:.1%} |")


if __name__ == "__main__":
    main()
