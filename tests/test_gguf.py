"""GGUF files: Meadow's loading (a span's tensors dequantized with gguf-py, q/k rows un-permuted, the client's parts)
against transformers' own loading of the same file, per quant type, through a swarm, and on the default model."""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from local_sequence import LocalSequence

from conftest import start_swarm
from meadow import AutoDistributedModelForCausalLM
from meadow.models import (
    UnsupportedModelError,
    default_model_path,
    load_block,
    load_blocks,
    load_client_parts,
    load_config,
    load_reference_model,
    load_tokenizer,
    resolve_model_path,
)
from meadow.models import gguf
from meadow.models.checkpoint import ModelFacts, model_facts
from meadow.models.tiny import make_tiny_gguf
from meadow.swarm import dht_prefix_for

# gguf-py quantizes F16, BF16 and Q*_0/Q*_1 but not the K-quants: their tiny files hold random blocks
QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def tiny_gguf(checkpoints, tmp_path_factory):
    """quant -> a tiny Llama GGUF, alone in its folder. Rows of 256 values: the K-quants' block size."""
    checkpoint = checkpoints("llama", hidden_size=256, intermediate_size=256, num_heads=4, num_kv_heads=2)
    made = {}

    def get(quant: str, **kwargs):
        if (quant, *kwargs.items()) not in made:
            path = tmp_path_factory.mktemp(f"gguf-{quant}") / f"tiny-{quant}.gguf"
            made[(quant, *kwargs.items())] = make_tiny_gguf(checkpoint, path, quant, **kwargs)
        return made[(quant, *kwargs.items())]

    return get


def random_ids(vocab_size: int, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quant", QUANTS)
def test_blocks_and_client_parts_equal_transformers(tiny_gguf, quant):
    path = tiny_gguf(quant)
    local = load_reference_model(path)  # transformers dequantizes with gguf-py too
    ours = AutoDistributedModelForCausalLM.from_pretrained(path, sequence=LocalSequence(path))
    ids = random_ids(local.config.vocab_size)
    with torch.no_grad():
        expected, got = local(ids).logits, ours(ids).logits
    assert expected.abs().max() > 0.1  # a model whose weights dequantized to ~0 would make this test pass
    assert (got - expected).abs().max().item() <= 1e-4
    expected = local.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, do_sample=False), expected)


@pytest.mark.parametrize("quant", ["F16", "Q4_K"])
def test_a_gguf_files_facts_are_its_parameter_count_and_the_type_most_are_stored_in(tiny_gguf, quant):
    path = tiny_gguf(quant)  # these files name no file type: their weights' type is what most parameters have
    parameters = load_reference_model(path).num_parameters()
    assert model_facts(path) == ModelFacts("gguf", parameters, quant, path.stat().st_size)


@pytest.mark.parametrize("count, shown", [(134_515_008, "134.52M"), (7_241_732_096, "7.2B"), (8_000_000_000, "8B"),
                                          (1_500_000, "1.5M"), (12_300, "12K"), (999, "999")])  # fmt: skip
def test_a_parameter_count_reads_as_ollama_shows_it(count, shown):
    assert ModelFacts("gguf", count, "F16", 0).parameter_size == shown


def test_folder_holding_a_gguf_is_the_gguf(tiny_gguf):
    path = tiny_gguf("Q8_0")
    assert resolve_model_path(path.parent) == resolve_model_path(path) == path.resolve()
    assert dht_prefix_for(path.parent) == dht_prefix_for(path) == "tiny-Q8_0"
    assert load_tokenizer(path.parent)("Hi").input_ids == load_tokenizer(path)("Hi").input_ids


def test_swarm_serving_a_gguf_equals_transformers(tiny_gguf):
    path = tiny_gguf("Q4_K")
    swarm = start_swarm(path.parent, ["0:2", "2:4"])  # servers given the folder, the client the file: one swarm
    try:
        distributed = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers)
        local = load_reference_model(path)
        ids = random_ids(local.config.vocab_size)
        with torch.no_grad():
            expected, got = local(ids).logits, distributed(ids).logits
        assert (got - expected).abs().max().item() <= 1e-4
        expected = local.generate(ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(distributed.generate(ids, max_new_tokens=10, do_sample=False), expected)
        distributed.sequence.close()
    finally:
        swarm.stop()


def test_a_block_dequantizes_only_its_own_tensors(tiny_gguf, monkeypatch):
    path = tiny_gguf("Q4_0")
    config = load_config(path)
    calls = []
    monkeypatch.setattr(gguf, "dequantize", lambda data, qtype: calls.append(qtype) or dequantize(data, qtype))
    load_block(path, config, 2, torch.float32)
    assert len(calls) == 9  # two norms, q, k, v, o, gate, up, down: nothing of the other blocks
    calls.clear()
    load_client_parts(path, config, torch.float32)
    assert len(calls) == 3  # embeddings, final norm, head (this file's head is not tied)


def test_reader_that_skips_the_vocabulary_reads_all_else_as_gguf_py(tiny_gguf):
    path = tiny_gguf("Q4_K")
    ours, theirs = gguf.BlocksReader(path), GGUFReader(path)
    assert "tokenizer.ggml.tokens" in ours.skipped and ours.data_offset == theirs.data_offset
    kept = {name: (field.types, field.contents()) for name, field in theirs.fields.items() if name not in ours.skipped}
    assert {name: (field.types, field.contents()) for name, field in ours.fields.items() if name in kept} == kept
    assert len(theirs.fields["tokenizer.ggml.token_type"].contents()) == load_config(path).vocab_size  # a numeric array
    assert [(t.name, t.tensor_type, t.data.shape, t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.data.shape, t.data_offset) for t in theirs.tensors
    ]
    assert all((a.data == b.data).all() for a, b in zip(ours.tensors, theirs.tensors))
    with pytest.raises(KeyError, match="skips"):
        gguf.metadata(path, "tokenizer.ggml.tokens")


def test_quant_type_gguf_py_cannot_dequantize_is_named_with_its_tensor(tiny_gguf):
    path = tiny_gguf("Q8_K")
    config = load_config(path)  # the metadata is fine; only the tensors cannot be read
    with pytest.raises(ValueError, match=r"blk\.1\.attn_q\.weight is stored as Q8_K"):
        load_block(path, config, 1, torch.float32)
    with pytest.raises(ValueError, match=r"token_embd\.weight is stored as Q8_K"):
        load_client_parts(path, config, torch.float32)


def test_unsupported_gguf_architecture_is_refused_by_name(tiny_gguf):
    path = tiny_gguf("F32", architecture="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported: llama"):
        load_config(path)


# The default model: SmolLM2-135M-Instruct, Q4_1 (Q8_0 embeddings), 30 blocks, tied head, chat template.


@pytest.fixture(scope="module")
def smollm():
    path = default_model_path()
    return path, load_reference_model(path)  # transformers dequantizes the whole file itself


def test_default_model_blocks_and_head_equal_transformers(smollm):
    path, local = smollm
    config = load_config(path)
    parts = load_client_parts(path, config, torch.float32)
    assert config.tie_word_embeddings and parts.lm_head.weight is parts.embed_tokens.weight
    first = load_blocks(path, config, 0, 3, torch.float32, progress=False)
    last = load_blocks(path, config, 27, 30, torch.float32, progress=False)
    ids = random_ids(config.vocab_size)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        out = local(ids, output_hidden_states=True)
        hidden = out.hidden_states  # [i] is block i's input for i < 30; [30] is already normed
        x = parts.embed_tokens(ids)
        assert (x - hidden[0]).abs().max().item() <= 1e-4
        for block in first:
            x = block(x, positions)
        assert (x - hidden[3]).abs().max().item() <= 1e-4
        x = hidden[27]
        for block in last:
            x = block(x, positions)
        assert (parts.logits(x) - out.logits).abs().max().item() <= 1e-4


def test_default_model_facts_are_its_parameter_count_and_file_type(smollm):
    path, local = smollm  # its file names its type: Q4_1
    assert model_facts(path) == ModelFacts("gguf", local.num_parameters(), "Q4_1", path.stat().st_size)


@pytest.fixture(scope="module")
def smollm_swarm(smollm):
    path, _ = smollm
    load_tokenizer(path)  # converts the tokenizer and config once, before the servers start together
    swarm = start_swarm(path, ["0:10", "10:20", "20:30"])
    try:
        yield swarm
    finally:
        swarm.stop()


def test_default_model_swarm_answers_like_transformers(smollm, smollm_swarm):
    path, local = smollm
    tokenizer = load_tokenizer(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    distributed = AutoDistributedModelForCausalLM.from_pretrained(path, smollm_swarm.initial_peers)
    try:
        expected = local.generate(ids, max_new_tokens=12, do_sample=False)
        got = distributed.generate(ids, max_new_tokens=12, do_sample=False)
    finally:
        distributed.sequence.close()
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0, ids.shape[1] :])
