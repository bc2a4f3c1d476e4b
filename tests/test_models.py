"""meadow.models against transformers' own implementation of the same tiny checkpoints."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from meadow.models import (
    SUPPORTED_MODEL_TYPES,
    KVCache,
    UnsupportedModelError,
    checkpoint,
    family_for,
    load_block,
    load_blocks,
    load_client_parts,
    load_config,
    resolve_model_path,
)
from meadow.models.tiny import make_tiny_checkpoint

ATOL = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# name -> (family, make_tiny_checkpoint kwargs); sequences below are longer than mistral's and mixtral's window of 4
VARIANTS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"hidden_size": 40, "num_heads": 5, "num_kv_heads": 1, "head_dim": 12, "intermediate_size": 72,
                        "tie_word_embeddings": True, "attention_bias": True}),
    "mixtral": ("mixtral", {"num_experts": 4, "experts_per_token": 2, "sliding_window": 4}),
    "llama3-rope": None,  # see llama3_rope_path
}


@pytest.fixture(scope="module")
def llama3_rope_path(tmp_path_factory):
    # made here: conftest's `checkpoints` keys its cache by hashable kwargs, and a rope dict is not one
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama3-rope"), "llama", rope_scaling=LLAMA3_ROPE)


@pytest.fixture(params=list(VARIANTS))
def model_path(request, checkpoints):
    if request.param == "llama3-rope":
        return request.getfixturevalue("llama3_rope_path")
    family, kwargs = VARIANTS[request.param]
    return checkpoints(family, **kwargs)


@functools.cache
def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def hf_reference(path, ids, mask=None, position_ids=None):
    """transformers' hidden state after the last block (before the final norm) and its logits."""
    model = hf_model(path)
    captured = {}
    # in transformers 5 hidden_states[-1] is already normed, so catch the norm's input instead
    hook = model.model.norm.register_forward_hook(lambda module, args, out: captured.update(hidden=args[0]))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    hook.remove()
    return captured["hidden"], logits, model


def run(blocks, x, position_ids, key_mask=None, caches=None, start=0):
    with torch.no_grad():
        for i, block in enumerate(blocks):
            x = block(x, position_ids, key_mask, cache=caches[i] if caches else None, start=start)
            assert not x.isnan().any()
    return x


def left_padded_batch(vocab_size, pads=(3, 0), length=10):
    """ids, attention mask and HF-style position ids (cumsum - 1, clamped) of a left-padded batch."""
    torch.manual_seed(1)
    ids = torch.randint(4, vocab_size, (len(pads), length))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 3, 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_blocks_and_client_parts_match_transformers(model_path):
    config = load_config(model_path)
    blocks = load_blocks(model_path, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    parts = load_client_parts(model_path, config, torch.float32)
    ids = torch.randint(4, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    hidden, logits, hf = hf_reference(model_path, ids)

    embeddings = hf.model.embed_tokens(ids)
    assert torch.equal(parts.embed_tokens(ids), embeddings)
    ours = run(blocks, embeddings, torch.arange(10).expand(2, 10))
    assert (ours - hidden).abs().max() <= ATOL
    assert (parts.logits(ours) - logits).abs().max() <= ATOL


def test_config_read_without_transformers_equals_transformers_reading(model_path):
    hf = checkpoint.load_hf_config(model_path)
    config = load_config(model_path)
    assert config == family_for(hf.model_type).config_from_hf(hf)
    plain = config.model_type == "llama" and config.rope_type == "default"
    assert isinstance(config.hf_config, SimpleNamespace) == plain  # the fast path is taken where it is meant to be


def test_kv_cache_decoding_equals_full_forward(model_path):
    config = load_config(model_path)
    blocks = load_blocks(model_path, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    parts = load_client_parts(model_path, config, torch.float32)
    ids = torch.randint(4, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    x = parts.embed_tokens(ids)
    positions = torch.arange(10).expand(2, 10)
    full = run(blocks, x, positions)

    caches = [KVCache(2, config.num_key_value_heads, 16, config.head_dim, torch.float32, "cpu") for _ in blocks]
    steps = [run(blocks, x[:, :4], positions[:, :4], caches=caches, start=0)]  # prefill
    for t in range(4, 10):
        steps.append(run(blocks, x[:, t : t + 1], positions[:, t : t + 1], caches=caches, start=t))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= ATOL


def test_left_padded_batch_matches_transformers_at_real_positions(model_path):
    config = load_config(model_path)
    blocks = load_blocks(model_path, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    parts = load_client_parts(model_path, config, torch.float32)
    ids, mask, positions = left_padded_batch(config.vocab_size)
    hidden, logits, _ = hf_reference(model_path, ids, mask, positions)
    real = mask.bool()

    ours = run(blocks, parts.embed_tokens(ids), positions, key_mask=real)  # run() asserts no NaN at every block
    assert (ours[real] - hidden[real]).abs().max() <= ATOL
    assert (parts.logits(ours)[real] - logits[real]).abs().max() <= ATOL

    # a pad query attends to itself alone (never to nothing: that is NaN on some SDPA kernels)
    alone = run(blocks, parts.embed_tokens(ids[:1, :3]).transpose(0, 1), positions[:1, :3].T)
    assert (ours[0, :3] - alone[:, 0]).abs().max() <= ATOL

    # the same batch decoded step by step, the key mask growing with the cache as a server keeps it
    caches = [KVCache(2, config.num_key_value_heads, 10, config.head_dim, torch.float32, "cpu") for _ in blocks]
    x = parts.embed_tokens(ids)
    steps = [run(blocks, x[:, :5], positions[:, :5], real[:, :5], caches, start=0)]
    for t in range(5, 10):
        steps.append(run(blocks, x[:, t : t + 1], positions[:, t : t + 1], real[:, : t + 1], caches, start=t))
    assert (torch.cat(steps, dim=1)[real] - hidden[real]).abs().max() <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_blocks_stay_close_and_finite(checkpoints, dtype):
    path = checkpoints("qwen2")
    config = load_config(path)
    ids, mask, positions = left_padded_batch(config.vocab_size)
    real = mask.bool()
    x = load_client_parts(path, config, torch.float32).embed_tokens(ids)
    reference_blocks = load_blocks(path, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    reference = run(reference_blocks, x, positions, real)

    blocks = load_blocks(path, config, 0, config.num_hidden_layers, dtype, progress=False)
    assert all(p.dtype == dtype for block in blocks for p in block.parameters())
    ours = run(blocks, x.to(dtype), positions, real)
    assert ours.dtype == dtype and ours.isfinite().all()
    assert (ours.float()[real] - reference[real]).abs().max() <= 0.05 * reference.abs().max()


def test_sharded_checkpoint_loads_only_the_shards_holding_the_block(checkpoints, monkeypatch):
    path = checkpoints("llama", max_shard_size="20KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    config = load_config(path)
    opened, real_safe_open = [], checkpoint.safe_open

    def recording_safe_open(file, *args, **kwargs):
        opened.append(file.name)
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "safe_open", recording_safe_open)

    block = load_block(path, config, 2, torch.float32)
    holding = {file for name, file in weight_map.items() if name.startswith("model.layers.2.")}
    assert set(opened) == holding and len(opened) == len(holding) < len(set(weight_map.values()))

    opened.clear()
    load_client_parts(path, config, torch.float32)
    holding = {weight_map[name] for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    assert set(opened) == holding

    # same seed, unsharded: the same weights
    unsharded = load_block(checkpoints("llama"), config, 2, torch.float32)
    state, expected = block.state_dict(), unsharded.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_block_index_out_of_range_is_a_clear_error(checkpoints):
    path = checkpoints("llama")
    config = load_config(path)
    with pytest.raises(ValueError, match="out of range"):
        load_block(path, config, config.num_hidden_layers, torch.float32)
    with pytest.raises(ValueError, match="out of range"):
        load_blocks(path, config, 2, config.num_hidden_layers + 1, torch.float32)


def test_kv_cache_overflow_is_a_clear_error():
    cache = KVCache(1, 2, 4, 8, torch.float32, "cpu")
    k = torch.zeros(1, 2, 3, 8)
    cache.update(0, k, k)
    with pytest.raises(ValueError, match="do not fit"):
        cache.update(3, k, k)


def test_unsupported_model_type_lists_supported_types(tmp_path):
    GPT2Config().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as error:
        load_config(tmp_path)
    assert "gpt2" in str(error.value) and all(name in str(error.value) for name in SUPPORTED_MODEL_TYPES)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        resolve_model_path(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        load_config("meadow-tests/surely-not-cached")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_tokenizer_round_trips_and_decodes_printable_text(checkpoints):
    path = checkpoints("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len("hello world")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    assert load_config(path).vocab_size >= len(tokenizer)
    # every token a random model may generate decodes to printable text (newline and tab aside)
    text = tokenizer.decode(list(range(len(tokenizer))), skip_special_tokens=True)
    assert len(text) == len(tokenizer) - 4 and text.replace("\n", "").replace("\t", "").isprintable()
