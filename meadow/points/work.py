"""How much work a receipt stands for: tokens x blocks x parameters per block (parameter-tokens)."""

from __future__ import annotations


def params_per_block(config) -> int:
    """Parameters of one transformer block, as a Llama-style block of the config's sizes has them (seven linear layers,
    two norms): exact for the Llama family, an estimate of the same scale for BLOOM, Falcon and Mixtral (one expert's
    MLP: what a token goes through). Client and server compute it alike from the config; a receipt's work is
    weighted by it."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    return hidden * (q + 2 * kv) + q * hidden + 3 * hidden * config.intermediate_size + 2 * hidden
