"""The HF-compatible client model against transformers running the same checkpoint. The blocks run in this
process (tests/local_sequence.py) behind the remote sequence's interface; real swarms are tested elsewhere."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

from local_sequence import LocalSequence
from meadow.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM


@dataclass
class Models:
    distributed: DistributedModelForCausalLM
    local: torch.nn.Module  # transformers' own model of the same checkpoint
    tokenizer: object
    sequence: LocalSequence

    def prompt(self, text: str = "A meadow of many machines") -> torch.Tensor:
        return self.tokenizer(text, return_tensors="pt")["input_ids"]


def load(path) -> Models:
    sequence = LocalSequence(path)
    distributed = AutoDistributedModelForCausalLM.from_pretrained(str(path), sequence=sequence)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Models(distributed, local, AutoTokenizer.from_pretrained(path), sequence)


@pytest.fixture(scope="module")
def llama(checkpoints) -> Models:
    return load(checkpoints("llama"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request, checkpoints) -> Models:
    """Llama (separate head) and Qwen2 (head tied to the embeddings, q/k/v bias)."""
    return load(checkpoints(request.param))


def new_sessions(models: Models, since: int) -> list:
    return models.sequence.sessions[since:]


def test_logits_and_loss_equal_transformers(family):
    input_ids = torch.randint(0, family.local.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = family.local(input_ids, labels=input_ids)
        got = family.distributed(input_ids, labels=input_ids)
    assert got.logits.shape == expected.logits.shape
    assert (got.logits - expected.logits).abs().max().item() <= 1e-4
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-4


def test_client_holds_embeddings_norm_and_head_only(family):
    names = [name for name, _ in family.distributed.named_parameters()]
    assert sorted(names) == sorted({"embed_tokens.weight", "norm.weight", "lm_head.weight"} & set(names))
    tied = family.local.config.tie_word_embeddings
    assert (family.distributed.lm_head.weight is family.distributed.embed_tokens.weight) == tied
    head = family.distributed.lm_head.weight  # column by column on a CPU (models/layout.py), the same values
    assert head.stride() == (1, head.shape[0]) and torch.equal(head, family.local.lm_head.weight)
    assert family.distributed.get_input_embeddings() is family.distributed.embed_tokens
    assert family.distributed.get_output_embeddings() is family.distributed.lm_head
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(family.distributed.generation_config, key) == getattr(family.local.generation_config, key)


def test_greedy_generation_is_identical_and_sends_each_token_once(family):
    input_ids = family.prompt()
    expected = family.local.generate(input_ids, max_new_tokens=12, do_sample=False)
    since = len(family.sequence.sessions)
    got = family.distributed.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)
    [session] = new_sessions(family, since)
    assert session.steps == [input_ids.shape[1]] + [1] * 11  # prefill, then one new token per step


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_sampling_with_a_seed_matches_transformers(llama, num_return_sequences):
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2)
    kwargs["num_return_sequences"] = num_return_sequences
    input_ids = llama.prompt("Sample")
    torch.manual_seed(7)
    expected = llama.local.generate(input_ids, **kwargs)
    torch.manual_seed(7)
    got = llama.distributed.generate(input_ids, **kwargs)
    assert torch.equal(got, expected)
    torch.manual_seed(8)
    assert not torch.equal(llama.distributed.generate(input_ids, **kwargs), expected)  # the seed matters


def first_new_token_not_seen_before(row: torch.Tensor, prompt_length: int, min_new: int) -> int:
    """A token that greedy decoding emits at new index >= min_new and not earlier: as eos, it stops there."""
    new = row[prompt_length:].tolist()
    return next(token for i, token in enumerate(new) if i >= min_new and token not in new[:i])


def test_repetition_penalty_min_new_tokens_and_eos_match_transformers(llama):
    input_ids = llama.prompt()
    base = dict(do_sample=False, repetition_penalty=1.3, max_new_tokens=24)
    free = llama.local.generate(input_ids, eos_token_id=None, **base)
    eos = first_new_token_not_seen_before(free[0], input_ids.shape[1], min_new=4)
    expected = llama.local.generate(input_ids, eos_token_id=eos, min_new_tokens=4, **base)
    got = llama.distributed.generate(input_ids, eos_token_id=eos, min_new_tokens=4, **base)
    assert torch.equal(got, expected)
    assert got[0, -1].item() == eos and got.shape[1] < input_ids.shape[1] + 24  # it did stop on eos


def test_left_padded_batch_matches_transformers(llama):
    tokenizer = llama.tokenizer
    inputs = tokenizer(["Hi", "A longer prompt than the first"], return_tensors="pt", padding=True, padding_side="left")
    mask = inputs["attention_mask"]
    assert (mask == 0).any()

    with torch.no_grad():  # forward: positions count real tokens only, as transformers' generate makes them
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = llama.local(**inputs, position_ids=positions).logits
        got = llama.distributed(**inputs).logits
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-4

    kwargs = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(llama.distributed.generate(**inputs, **kwargs), llama.local.generate(**inputs, **kwargs))

    # one row stops on eos while the other goes on: the finished row gets pad tokens, as in transformers
    free = llama.local.generate(**inputs, eos_token_id=None, **kwargs)
    eos = first_new_token_not_seen_before(free[0], mask.shape[1], min_new=2)
    assert eos not in free[1, mask.shape[1] :].tolist()
    expected = llama.local.generate(**inputs, eos_token_id=eos, **kwargs)
    got = llama.distributed.generate(**inputs, eos_token_id=eos, **kwargs)
    assert torch.equal(got, expected)
    assert got[0, -1].item() == tokenizer.pad_token_id


def test_left_padded_batch_chat_continues_with_the_extended_mask(llama):
    tokenizer = llama.tokenizer
    inputs = tokenizer(["Hi", "A longer prompt than the first"], return_tensors="pt", padding=True, padding_side="left")
    expected = llama.local.generate(**inputs, max_new_tokens=8, do_sample=False)
    with llama.distributed.inference_session(max_length=64, batch_size=2):
        ids = llama.distributed.generate(**inputs, max_new_tokens=4, do_sample=False)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
        with pytest.raises(ValueError, match="attention_mask disagrees"):
            llama.distributed.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4)  # pads would count
        ids = llama.distributed.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(ids, expected)


def test_chat_over_three_generate_calls_equals_one_generation(llama):
    input_ids = llama.prompt("Tell me")
    expected = llama.local.generate(input_ids, max_new_tokens=12, do_sample=False)
    since = len(llama.sequence.sessions)
    with llama.distributed.inference_session(max_length=64):
        ids = input_ids
        for _ in range(3):
            ids = llama.distributed.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(ids, expected)
    [session] = new_sessions(llama, since)  # one server-side session for the whole chat
    assert sum(session.steps) == ids.shape[1] - 1 and session.closed  # every token sent once; the last is never sent


def test_chat_with_user_turns_sends_only_the_new_text(llama):
    tokenizer = llama.tokenizer
    conversation = llama.prompt("User: hi\nBot:")
    since = len(llama.sequence.sessions)
    with llama.distributed.inference_session(max_length=128):
        for turn in ("", "\nUser: and then?\nBot:", "\nUser: bye\nBot:"):
            if turn:
                new = tokenizer(turn, add_special_tokens=False, return_tensors="pt")["input_ids"]
                conversation = torch.cat([conversation, new], dim=1)
            expected = llama.local.generate(conversation, max_new_tokens=5, do_sample=False)
            conversation = llama.distributed.generate(conversation, max_new_tokens=5, do_sample=False)
            assert torch.equal(conversation, expected)
    [session] = new_sessions(llama, since)
    assert sum(session.steps) == conversation.shape[1] - 1


def test_input_ids_not_extending_the_session_raise_value_error(llama):
    input_ids = llama.prompt()
    expected = llama.local.generate(input_ids, max_new_tokens=8, do_sample=False)
    with llama.distributed.inference_session(max_length=64):
        ids = llama.distributed.generate(input_ids, max_new_tokens=4, do_sample=False)
        with pytest.raises(ValueError, match="do not extend"):
            llama.distributed.generate(input_ids, max_new_tokens=4)  # started over instead of continuing
        edited = ids.clone()
        edited[0, 2] = (edited[0, 2] + 1) % llama.local.config.vocab_size
        with pytest.raises(ValueError, match="do not extend"):
            llama.distributed.generate(edited, max_new_tokens=4)  # history rewritten
        with pytest.raises(ValueError, match="do not extend"):
            llama.distributed(ids[:, :-1])  # no new token: everything was already processed
        with pytest.raises(ValueError, match="batch size"):
            llama.distributed(torch.cat([ids, ids]))
        ids = llama.distributed.generate(ids, max_new_tokens=4, do_sample=False)  # the session is still usable
    assert torch.equal(ids, expected)


def test_a_caller_reusing_its_input_ids_tensor_does_not_change_the_session(llama):
    input_ids = llama.prompt()
    expected = llama.local(input_ids).logits[:, -1]
    with llama.distributed.inference_session(max_length=64):
        buffer = input_ids[:, :-1].clone()
        llama.distributed(buffer)
        buffer.fill_(0)  # the caller's buffer, reused for something else: the servers still hold the prompt
        logits = llama.distributed(input_ids).logits[:, -1]
    assert torch.allclose(logits, expected, atol=1e-4)


def test_generate_outside_a_session_opens_one_sized_for_the_call_and_closes_it(llama):
    input_ids = llama.prompt()
    since = len(llama.sequence.sessions)
    llama.distributed.generate(input_ids, max_new_tokens=5, do_sample=False)
    [session] = new_sessions(llama, since)
    assert session.closed and session.max_length == input_ids.shape[1] + 5
    assert llama.distributed.session is None

    class FailingStreamer(BaseStreamer):
        def __init__(self):
            self.puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 3:  # the prompt, the first token, then fail mid-generation
                raise RuntimeError("streamer failed")

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="streamer failed"):
        llama.distributed.generate(input_ids, max_new_tokens=5, streamer=FailingStreamer())
    assert llama.sequence.sessions[-1].closed and llama.sequence.sessions[-1].steps
    assert llama.distributed.session is None


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
@pytest.mark.parametrize("lengths", [{"max_length": 15}, {}], ids=["max_length", "default"])
def test_length_settings_match_transformers(llama, lengths):
    input_ids = llama.prompt("Hi")
    expected = llama.local.generate(input_ids, do_sample=False, **lengths)
    got = llama.distributed.generate(input_ids, do_sample=False, **lengths)
    assert torch.equal(got, expected)
    assert llama.sequence.sessions[-1].max_length == expected.shape[1]  # what generate made: 15, or prompt + 20


def test_generate_without_cache_runs_full_passes(llama):
    input_ids = llama.prompt()
    sessions, passes = len(llama.sequence.sessions), llama.sequence.forward_calls
    expected = llama.local.generate(input_ids, max_new_tokens=5, do_sample=False, use_cache=False)
    got = llama.distributed.generate(input_ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(got, expected)
    assert len(llama.sequence.sessions) == sessions and llama.sequence.forward_calls == passes + 5


def test_beam_search_is_refused(llama):
    with pytest.raises(ValueError, match="only supports"):
        llama.distributed.generate(llama.prompt(), num_beams=2, max_new_tokens=3)
    assert llama.distributed.session is None


def test_text_streamer_prints_the_generated_text(llama, capsys):
    input_ids = llama.prompt()
    streamer = TextStreamer(llama.tokenizer, skip_prompt=True)
    got = llama.distributed.generate(input_ids, max_new_tokens=10, do_sample=False, streamer=streamer)
    printed = capsys.readouterr().out
    assert printed == llama.tokenizer.decode(got[0, input_ids.shape[1] :]) + "\n"
    assert printed.strip()


def test_text_iterator_streamer_yields_the_generated_text(llama):
    input_ids = llama.prompt()
    streamer = TextIteratorStreamer(llama.tokenizer, skip_prompt=True, timeout=60)
    result = {}
    kwargs = dict(max_new_tokens=10, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=lambda: result.update(ids=llama.distributed.generate(input_ids, **kwargs)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == llama.tokenizer.decode(result["ids"][0, input_ids.shape[1] :]) and text
