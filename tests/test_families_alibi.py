"""BLOOM and Falcon (ALiBi and rotary, every Falcon layout) against transformers: blocks, KV-cache decoding with left
padding, packed batches, and end to end through a real 2-server swarm on 127.0.0.1 (logits, greedy tokens, gradients,
deep prompts, client LoRA)."""

from __future__ import annotations

import functools
import signal

import pytest
import torch
from conftest import start_swarm
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, FalconConfig
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.client.model import positions_from_mask
from meadow.client.tuning import ClientLora
from meadow.local_swarm import LocalSwarm
from meadow.models import (
    KVCache,
    UnsupportedModelError,
    load_blocks,
    load_client_parts,
    load_config,
    load_reference_model,
)
from meadow.models.alibi import alibi_slopes
from meadow.models.attention import Part
from meadow.models.bloom import LORA_PATHS
from meadow.models.falcon import FalconConfig as MeadowFalconConfig
from meadow.models.gguf import open_gguf
from meadow.models.tiny import make_tiny_gguf

ATOL = 1e-4
# name -> (family, make_tiny_checkpoint kwargs)
VARIANTS = {
    "bloom": ("bloom", {"num_heads": 6, "hidden_size": 48}),  # 6 heads: slopes past a power of two
    "falcon-7b": ("falcon", {}),  # multi-query, one input_layernorm, parallel attention + MLP, rotary, tied head
    "falcon-new-alibi": (  # new decoder architecture: 2 kv groups of 4 heads, ln_attn/ln_mlp; ALiBi, biases, own head
        "falcon",
        {"new_decoder_architecture": True, "alibi": True, "bias": True, "num_heads": 8, "num_kv_heads": 2,
         "tie_word_embeddings": False},
    ),  # fmt: skip
    "falcon-sequential": ("falcon", {"parallel_attn": False, "multi_query": False, "bias": True}),
}
SWARM_VARIANTS = ["bloom", "falcon-7b", "falcon-new-alibi"]
LORA_TARGETS = list(LORA_PATHS)  # peft's targets for both families: query_key_value, dense, dense_h_to_4h, dense_4h_to_h


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@functools.cache
def hf_model(path):
    # transformers' default attention: its eager Falcon path adds the ALiBi bias twice (once in the mask), SDPA's once
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def left_padded_batch(vocab_size, pads=(3, 0), length=10):
    """ids and attention mask of a left-padded batch."""
    ids = torch.randint(4, vocab_size, (len(pads), length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 3, 0
    return ids, mask


def hf_reference(path, ids, mask=None):
    """transformers' hidden state after the last block (ln_f's input) and its logits."""
    model, captured = hf_model(path), {}
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, out: captured.update(hidden=args[0]))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    hook.remove()
    return captured["hidden"], logits


def run(blocks, x, position_ids, key_mask=None, caches=None, start=0):
    with torch.no_grad():
        for i, block in enumerate(blocks):
            x = block(x, position_ids, key_mask, cache=caches[i] if caches else None, start=start)
            assert not x.isnan().any()
    return x


def variant_path(checkpoints, name):
    family, kwargs = VARIANTS[name]
    return checkpoints(family, **kwargs)


@pytest.fixture(scope="module", params=list(VARIANTS))
def local_model(request, checkpoints):
    """(path, config, blocks, client parts) of one variant, all blocks loaded in float32."""
    path = variant_path(checkpoints, request.param)
    config = load_config(path)
    blocks = load_blocks(path, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    return path, config, blocks, load_client_parts(path, config, torch.float32)


def test_alibi_slopes_are_transformers_for_any_head_count():
    for heads in range(1, 41):
        assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu"))), heads


def test_blocks_and_client_parts_match_transformers_with_and_without_padding(local_model):
    path, config, blocks, parts = local_model
    ids, mask = left_padded_batch(config.vocab_size)
    for key_mask in (None, mask.bool()):
        hidden, logits = hf_reference(path, ids, None if key_mask is None else mask)
        positions = torch.arange(10).expand(2, 10) if key_mask is None else positions_from_mask(key_mask)
        ours = run(blocks, parts.embed(ids), positions, key_mask)
        real = mask.bool() if key_mask is not None else torch.ones_like(mask, dtype=torch.bool)
        assert (ours[real] - hidden[real]).abs().max() <= ATOL
        assert (parts.logits(ours)[real] - logits[real]).abs().max() <= ATOL


def test_kv_cache_decoding_of_a_left_padded_batch_equals_transformers(local_model):
    path, config, blocks, parts = local_model
    ids, mask = left_padded_batch(config.vocab_size)
    real, positions = mask.bool(), positions_from_mask(mask.bool())
    hidden, _ = hf_reference(path, ids, mask)
    caches = [KVCache(2, config.num_key_value_heads, 12, config.head_dim, torch.float32, "cpu") for _ in blocks]
    x = parts.embed(ids)
    steps = [run(blocks, x[:, :5], positions[:, :5], real[:, :5], caches, start=0)]
    for t in range(5, 10):  # the key mask grows with the cache, as a server keeps it
        steps.append(run(blocks, x[:, t : t + 1], positions[:, t : t + 1], real[:, : t + 1], caches, start=t))
    assert (torch.cat(steps, dim=1)[real] - hidden[real]).abs().max() <= ATOL


def test_packed_sessions_equal_each_run_alone(local_model):
    _, config, blocks, parts = local_model
    block = blocks[0]
    ids, mask = left_padded_batch(config.vocab_size)
    x, real, positions = parts.embed(ids), mask.bool(), positions_from_mask(mask.bool())

    def cache(rows):
        return KVCache(rows, config.num_key_value_heads, 12, config.head_dim, torch.float32, "cpu")

    # session a (left-padded, 2 rows) has 6 tokens cached and sends 1; session b (1 row, no padding) sends 4 fresh
    alone_a, alone_b, packed_a, packed_b = cache(2), cache(1), cache(2), cache(1)
    with torch.no_grad():
        for c in (alone_a, packed_a):
            block(x[:, :6], positions[:, :6], real[:, :6], cache=c, start=0)
        expected_a = block(x[:, 6:7], positions[:, 6:7], real[:, :7], cache=alone_a, start=6)
        expected_b = block(x[1:, :4], positions[1:, :4], cache=alone_b, start=0)
        packed_x = torch.cat([x[:, 6:7].reshape(1, -1, config.hidden_size), x[1:, :4]], dim=1)
        packed_positions = torch.cat([positions[:, 6:7].reshape(1, -1), positions[1:, :4]], dim=1)
        parts_ = [Part(2, 1, 6, real[:, :7], packed_a), Part(1, 4, 0, None, packed_b)]
        out = block(packed_x, packed_positions, parts=parts_)
    assert (out[0, :2] - expected_a.reshape(2, -1)).abs().max() <= ATOL
    assert (out[0, 2:] - expected_b[0]).abs().max() <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_blocks_stay_close_and_finite(local_model, dtype):
    path, config, reference_blocks, parts = local_model
    ids, mask = left_padded_batch(config.vocab_size)
    real, positions = mask.bool(), positions_from_mask(mask.bool())
    x = parts.embed(ids)
    reference = run(reference_blocks, x, positions, real)
    blocks = load_blocks(path, config, 0, config.num_hidden_layers, dtype, progress=False)
    ours = run(blocks, x.to(dtype), positions, real)
    assert ours.dtype == dtype and ours.isfinite().all()
    assert (ours.float()[real] - reference[real]).abs().max() <= 0.05 * reference.abs().max()


def test_client_lora_without_targets_takes_peft_defaults(local_model):
    _, config, _, _ = local_model
    lora = ClientLora.from_peft_config(config, LoraConfig(r=4))
    assert {module for _, module in lora.keys} == {"query_key_value"}  # peft's default for BLOOM and Falcon
    with pytest.raises(ValueError, match="regex"):
        ClientLora.from_peft_config(config, LoraConfig(r=4, target_modules=".*dense"))


def test_falcon_layouts_transformers_cannot_run_are_clear_errors():
    with pytest.raises(UnsupportedModelError, match="parallel"):
        MeadowFalconConfig.from_hf(FalconConfig(new_decoder_architecture=True, parallel_attn=False))
    with pytest.raises(UnsupportedModelError, match="num_ln_in_parallel_attn"):
        MeadowFalconConfig.from_hf(FalconConfig(num_ln_in_parallel_attn=2))


# llama.cpp writes Falcon as Falcon-7B's layout only (an MLP of 4 x hidden): the only one transformers reads back
GGUF_VARIANTS = {"bloom": ("bloom", VARIANTS["bloom"][1]), "falcon-7b": ("falcon", {"intermediate_size": 256})}


@pytest.mark.parametrize("name", list(GGUF_VARIANTS))
def test_gguf_files_equal_transformers_reading_them(name, checkpoints, tmp_path):
    """llama.cpp's BLOOM and Falcon files (BLOOM's query_key_value regrouped as all q | all k | all v): Meadow's
    blocks and client parts against transformers' own loading of the file; BLOOM's also through a 2-server swarm."""
    family, kwargs = GGUF_VARIANTS[name]
    path = make_tiny_gguf(checkpoints(family, **kwargs), tmp_path / f"{name}.gguf")
    config = load_config(path)
    blocks = load_blocks(path, config, 0, config.num_hidden_layers, torch.float32, progress=False)
    parts, local = load_client_parts(path, config, torch.float32), load_reference_model(path)
    ids, mask = left_padded_batch(config.vocab_size)
    captured = {}
    hook = local.transformer.ln_f.register_forward_hook(lambda module, args, out: captured.update(hidden=args[0]))
    with torch.no_grad():
        logits = local(ids, attention_mask=mask).logits
    hook.remove()
    ours = run(blocks, parts.embed(ids), positions_from_mask(mask.bool()), mask.bool())
    real = mask.bool()
    assert (ours[real] - captured["hidden"][real]).abs().max() <= ATOL
    assert (parts.logits(ours)[real] - logits[real]).abs().max() <= ATOL
    if family != "bloom":
        return
    # the file's rows are regrouped, so the comparison above checked that Meadow undoes that
    stored = {t.name: t for t in open_gguf(path).tensors}["blk.0.attn_qkv.weight"]
    assert not torch.equal(torch.tensor(stored.data), local.transformer.h[0].self_attention.query_key_value.weight)

    swarm = start_swarm(path.parent, ["0:2", "2:4"], "--throughput", "1000")
    try:
        distributed = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers)
        prompt = ids[1:, :5]
        assert torch.equal(distributed.generate(prompt, max_new_tokens=8, do_sample=False),
                           local.generate(prompt, max_new_tokens=8, do_sample=False))  # fmt: skip
        distributed.sequence.close()
    finally:
        swarm.stop()


# ---- end to end through a real swarm: blocks 0:2 and 2:4 on two servers ----


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    """Per swarm variant, a peft adapter folder "tiny-adapter" with peft's default targets for the family (random)."""
    folders = {}
    for name in SWARM_VARIANTS:
        base = AutoModelForCausalLM.from_pretrained(variant_path(checkpoints, name), dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8))  # targets: peft's for the model type
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # peft starts B at zero, which would make the test pass trivially
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        folders[name] = tmp_path_factory.mktemp(name) / "tiny-adapter"
        peft_model.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def swarm(checkpoints, adapters):
    """One DHT and, for each swarm variant, two servers (blocks 0:2 and 2:4, serving its adapter too) under the
    variant's name, all started at once (one swarm start instead of three)."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        servers = [
            swarm.start_server(variant_path(checkpoints, name), "--blocks", span, "--dht-prefix", name,
                               "--adapters", str(adapters[name]), *throughput, wait=False)  # fmt: skip
            for name in SWARM_VARIANTS
            for span in ("0:2", "2:4")
            # BLOOM's servers measure their speed with its blocks; the others announce one and start sooner
            for throughput in [() if name == "bloom" else ("--throughput", "1000")]
        ]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        yield swarm
    finally:
        for server in swarm.servers:  # all begin their graceful exit at once, not one after the other's
            if server.popen.poll() is None:
                server.popen.send_signal(signal.SIGTERM)
        swarm.stop()


@pytest.fixture(params=SWARM_VARIANTS)
def swarm_model(request, swarm, checkpoints):
    return variant_path(checkpoints, request.param), swarm, request.param


def connect(path, swarm, name, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(path), swarm.initial_peers, dht_prefix=name, client_config=ClientConfig(wait_for_servers=10.0), **kwargs
    )


def test_swarm_logits_greedy_tokens_and_session_steps_equal_transformers(swarm_model):
    path, swarm, name = swarm_model
    local, model = hf_model(path), connect(path, swarm, name)
    ids, mask = left_padded_batch(local.config.vocab_size)
    real = mask.bool()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        expected = local(ids, attention_mask=mask).logits
    assert (got[real] - expected[real]).abs().max() <= ATOL

    prompt = ids[1:, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                       local.generate(prompt, max_new_tokens=8, do_sample=False))  # fmt: skip

    # the KV-cache session path: a prefill then one token at a time gives the full forward's logits
    full = expected[1:]
    with torch.no_grad(), model.inference_session(max_length=16):
        steps = [model(input_ids=ids[1:, :4]).logits]
        steps += [model(input_ids=ids[1:, : t + 1]).logits for t in range(4, 10)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= ATOL
    model.close()


def test_swarm_gradients_and_deep_prompts_equal_transformers(swarm_model):
    path, swarm, name = swarm_model
    local = hf_model(path)
    model = connect(path, swarm, name, tuning_mode="deep_ptune", pre_seq_len=3)
    prompts = model.prompts
    with torch.no_grad():  # not the zero init: prompts that change something
        prompts.prefix.normal_(0, 0.5)
        prompts.deep.normal_(0, 0.5)
    ids, mask = left_padded_batch(local.config.vocab_size)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, attention_mask=mask)
    loss = (out.logits[mask.bool()] ** 2).mean()  # any scalar of the real positions' logits
    loss.backward()

    prefix, deep = (p.detach().clone().requires_grad_() for p in (prompts.prefix, prompts.deep))
    local_embeds = local.get_input_embeddings()(ids).detach().requires_grad_()
    logits = prompted_reference(local, local_embeds, mask, prefix, deep)
    (logits[mask.bool()] ** 2).mean().backward()

    assert (out.logits - logits)[mask.bool()].abs().max() <= ATOL
    assert relative_error(embeds.grad, local_embeds.grad) <= 1e-4
    assert relative_error(prompts.prefix.grad, prefix.grad) <= 1e-4
    assert relative_error(prompts.deep.grad, deep.grad) <= 1e-4
    assert deep.grad[0].abs().sum() > 0 and deep.grad[-1].abs().sum() > 0  # both servers sent their part
    model.close()


def prompted_reference(local, embeds, mask, prefix, deep):
    """transformers with the prompt before every row as the first block's input (after BLOOM's embedding norm, as
    Meadow's client puts it) and each layer's deep prompt added to the prefix positions before that layer."""
    rows, prefix_length = embeds.shape[0], prefix.shape[0]
    full_mask = torch.cat([torch.ones(rows, prefix_length, dtype=mask.dtype), mask], dim=1)
    extra = {}
    if local.config.model_type == "falcon":  # its rotary positions: the prompt's, then the real tokens' after it
        extra["position_ids"] = torch.cat(
            [torch.arange(prefix_length).expand(rows, -1), positions_from_mask(mask.bool()) + prefix_length], dim=1
        )
    hooks = []
    if hasattr(local.transformer, "word_embeddings_layernorm"):  # the prompt skips the embedding norm
        hooks.append(local.transformer.word_embeddings_layernorm.register_forward_hook(
            lambda module, args, out: torch.cat([prefix.expand(rows, -1, -1), out[:, prefix_length:]], dim=1)))  # fmt: skip
    for index, layer in enumerate(local.transformer.h):

        def add_prompt(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            hidden = torch.cat([hidden[:, :prefix_length] + deep[index], hidden[:, prefix_length:]], dim=1)
            return (hidden, *args[1:]), kwargs

        hooks.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        inputs = torch.cat([prefix.expand(rows, -1, -1), embeds], dim=1)
        return local(inputs_embeds=inputs, attention_mask=full_mask, **extra).logits[:, prefix_length:]
    finally:
        for hook in hooks:
            hook.remove()


def test_swarm_client_lora_on_peft_targets_equals_peft(swarm_model):
    path, swarm, name = swarm_model
    config = LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS)
    model = connect(path, swarm, name, lora=config)
    local = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config)
    generator = torch.Generator().manual_seed(2)
    layers = {}
    for (block, module), (A, B) in zip(model.lora.keys, model.lora.pairs()):
        with torch.no_grad():  # peft starts B at zero, which would make the test pass trivially
            A.copy_(torch.randn(A.shape, generator=generator) * 0.2)
            B.copy_(torch.randn(B.shape, generator=generator) * 0.2)
        layer = layers[block, module] = local.get_submodule(f"base_model.model.transformer.h.{block}.{LORA_PATHS[module]}")
        layer.lora_A["default"].weight.data.copy_(A.data)
        layer.lora_B["default"].weight.data.copy_(B.data)
    assert len(layers) == 4 * len(LORA_TARGETS)

    ids = torch.randint(4, 90, (2, 10), generator=generator)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    expected = local(input_ids=ids, labels=ids)
    expected.loss.backward()
    assert (out.logits - expected.logits).abs().max() <= ATOL
    for (block, module), (A, B) in zip(model.lora.keys, model.lora.pairs()):
        layer = layers[block, module]
        assert relative_error(A.grad, layer.lora_A["default"].weight.grad) <= 1e-4, (block, module)
        assert relative_error(B.grad, layer.lora_B["default"].weight.grad) <= 1e-4, (block, module)

    local.eval()
    prompt = ids[:1, :5]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       local.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))  # fmt: skip
    model.close()


def test_swarm_served_adapter_with_peft_default_targets_equals_peft(swarm_model, adapters):
    path, swarm, name = swarm_model
    model = connect(path, swarm, name, active_adapter="tiny-adapter")
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapters[name])
    local.eval()
    ids = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = model(ids).logits, local(ids).logits
        assert (got - expected).abs().max() <= ATOL
        assert (expected - hf_model(path)(ids).logits).abs().max() > 1e-2  # the adapter changes the logits
    model.close()
