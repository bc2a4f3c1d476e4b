"""Tiny random checkpoints with a real tokenizer, for tests and the demo (no hub can be reached here)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

FAMILIES = ("llama", "mistral", "qwen2")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama's order for the first three


def make_tiny_checkpoint(
    path: str | Path,
    family: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    max_shard_size: str | None = None,
    rope_scaling: dict | None = None,
    sliding_window: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a randomly initialised HF model of `family` and its tokenizer in `path`; return the path.

    qwen2 has q/k/v bias and tied embeddings. `rope_scaling` is an HF rope dict such as
    {"rope_type": "llama3", "factor": 8.0, ...}. `sliding_window` only applies to mistral.
    `vocab_size` defaults to the tokenizer's size; a larger one (a real model's shape, for benchmarks)
    has ids the tokenizer decodes to nothing.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path)
    tokenizer = make_tokenizer()
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope_scaling or {})},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "mistral":
        config = MistralConfig(**common, sliding_window=sliding_window)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=True)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # HF's init leaves biases at 0 and norm scales at 1, which would let a test miss a bias or a norm;
        # std 0.1 also makes attention far from uniform, so a wrong mask or rotary shows up in the numbers
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return path


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer over printable ASCII (plus newline and tab), with <unk> for other bytes.

    Restricting the vocabulary to printable characters means that whatever a random model generates
    decodes to readable text.
    """
    # ByteLevel's alphabet (GPT-2's byte -> char map) is the identity on "!".."~" and chr(256 + b) for bytes 0..32
    chars = [chr(256 + b) for b in (ord("\t"), ord("\n"), ord(" "))] + [chr(b) for b in range(ord("!"), ord("~") + 1)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(chars))}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )

