"""gpt-oss's replies (harmony's channels) read into the think-block form, token by token, as the API and `meadow chat`
read them: its reasoning apart from its answer, no markup shown."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from meadow.api.generation import Sampling, TextGeneration
from meadow.api.json_mode import token_texts
from meadow.api.tool_calls import DESCRIBED, HARMONY, Tool, dialect_of, read_reply, toolbox
from meadow.client.chat import ReplyPrinter, ThoughtsApart
from meadow.client.chat_prompt import chat_prompt_ids
from meadow.client.harmony import MARKUP, as_think_blocks, begins_thinking, markup_ids, reply_reader, speaks_harmony
from meadow.client.reasoning import ThinkingReader, opens_thinking, split_reasoning, thinks
from meadow.models import load_reference_model, load_tokenizer
from meadow.models.tiny import HARMONY_TEMPLATE, make_tokenizer

HI = [{"role": "user", "content": "Capital of France?"}]
ANALYSIS, FINAL = "<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>final<|message|>"
CALLED = '<tool_call>\n{"name": "lookup", "arguments": {"city": "Paris"}'
REPLIES = [  # (the channel the prompt opens, the reply as the model writes it, (reasoning, answer))
    (None, f"{ANALYSIS}The user asks.<|end|>{FINAL}Paris.<|return|>", ("The user asks.", "Paris.")),
    ("analysis", f"The user asks.<|end|>{FINAL}Paris.", ("The user asks.", "Paris.")),  # the prompt opened it
    ("final", "Paris.", ("", "Paris.")),
    (None, f"{ANALYSIS}Cut off by max_tokens", ("Cut off by max_tokens", "")),
    # two messages of reasoning are one; a preamble (commentary without a recipient) and the final answer are the
    # answer; reasoning after the answer began is not shown
    (None, f"{ANALYSIS}A.<|end|><|start|>assistant{ANALYSIS}B.<|end|><|start|>assistant<|channel|>commentary"
           f"<|message|>Let me look.<|end|><|start|>assistant{ANALYSIS}C.<|end|>{FINAL}Paris.",
     ("A.\n\nB.", "Let me look.\n\nParis.")),  # fmt: skip
    # a call of a function reads as Hermes writes it (the <|call|> that ends it ends the reply, so is not read);
    # a call of a tool built into gpt-oss's runtime is not shown
    (None, f'{ANALYSIS}Look it up.<|end|><|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>'
           'json<|message|>{"city": "Paris"}', ("Look it up.", CALLED)),
    (None, f"{ANALYSIS}Search.<|end|><|start|>assistant<|channel|>analysis to=browser.search<|message|>"
           '{"query": "Paris"}<|call|>', ("Search.", "")),  # fmt: skip
    (None, "<|channel|>final<|message|>No <think> here.", ("", "No <think> here.")),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(harmony=True)


def reply_ids(tokenizer, reply: str) -> list[int]:
    return tokenizer(reply, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("channel, reply, expected", REPLIES)
def test_a_harmony_reply_reads_as_reasoning_and_answer_token_by_token(tokenizer, channel, reply, expected):
    prompt = chat_prompt_ids(tokenizer, HI, **({"channel": channel} if channel else {}))
    inside = opens_thinking(tokenizer, prompt)
    assert inside == (channel == "analysis")
    read, ids = reply_reader(tokenizer, prompt), reply_ids(tokenizer, reply)
    texts = [read(ids[:n]) for n in range(len(ids) + 1)]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))  # it only grows: streamable
    assert split_reasoning(texts[-1], inside) == expected
    reader, got = ThinkingReader(inside), ["", ""]
    for earlier, later in zip(texts, texts[1:]):
        thought, answer = reader.feed(later[len(earlier) :])
        got = [got[0] + thought, got[1] + answer]
    rest = reader.rest()
    assert (got[0] + rest[0], got[1] + rest[1]) == expected
    assert not any(mark in got[0] + got[1] for mark in MARKUP) and "assistant" not in got[0] + got[1]


def test_a_call_reads_as_the_apis_readers_read_calls_and_its_form_is_held_to_the_tools(tokenizer):
    """gpt-oss's template shows tools, so its calls are HARMONY's: read from the reply's text (in the Hermes form), and
    held, as the reply is written in harmony's markup, to a tool's name and parameters once the reply opens a call
    outside its reasoning (or at once, when a call is required)."""
    assert dialect_of(tokenizer.chat_template) is HARMONY
    assert dialect_of(HARMONY_TEMPLATE.replace("tools", "x")) is DESCRIBED  # a harmony template that shows no tools
    content, (call,) = read_reply(REPLIES[5][2][1], HARMONY)
    assert (content, call.name, call.arguments, call.text) == ("", "lookup", {"city": "Paris"}, '{"city": "Paris"}')
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": False}  # fmt: skip
    lookup = Tool.model_validate({"function": {"name": "lookup", "parameters": city}})
    box = replace(toolbox([lookup], None, None).speaking(HARMONY), thinking="may")  # as a reasoning model's request
    written = REPLIES[5][1]
    assert box.prefix().fed(written).finished  # whole: the reply ends
    assert box.prefix().fed(written.replace("lookup", "look")) is None  # no such tool
    assert box.prefix().fed(written.replace('"city"', '"town"')) is None  # no such parameter
    assert not box.prefix().fed(f"{ANALYSIS}Not {HARMONY.marker}nope <|end|>").finished  # reasoning: only text
    required = toolbox([lookup], "required", None).speaking(HARMONY).prefix()
    assert required.fed("<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{") is not None
    assert required.fed(ANALYSIS) is None and required.fed("<|channel|>final") is None


def test_the_markup_is_text_a_call_may_be_written_in_even_where_the_tokenizer_counts_it_special(tokenizer):
    listed = make_tokenizer(harmony=True)
    listed.add_special_tokens({"additional_special_tokens": list(MARKUP)})  # as some of gpt-oss's tokenizer files do
    assert set(markup_ids(listed)) <= set(listed.all_special_ids)
    texts = token_texts(listed)
    assert [texts[i] for i in markup_ids(listed)] == list(MARKUP) and texts[listed.eos_token_id] is None


def test_what_the_prompt_wrote_before_the_reply_is_not_the_replys():
    """Earlier turns in the prompt's end (a user message, an earlier reply's reasoning and answer) neither open a think
    block nor begin an answer for the reply."""
    earlier = f"{FINAL}Hi.<|end|><|start|>user<|message|>Why?<|end|><|start|>assistant"
    for prompt in ("<|start|>user<|message|>Why?<|end|><|start|>assistant", f"{ANALYSIS}Old.<|end|>{earlier}"):
        text = prompt + f"{ANALYSIS}New.<|end|>{FINAL}Because."
        assert as_think_blocks(text, len(prompt)) == "<think>New.</think>Because."
        assert not begins_thinking(prompt) and begins_thinking(prompt + ANALYSIS)
    assert as_think_blocks(f"{FINAL}Sure, the", len(FINAL) + 5) == " the"  # a reply that goes on the prompt's text


def test_only_harmony_prompts_are_read_so(tokenizer):
    assert speaks_harmony(tokenizer.chat_template) and thinks(tokenizer.chat_template)
    assert not speaks_harmony(make_tokenizer().chat_template) and not speaks_harmony("{{ '</think>' }}")
    ids = reply_ids(tokenizer, f"{ANALYSIS}x<|end|>")
    raw = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]  # a raw completion's prompt: a plain decode
    assert reply_reader(tokenizer, raw)(ids) == "analysisx" == tokenizer.decode(ids, skip_special_tokens=True)
    plain = make_tokenizer()  # no markup at all
    assert reply_reader(plain, chat_prompt_ids(plain, HI))(reply_ids(plain, "Hi.")) == "Hi."


def test_meadow_chat_shows_the_thinking_apart_and_no_markup(tokenizer):
    """`meadow chat`'s printer, given the prompt and then the reply's tokens one by one (as generate's streamer)."""
    prompt = chat_prompt_ids(tokenizer, HI)
    shown: list[str] = []
    write = ThoughtsApart(lambda text: shown.append(text), opens_thinking(tokenizer, prompt), dim=False)
    printer = ReplyPrinter(tokenizer, write)
    printer.put(prompt)
    ids = reply_ids(tokenizer, REPLIES[0][1])
    for token in ids:
        printer.put(torch.tensor([token]))
    reply = printer.finish(torch.tensor(ids))
    write("", last=True)
    assert "".join(shown) == "Thinking...\nThe user asks.\n...done thinking.\n\nParis."
    assert split_reasoning(reply) == ("The user asks.", "Paris.")


def test_the_apis_generation_reads_the_reply_and_ends_it_at_return(checkpoints):
    """The API's TextGeneration (before any route splits it), given a gpt-oss-like model's tokens one by one: the text
    it sends only grows, in the think-block form, and <|return|> (the tiny gpt_oss's generation config's end, as
    gpt-oss's) ends the reply."""
    path = checkpoints("gpt_oss", num_layers=1, hidden_size=16, intermediate_size=16, num_heads=2, num_kv_heads=1)
    tokenizer = load_tokenizer(path)
    prompt = chat_prompt_ids(tokenizer, HI)
    generation = TextGeneration(load_reference_model(path), tokenizer, prompt, Sampling(max_tokens=100))
    ids, sent, tokens = [], "", reply_ids(tokenizer, REPLIES[0][1] + "Not this.")
    for token in tokens:  # as deltas() takes them, until one ends the reply
        text, safe = generation._add(ids, [token], [None])
        assert text.startswith(sent)
        sent = text[:safe]
        if generation.outcome.finish_reason is not None:
            break
    assert generation.outcome.finish_reason == "stop" and sent == "<think>The user asks.</think>Paris."
    assert generation.outcome.token_ids == tokens[: len(reply_ids(tokenizer, REPLIES[0][1]))]
    thinking = f"{ANALYSIS}The user asks.<|end|>{FINAL}"  # up to the answer's first token
    assert generation.reasoning_tokens(inside=False) == len(reply_ids(tokenizer, thinking))
    for reply, thought in (("<|channel|>final<|message|><|end|>", ""), (f"{ANALYSIS}Hmm<|return|>", f"{ANALYSIS}Hmm")):
        other, tokens = TextGeneration(generation.model, tokenizer, prompt, Sampling(100)), reply_ids(tokenizer, reply)
        other._add([], tokens, [None] * len(tokens))  # an empty answer; a reply that ended while it thought
        assert other.outcome.token_ids == tokens and other.reasoning_tokens(inside=False) == len(
            reply_ids(tokenizer, thought))  # the end token is no thinking
