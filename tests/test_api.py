"""`meadow api` as a user sees it: the official `openai` client against a real API process over a real loopback swarm
(a DHT node and 2 servers). Greedy text must be the local transformers model's greedy text for the same prompt ids."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

import ollama
import openai
import pydantic
import pytest
import torch
from openai.types.responses import Response

from meadow.api.embeddings import batches
from meadow.api.json_mode import JsonPrefix
from meadow.api.json_schema import OBJECT
from meadow.api.response_store import ResponseStore
from meadow.api.responses import FunctionTool
from meadow.api.schemas import ChatMessage
from meadow.api.tool_calls import Tool, conversation, dialect_of, toolbox
from meadow.client.chat_prompt import chat_prompt_ids, stop_strings
from meadow.client.sequence import connect_sequence
from meadow.local_swarm import LocalSwarm, Process
from meadow.stopping import descendants
from meadow.swarm import dht_prefix_for
from meadow.models import load_config, load_reference_model, load_tokenizer

CACHE_TOKENS = 16384  # a server's default KV-cache budget: all of it is free when no session is open


def start_api(model, initial_peers: list[str], *extra: str) -> Process:
    """`meadow api` on a free port; it prints "API ready: URL (model ID)" once it serves."""
    return Process(["api", str(model), "--initial-peers", *initial_peers, "--port", "0", *extra], "api")


def api_url(api: Process) -> str:
    return api.wait_for(lambda line: line.startswith("API ready"), timeout=180).split()[2] + "/"


@pytest.fixture(scope="module")
def served(checkpoints):
    """A swarm of the model on blocks 0:2 and 2:4 with an API over it; and an API over a second swarm name whose only
    server holds blocks 0:2. Servers announce every 2 s, so that their free cache shows up soon in /api/swarm.
    Everything starts at once."""
    path = checkpoints("llama", num_layers=4)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        for span in ("0:2", "2:4"):
            # sessions idle for 5 s are closed: a kept session outlives its servers' side (a test below)
            swarm.start_server(path, "--blocks", span, "--update-period", "2", "--idle-timeout", "5", wait=False)
        swarm.start_server(path, "--blocks", "0:2", "--dht-prefix", "partial", wait=False)
        # sessions closed with their requests (kept ones would hold cache the tests count): kept ones have their test
        api = start_api(path, swarm.initial_peers, "--keep-sessions", "0")
        partial = start_api(path, swarm.initial_peers, "--dht-prefix", "partial")
        swarm.extra += [api, partial]  # stopped with the swarm, all at once
        for server in swarm.servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        yield {"path": path, "swarm": swarm, "api": api, "url": api_url(api), "partial_url": api_url(partial)}


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["url"] + "v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(served):
    """The whole model run locally by transformers, and its tokenizer."""
    local = load_reference_model(served["path"])
    return local, load_tokenizer(served["path"])


def local_reply(reference, prompt_ids: torch.Tensor, max_tokens: int, stops: list[str] = ()) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of the local model's greedy continuation, cut the way the API cuts it."""
    local, tokenizer = reference
    with torch.no_grad():
        out = local.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_tokens, do_sample=False)
    new = out[0, prompt_ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    text = tokenizer.decode([t for t in new if t != eos], skip_special_tokens=True)
    cut = min([text.find(stop) for stop in stops if stop in text], default=None)
    if cut is not None:
        return text[:cut], "stop", -1  # tokens up to the one that completed the stop string: not checked
    return text, "stop" if eos in new else "length", len(new)


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """A raw GET (or POST of `body` as JSON) with the standard library: (status, parsed JSON reply)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def server_peers(swarm, dht_prefix: str) -> dict[str, str]:
    """Blocks -> peer id of the model's servers, from their ready lines: "Server ready: PREFIX blocks START:END as PEER, ..."."""
    peers = {}
    for server in swarm.servers:
        words = next(line for line in server.lines if "ready" in line).split()
        if words[2] == dht_prefix:
            peers[words[4]] = words[6].rstrip(",")
    return peers


def test_models_lists_the_served_model(client, served):
    models = client.models.list().data
    assert [model.id for model in models] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_greedy_chat_equals_local_greedy(client, model_id, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do bees live?"}]
    prompt_ids = chat_prompt_ids(reference[1], messages)
    text, finish, tokens = local_reply(reference, prompt_ids, 12, stop_strings(reference[1]))

    response = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=12, temperature=0,
        response_format={"type": "text"}, extra_body={"tools": []},  # as some clients send them: the default reply
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == finish
    assert response.usage.prompt_tokens == prompt_ids.shape[1]
    if tokens >= 0:
        assert response.usage.completion_tokens == tokens
        assert response.usage.total_tokens == prompt_ids.shape[1] + tokens


def test_streamed_chat_yields_the_same_text_and_names_its_servers(client, model_id, reference, served):
    messages = [{"role": "user", "content": "Tell me about meadows."}]
    text, finish, tokens = local_reply(reference, chat_prompt_ids(reference[1], messages), 16, stop_strings(reference[1]))

    chunks = list(client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    content = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert len([piece for piece in content if piece]) > 1  # it did stream
    assert "".join(content) == text
    finals = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert [chunk.choices[0].finish_reason for chunk in finals] == [finish]
    # the chain that served it: the swarm's two servers, each with its blocks
    meadow = finals[0].model_extra["meadow"]
    assert {server["blocks"]: server["peer"] for server in meadow["servers"]} == server_peers(served["swarm"], model_id)
    assert meadow["seconds"] > 0
    assert chunks[-1].usage.completion_tokens == tokens


def test_greedy_completion_equals_local_greedy_streamed_or_not(client, model_id, reference):
    prompt = "A meadow is"
    prompt_ids = reference[1](prompt, return_tensors="pt")["input_ids"]
    text, finish, tokens = local_reply(reference, prompt_ids, 10)

    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=10, temperature=0)
    assert response.choices[0].text == text
    assert response.choices[0].finish_reason == finish
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_ids.shape[1], tokens)

    stream = client.completions.create(model=model_id, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_stop_sequence_ends_the_text_with_finish_reason_stop(client, model_id, reference):
    prompt = "Grass grows"
    prompt_ids = reference[1](prompt, return_tensors="pt")["input_ids"]
    full, _, _ = local_reply(reference, prompt_ids, 12)
    stop = full[5:7]  # a piece of what the model is going to say
    text, finish, _ = local_reply(reference, prompt_ids, 12, [stop])
    assert finish == "stop" and len(text) <= 5

    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (text, "stop")
    chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats_and_penalties_change_the_text(client, model_id):
    ask = dict(model=model_id, prompt="Flowers", max_tokens=12, temperature=1.0, top_p=0.9)
    first = client.completions.create(**ask, seed=7).choices[0].text
    assert client.completions.create(**ask, seed=7).choices[0].text == first
    greedy = dict(model=model_id, prompt="Flowers", max_tokens=24, temperature=0)
    plain = client.completions.create(**greedy).choices[0].text
    penalised = client.completions.create(**greedy, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))  # repeating a token costs: the text uses more distinct characters


def local_logprobs(reference, prompt_ids: torch.Tensor, max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The local model's greedy tokens and the log-probabilities (steps, V) it chose each from."""
    local, tokenizer = reference
    with torch.no_grad():
        out = local.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, prompt_ids.shape[1] :].tolist()
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def test_chat_logprobs_are_the_local_models_streamed_or_not(client, model_id, reference):
    tokenizer = reference[1]
    messages = [{"role": "user", "content": "Name a flower."}]
    prompt_ids = chat_prompt_ids(tokenizer, messages)
    tokens, logprobs = local_logprobs(reference, prompt_ids, 8)
    assert tokenizer.eos_token_id not in tokens  # every token is in the reply

    ask = dict(model=model_id, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**ask).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    for entries in (whole, streamed):
        assert [entry.token for entry in entries] == [tokenizer.decode([t]) for t in tokens]
        for entry, token, row in zip(entries, tokens, logprobs):
            assert abs(entry.logprob - row[token].item()) < 1e-4
            assert entry.bytes == list(entry.token.encode())
            best = row.topk(3)
            assert [top.token for top in entry.top_logprobs] == [tokenizer.decode([i]) for i in best.indices.tolist()]
            assert max(abs(top.logprob - v) for top, v in zip(entry.top_logprobs, best.values.tolist())) < 1e-4
    # without top_logprobs: the chosen tokens' alone
    plain = client.chat.completions.create(**{**ask, "top_logprobs": None}).choices[0].logprobs.content
    assert [entry.token for entry in plain] == [entry.token for entry in whole]
    assert all(entry.top_logprobs == [] for entry in plain)


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_ask(client, model_id, reference):
    """lm-eval-harness's loglikelihood request: token-id prompts, several at once, echo, logprobs=1, max_tokens=1.
    Each prompt token's logprob given the ones before must be the local model's; max_tokens=0 scores alone."""
    local, tokenizer = reference
    texts = ("Bees visit clover in the meadow", "Rain", "Wind over the grass. " * 50)  # the last over 2 scoring steps
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            rows = torch.log_softmax(local(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected.append((rows, [rows[i, ids[i + 1]].item() for i in range(len(ids) - 1)]))

    for max_tokens in (1, 0):
        response = client.completions.create(
            model=model_id, prompt=prompts, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0
        )  # fmt: skip
        assert [choice.index for choice in response.choices] == [0, 1, 2]
        for choice, ids, (rows, prompt_logprobs) in zip(response.choices, prompts, expected):
            logprobs = choice.logprobs
            assert logprobs.tokens[: len(ids)] == [tokenizer.decode([i]) for i in ids]
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            assert max(abs(a - b) for a, b in zip(logprobs.token_logprobs[1 : len(ids)], prompt_logprobs)) < 1e-4
            for place, top in enumerate(logprobs.top_logprobs[1 : len(ids)]):
                assert tokenizer.decode([rows[place].argmax().item()]) in top  # the likeliest and the chosen
                assert logprobs.tokens[place + 1] in top
            assert choice.text.startswith(tokenizer.decode(ids, skip_special_tokens=True))  # the prompt: not its <s>
            special = set(tokenizer.all_special_tokens)  # skipped in the text, as the reply's own text skips them
            placed = [(at, token) for at, token in zip(logprobs.text_offset, logprobs.tokens) if token not in special]
            assert all(choice.text[at:].startswith(token) for at, token in placed)
            assert len(logprobs.tokens) == len(ids) + max_tokens
            if max_tokens:  # the greedy token, with its logprob at the prompt's last place
                greedy = rows[-1].argmax().item()
                assert logprobs.tokens[-1] == tokenizer.decode([greedy])
                assert abs(logprobs.token_logprobs[-1] - rows[-1, greedy].item()) < 1e-4
        assert response.usage.prompt_tokens == sum(len(ids) for ids in prompts)
        assert response.usage.completion_tokens == max_tokens * len(prompts)


def test_n_choices_are_each_a_generation_of_their_own(client, model_id, reference):
    """n samples are seeded seed, seed + 1, ...: each is the text that one request with that seed gets; several
    prompts get their greedy texts; streamed choices come apart by index with the same texts."""
    ask = dict(model=model_id, prompt="Flowers", max_tokens=10, temperature=1.0)
    alone = [client.completions.create(**ask, seed=5 + j).choices[0].text for j in range(3)]
    assert len(set(alone)) > 1  # sampling: the seeds give different texts
    assert [choice.text for choice in client.completions.create(**ask, seed=5, n=3).choices] == alone
    chat = dict(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=1.0, seed=9)
    replies = [choice.message.content for choice in client.chat.completions.create(**chat, n=2).choices]
    streamed = ["", ""]
    for chunk in client.chat.completions.create(**chat, n=2, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert streamed == replies
    assert replies[1] == client.chat.completions.create(**{**chat, "seed": 10}).choices[0].message.content

    prompts = ["Bees", "A quiet field of", "Wind over"]
    expected = [local_reply(reference, reference[1](p, return_tensors="pt")["input_ids"], 8)[0] for p in prompts]
    response = client.completions.create(model=model_id, prompt=prompts, max_tokens=8, temperature=0)
    assert [choice.text for choice in response.choices] == expected
    streamed = ["", "", ""]
    for chunk in client.completions.create(model=model_id, prompt=prompts, max_tokens=8, temperature=0, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == expected


def test_logit_bias_moves_the_choice_as_transformers_sequence_bias_does(client, model_id, reference):
    local, tokenizer = reference
    prompt = "Clover"
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    greedy, _ = local_logprobs(reference, prompt_ids, 6)
    banned = {greedy[0]: -100.0, greedy[1]: -100.0}  # the greedy text's first two tokens, never chosen
    with torch.no_grad():
        out = local.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=6, do_sample=False,
            sequence_bias=[[[token], bias] for token, bias in banned.items()],
        )  # fmt: skip
    expected = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    ask = dict(model=model_id, prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    response = client.completions.create(**ask, logit_bias={str(token): bias for token, bias in banned.items()})
    assert response.choices[0].text == expected
    assert not set(response.choices[0].logprobs.tokens) & {tokenizer.decode([token]) for token in banned}
    assert client.completions.create(**ask).choices[0].logprobs.tokens[0] == tokenizer.decode([greedy[0]])


def test_responses_api_gives_the_local_greedy_reply_and_continues_it(client, model_id, reference, served):
    """OpenAI's Responses API through OpenAI's client: the local greedy reply, as one response (its JSON valid as the
    client's own type) or as typed events; `previous_response_id` continues the conversation; retrieve and delete."""
    tokenizer, stops = reference[1], stop_strings(reference[1])
    question = {"role": "user", "content": "Where do bees live?"}
    prompt_ids = chat_prompt_ids(tokenizer, [{"role": "system", "content": "Be brief."}, question])
    text, finish, _ = local_reply(reference, prompt_ids, 12, stops)
    status = "incomplete" if finish == "length" else "completed"
    asked = {"model": model_id, "instructions": "Be brief.", "temperature": 0, "max_output_tokens": 12}

    response = client.responses.create(input=question["content"], **asked)
    assert (response.output_text, response.status) == (text, status)
    assert response.usage.input_tokens == prompt_ids.shape[1]
    code, raw = http(served["url"] + "v1/responses", json.dumps({**asked, "input": [question]}).encode())
    assert code == 200 and Response.model_validate(raw).output_text == text, raw  # every field the type requires

    events = list(client.responses.create(input=question["content"], stream=True, **asked))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == text
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == f"response.{status}"
    assert events[-1].response.output_text == text

    # the conversation goes on from the stored response, without its instructions (as OpenAI's does)
    follow = client.responses.create(
        model=model_id, input="And wasps?", previous_response_id=response.id, temperature=0, max_output_tokens=12
    )
    conversation = [question, {"role": "assistant", "content": text}, {"role": "user", "content": "And wasps?"}]
    assert follow.output_text == local_reply(reference, chat_prompt_ids(tokenizer, conversation), 12, stops)[0]

    # logprobs, the model's own
    tokens, logprobs = local_logprobs(reference, prompt_ids, 6)
    scored = client.responses.create(input=question["content"], include=["message.output_text.logprobs"],
                                     top_logprobs=2, **{**asked, "max_output_tokens": 6})  # fmt: skip
    entries = scored.output[0].content[0].logprobs
    assert [entry.token for entry in entries] == [tokenizer.decode([t]) for t in tokens]
    assert max(abs(entry.logprob - row[t].item()) for entry, t, row in zip(entries, tokens, logprobs)) < 1e-4
    assert all(len(entry.top_logprobs) == 2 for entry in entries)

    assert client.responses.retrieve(follow.id).output_text == follow.output_text
    client.responses.delete(follow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model_id, input="Hi", previous_response_id=follow.id)


def test_stored_responses_outlive_the_api_and_another_api_continues_them(served, reference):
    swarm, url = served["swarm"], served["url"]
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
    model_id = client.models.list().data[0].id
    first = client.responses.create(model=model_id, input="Hi", max_output_tokens=4, temperature=0)
    api = start_api(served["path"], swarm.initial_peers)  # a second API on this machine, and then after the first
    swarm.extra.append(api)
    other = openai.OpenAI(base_url=api_url(api) + "v1", api_key="unused", max_retries=0, timeout=120)
    assert other.responses.retrieve(first.id).output_text == first.output_text
    api.stop()
    api = start_api(served["path"], swarm.initial_peers)
    swarm.extra.append(api)
    again = openai.OpenAI(base_url=api_url(api) + "v1", api_key="unused", max_retries=0, timeout=120)
    after = again.responses.create(model=model_id, input="And?", previous_response_id=first.id, max_output_tokens=4,
                                   temperature=0)  # fmt: skip
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And?"}]  # fmt: skip
    prompt_ids = chat_prompt_ids(reference[1], history)
    assert after.usage.input_tokens == prompt_ids.shape[1]
    assert after.output_text == local_reply(reference, prompt_ids, 4, stop_strings(reference[1]))[0]
    again.responses.delete(first.id)
    api.stop()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_the_response_store_keeps_the_latest_and_starts_afresh_beside_a_file_it_cannot_read(tmp_path):
    store = ResponseStore(tmp_path / "responses.sqlite", kept=3)
    for i in range(5):
        store.put(f"resp_{i}", {"id": f"resp_{i}"}, [{"role": "user", "content": str(i)}])
    store.put("resp_3", {"id": "resp_3", "again": True}, [])  # stored again: the latest now
    assert [store.get(f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert store.get("resp_3") == ({"id": "resp_3", "again": True}, [])
    assert store.delete("resp_4") and not store.delete("resp_4") and store.get("resp_4") is None
    assert ResponseStore(tmp_path / "responses.sqlite", kept=3).get("resp_2")[1] == [{"role": "user", "content": "2"}]
    (tmp_path / "torn.sqlite").write_bytes(b"not a database" * 100)
    fresh = ResponseStore(tmp_path / "torn.sqlite")
    assert fresh.get("resp_2") is None and len(list(tmp_path.glob("torn.sqlite.unreadable-*"))) == 1
    fresh.put("resp_9", {}, [])
    assert fresh.get("resp_9") == ({}, [])
    (tmp_path / "a-file").write_text("")  # no folder can be made here: the responses are kept in memory
    in_memory = ResponseStore(tmp_path / "a-file" / "responses.sqlite")
    in_memory.put("resp_1", {"id": "resp_1"}, [])
    assert in_memory.get("resp_1") == ({"id": "resp_1"}, []) and not (tmp_path / "a-file").is_dir()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny-llama", "input": []}, "input"),
        ({"model": "tiny-llama", "input": ""}, "input"),
        ({"model": "tiny-llama", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.0.content.0.type"),
        ({"model": "tiny-llama", "input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),  # OpenAI's own
        ({"model": "tiny-llama", "input": "hi", "tools": [{"type": "function", "name": "f"}],
          "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
        ({"model": "tiny-llama", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
         "input.0.arguments"),
        ({"model": "tiny-llama", "input": [{"type": ["x"], "call_id": "c", "output": "ok"}]},
         "input.0.type"),  # was a 500
        ({"model": "tiny-llama", "input": "hi", "text": {"format": {"type": "json_schema", "schema": {"not": 1}}}},
         "text.format"),
        ({"model": "tiny-llama", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "tiny-llama", "input": "hi", "previous_response_id": "resp_none"}, "previous_response_id"),
    ],
)
def test_bad_responses_requests_are_refused_naming_the_field(served, body, param):
    status, reply = http(served["url"] + "v1/responses", json.dumps(body).encode())
    assert status in (400, 404) and reply["error"]["param"] == param, reply


def test_json_mode_replies_are_json_objects_on_every_route(client, model_id, served, reference):
    """A random model's reply, which is not JSON, is a JSON object when the request asks for one: OpenAI's chat
    (greedy or sampled, streamed or not), the Responses API and Ollama's `format: "json"`."""
    messages = [{"role": "user", "content": "List three flowers as JSON."}]
    plain = client.chat.completions.create(model=model_id, messages=messages, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        json.loads(plain.choices[0].message.content)
    as_json = {"type": "json_object"}
    texts, greedy_tokens = [], 60  # sampled replies get room to close their object; a greedy one never does
    for options in ({"temperature": 1.0, "seed": 3}, {"temperature": 1.0, "seed": 4}, {"temperature": 0}):
        reply = client.chat.completions.create(model=model_id, messages=messages, response_format=as_json,
                                               max_tokens=400 if options["temperature"] else greedy_tokens,
                                               **options)  # fmt: skip
        texts.append(reply.choices[0].message.content)
        if options["temperature"]:
            assert reply.choices[0].finish_reason == "stop"  # the end of sequence, once the object closed
            assert isinstance(json.loads(texts[-1]), dict)
    assert len(set(texts)) == 3
    # the greedy reply of this random model stays in a string until max_tokens: the beginning of an object
    assert texts[-1].startswith('{"') and JsonPrefix(OBJECT).fed(texts[-1]) is not None
    texts = texts[::-1]
    streamed = client.chat.completions.create(model=model_id, messages=messages, response_format=as_json,
                                              max_tokens=greedy_tokens, temperature=0, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == texts[0]
    response = client.responses.create(model=model_id, input=messages, text={"format": as_json}, temperature=0,
                                       max_output_tokens=greedy_tokens)  # fmt: skip
    assert response.output_text == texts[0] and response.text.format.type == "json_object"
    ollama_client = ollama.Client(host=served["url"].rstrip("/"))
    greedy = {"temperature": 0, "num_predict": greedy_tokens}
    chat = ollama_client.chat(model=model_id, messages=messages, format="json", options=greedy)
    assert chat.message.content == texts[0]


class Flower(pydantic.BaseModel):
    """A reply a random model can finish: short strings, an enum, a short list, a date, a bounded number."""

    name: str = pydantic.Field(max_length=8)
    colour: Literal["red", "white", "deep blue"]
    petals: list[bool] = pydantic.Field(max_length=3)
    planted: datetime.date
    height_cm: int = pydantic.Field(ge=1, le=99)
    scent: Optional[Literal["sweet", "none"]] = None


def test_structured_replies_match_their_schema_on_every_route(client, model_id, served):
    """Replies held to a JSON schema, each parsed by the client's own helper into the pydantic model it came from:
    OpenAI's chat (`parse`, greedy and sampled, streamed), the Responses API, Ollama's `format` as a schema."""
    messages = [{"role": "user", "content": "Describe a flower."}]
    asked = {"model": model_id, "messages": messages, "max_tokens": 300}
    greedy = client.chat.completions.parse(**asked, response_format=Flower, temperature=0).choices[0]
    sampled = client.chat.completions.parse(**asked, response_format=Flower, temperature=1, seed=5).choices[0]
    assert greedy.finish_reason == "stop" and isinstance(greedy.message.parsed, Flower)
    assert isinstance(sampled.message.parsed, Flower) and sampled.message.content != greedy.message.content
    with client.chat.completions.stream(**asked, response_format=Flower, temperature=0) as stream:
        assert stream.get_final_completion().choices[0].message.content == greedy.message.content
    response = client.responses.parse(model=model_id, input=messages, text_format=Flower, temperature=0,
                                      max_output_tokens=300)  # fmt: skip
    assert isinstance(response.output_parsed, Flower) and response.text.format.type == "json_schema"
    ollama_client = ollama.Client(host=served["url"].rstrip("/"))
    for seed in range(3):
        chat = ollama_client.chat(model=model_id, messages=messages, format=Flower.model_json_schema(),
                                  options={"seed": seed, "num_predict": 300})  # fmt: skip
        assert chat.done_reason == "stop"
        Flower.model_validate_json(chat.message.content)


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    days: int = pydantic.Field(ge=1, le=7)


NOW = {"type": "function", "function": {"name": "now", "strict": True,
       "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}}  # fmt: skip


def test_tool_calls_come_back_in_each_apis_shape_and_tools_reach_the_prompt(client, model_id, served, reference):
    """A random model never opens a call by itself; asked to call (`required`, or a named tool), every call is one
    the client's own helper parses into its pydantic model, streamed or not. Left to choose (`auto`, Ollama), its
    reply is the local greedy reply to the conversation with the tools described, and the calls and results of earlier
    turns written in."""
    tools = [openai.pydantic_function_tool(Weather, name="get_weather"), NOW]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    asked = {"model": model_id, "messages": messages, "tools": tools, "max_tokens": 200}
    forced = client.chat.completions.parse(**asked, tool_choice="required", temperature=0, logprobs=True).choices[0]
    assert forced.finish_reason == "tool_calls" and forced.message.content is None
    assert forced.logprobs.content == []  # the calls' tokens are not the content's
    assert forced.message.tool_calls and all(call.function.name in ("get_weather", "now")
                                             for call in forced.message.tool_calls)  # fmt: skip
    weather = {"type": "function", "function": {"name": "get_weather"}}
    for options in ({"temperature": 0}, {"temperature": 1, "seed": 3}):
        named = client.chat.completions.parse(**asked, tool_choice=weather, **options).choices[0]
        (call,) = named.message.tool_calls
        assert isinstance(call.function.parsed_arguments, Weather) and named.finish_reason == "tool_calls"
    with client.chat.completions.stream(**asked, tool_choice=weather, temperature=1, seed=3) as stream:
        pieces = [event.arguments_delta for event in stream if event.type == "tool_calls.function.arguments.delta"]
        (streamed,) = stream.get_final_completion().choices[0].message.tool_calls
    assert streamed.function.arguments == call.function.arguments and streamed.id.startswith("call_")
    assert len(pieces) > 3 and "".join(pieces) == call.function.arguments  # streamed as they are written

    tokenizer, box = reference[1], toolbox([Tool.model_validate(tool) for tool in tools], None, None)
    made = {"id": call.id, "type": "function",
            "function": {"name": "get_weather", "arguments": call.function.arguments}}  # fmt: skip
    earlier = [*messages, {"role": "assistant", "content": None, "tool_calls": [made]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    for conversation_so_far in (messages, earlier):
        shown = [ChatMessage.model_validate(message).as_dict() for message in conversation_so_far]
        prompt_ids = chat_prompt_ids(tokenizer, *conversation(dialect_of(tokenizer.chat_template), shown, box))
        text, finish, _ = local_reply(reference, prompt_ids, 12, stop_strings(tokenizer))
        chosen = client.chat.completions.create(**{**asked, "messages": conversation_so_far, "max_tokens": 12},
                                                temperature=0, logprobs=True)  # fmt: skip
        assert chosen.choices[0].message.content == text and chosen.usage.prompt_tokens == prompt_ids.shape[1]
        assert len(chosen.choices[0].logprobs.content) == chosen.usage.completion_tokens  # no call: all content
        assert chosen.choices[0].message.tool_calls is None and chosen.choices[0].finish_reason == finish
    described = chat_prompt_ids(tokenizer, conversation(dialect_of(tokenizer.chat_template), messages, box)[0]).shape[1]
    assert described > chat_prompt_ids(tokenizer, messages).shape[1] + 100  # the tools' description is in the prompt
    # the older form, `functions` and `function_call`: one call, its result a "function" message
    legacy = {"model": model_id, "functions": [tool["function"] for tool in tools], "max_tokens": 200, "temperature": 0}
    old = client.chat.completions.create(**legacy, messages=messages, function_call={"name": "get_weather"}).choices[0]
    assert old.finish_reason == "function_call" and old.message.tool_calls is None
    Weather.model_validate_json(old.message.function_call.arguments)
    chunks = client.chat.completions.create(**legacy, messages=messages, function_call={"name": "get_weather"},
                                            stream=True)  # fmt: skip
    pieces = [chunk.choices[0].delta.function_call for chunk in chunks if chunk.choices[0].delta.function_call]
    assert pieces[0].name == "get_weather" and all(piece.name is None for piece in pieces[1:]) and len(pieces) > 3
    assert "".join(piece.arguments for piece in pieces) == old.message.function_call.arguments
    earlier_old = [*messages, {"role": "assistant", "content": None, "function_call": made["function"]},
                   {"role": "function", "name": "get_weather", "content": "sunny"}]  # fmt: skip
    reply = client.chat.completions.create(**{**legacy, "max_tokens": 12}, messages=earlier_old)
    assert reply.choices[0].message.content == text and reply.usage.prompt_tokens == prompt_ids.shape[1]

    # Ollama's route (its client would send its own reading of the tools: the request as it is, here)
    arguments = json.loads(call.function.arguments)
    ollama_earlier = [*messages, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name":
                      "get_weather", "arguments": arguments}}]}, {"role": "tool", "content": "sunny"}]  # fmt: skip
    body = {"model": model_id, "messages": ollama_earlier, "tools": tools, "stream": False,
            "options": {"temperature": 0, "num_predict": 12}}  # fmt: skip
    status, chat = http(served["url"] + "api/chat", json.dumps(body).encode())
    assert status == 200 and chat["message"] == {"role": "assistant", "content": text}
    assert chat["prompt_eval_count"] == prompt_ids.shape[1]

    # the Responses API: its flat tools, calls as output items, their outputs sent back after previous_response_id
    flat = [{"type": "function", **tools[0]["function"]}]
    asked = {"model": model_id, "input": messages, "tools": flat, "temperature": 0, "max_output_tokens": 200}
    response = client.responses.create(**asked, tool_choice="required")
    (item,) = response.output
    assert item.type == "function_call" and Weather.model_validate_json(item.arguments)
    with client.responses.stream(**asked, tool_choice={"type": "function", "name": "get_weather"}) as stream:
        pieces = [event.delta for event in stream if event.type == "response.function_call_arguments.delta"]
        streamed = stream.get_final_response()
    assert [(out.type, out.name, out.arguments) for out in streamed.output] == [(item.type, item.name, item.arguments)]
    assert len(pieces) > 3 and "".join(pieces) == item.arguments
    output = [{"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}]
    after = client.responses.create(**{**asked, "input": output, "max_output_tokens": 12},
                                    previous_response_id=response.id)  # fmt: skip
    box = toolbox([FunctionTool.model_validate(tool).as_tool() for tool in flat], None, None)
    made = {"type": "function", "function": {"name": "get_weather", "arguments": json.loads(item.arguments)}}
    shown = [*messages, {"role": "assistant", "content": "", "tool_calls": [made]},
             {"role": "tool", "content": "sunny"}]  # fmt: skip
    prompt_ids = chat_prompt_ids(tokenizer, *conversation(dialect_of(tokenizer.chat_template), shown, box))
    assert after.output_text == local_reply(reference, prompt_ids, 12, stop_strings(tokenizer))[0]
    assert after.usage.input_tokens == prompt_ids.shape[1] and after.output[0].type == "message"


# a chat template that shows tools and calls in the Hermes form, and takes no system message (as some do)
HERMES_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools> Calls: <tool_call>{% endif %}"
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System messages are not supported') }}"
    "{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>"
    "{% elif m.tool_calls %}{% for call in m.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>"
    "{% endfor %}"
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}assistant:"
)


def api_with_template(served, tmp_path, template: str):
    """An API over the served swarm for a copy of its model whose chat template is `template`: its URL and
    tokenizer."""
    path = tmp_path / "tiny-llama"
    shutil.copytree(served["path"], path)
    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    # it lives as long as the swarm: sessions kept by it would hold cache that later tests count or fill
    api = Process(["api", str(path), "--initial-peers", *served["swarm"].initial_peers, "--port", "0",
                   "--keep-sessions", "0"], "api")  # fmt: skip
    served["swarm"].extra.append(api)
    return api_url(api), tokenizer


def test_a_template_that_shows_tools_gets_them_and_one_that_refuses_a_conversation_is_a_400(served, tmp_path):
    """An API over a copy of the model whose chat template is HERMES_TEMPLATE: the tools and the calls of earlier turns
    go to the template as they are; a system message, which it refuses, goes at the head of the first user message (on
    every chat route); a conversation it refuses even so is a 400 quoting the template."""
    url, tokenizer = api_with_template(served, tmp_path, HERMES_TEMPLATE)
    hi, system = {"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}
    folded = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Be brief.\n\nhi"}]).shape[1]
    asked = [("v1/chat/completions", {"messages": [system, hi]}), ("api/chat", {"messages": [system, hi]}),
             ("v1/responses", {"input": "hi", "instructions": "Be brief."})]  # fmt: skip
    for route, body in asked:
        status, reply = http(url + route, json.dumps({"model": "tiny-llama", "stream": False, "max_tokens": 1,
                                                      "max_output_tokens": 1,
                                                      "options": {"num_predict": 1}, **body}).encode())  # fmt: skip
        prompt_tokens = {"v1/chat/completions": lambda: reply["usage"]["prompt_tokens"],
                         "api/chat": lambda: reply["prompt_eval_count"],
                         "v1/responses": lambda: reply["usage"]["input_tokens"]}[route]  # fmt: skip
        assert status == 200 and prompt_tokens() == folded, reply
    for route in ("v1/chat/completions", "api/chat"):  # no user message to hold it
        body = {"model": "tiny-llama", "stream": False, "messages": [system]}
        status, reply = http(url + route, json.dumps(body).encode())
        message = reply["error"] if route.startswith("api/") else reply["error"]["message"]
        assert status == 400 and "refuses the conversation: System messages are not supported" in message, reply
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
    box = toolbox([Tool.model_validate(NOW)], None, None)
    call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    earlier = [hi, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "noon"}]
    for messages in ([hi], earlier):
        reply = client.chat.completions.create(model="tiny-llama", messages=messages, tools=[NOW], max_tokens=4,
                                               temperature=0)  # fmt: skip
        shown = [ChatMessage.model_validate(message).as_dict() for message in messages]
        expected = chat_prompt_ids(tokenizer, shown, box.shown())
        assert reply.usage.prompt_tokens == expected.shape[1]
    assert '<tool_call>{"name": "now", "arguments": {}}</tool_call><tool_response>noon' in tokenizer.decode(expected[0])
    forced = client.chat.completions.create(model="tiny-llama", messages=[hi], tools=[NOW], tool_choice="required",
                                            max_tokens=80, temperature=0).choices[0]  # fmt: skip
    assert [call.function.name for call in forced.message.tool_calls] == ["now"]


# Llama 3's way: the tools and the form of a call in the prompt, a call as the whole reply, its arguments "parameters"
LLAMA_TEMPLATE = (
    '{% if tools %}Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.{% for tool in tools %}{{ tool | tojson }}{% endfor %}\n{% endif %}{% for m in messages %}"
    "{% if m.role == 'tool' %}ipython: {{ m.content }}\n"
    "{% elif m.tool_calls %}assistant: {% for call in m.tool_calls %}"
    '{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}{% endfor %}\n'
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}assistant:"
)


def test_a_llama_template_gets_the_tools_and_its_calls_come_back_from_the_reply_it_writes(served, tmp_path):
    url, tokenizer = api_with_template(served, tmp_path, LLAMA_TEMPLATE)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
    tools = [openai.pydantic_function_tool(Weather, name="get_weather"), NOW]
    hi = {"role": "user", "content": "Weather in Paris?"}
    asked = {"model": "tiny-llama", "tools": tools, "max_tokens": 120, "temperature": 0}
    forced = client.chat.completions.parse(**asked, messages=[hi], tool_choice="required").choices[0]
    (call,) = forced.message.tool_calls  # one call a reply, in this form
    assert forced.finish_reason == "tool_calls" and call.function.name in ("get_weather", "now")
    made = {"id": call.id, "type": "function", "function": {"name": call.function.name,
            "arguments": call.function.arguments}}  # fmt: skip
    earlier = [hi, {"role": "assistant", "content": None, "tool_calls": [made]}, {"role": "tool", "content": "sunny"}]
    reply = client.chat.completions.create(**{**asked, "max_tokens": 8}, messages=earlier)
    shown = [ChatMessage.model_validate(message).as_dict() for message in earlier]
    box = toolbox([Tool.model_validate(tool) for tool in tools], None, None)
    expected = chat_prompt_ids(tokenizer, shown, box.shown())
    assert reply.usage.prompt_tokens == expected.shape[1]
    assert f'assistant: {{"name": "{call.function.name}", "parameters": ' in tokenizer.decode(expected[0])


# a reasoning model's: DeepSeek-R1's way, the reply opened inside a think block; Qwen3's enable_thinking=False closes
# an empty one for it instead
THINKING_TEMPLATE = (
    "{% if reasoning_effort is defined %}effort: {{ reasoning_effort }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
)


def streamed_logprobs(chunks) -> list:
    return [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
            for entry in chunk.choices[0].logprobs.content]  # fmt: skip


def test_a_reasoning_models_thinking_comes_apart_from_its_answer_on_every_route(served, tmp_path, reference):
    """A template that opens the reply's think block: the greedy reply (all thinking: it never closes the block in
    8 tokens) comes as reasoning_content (OpenAI), a reasoning item (Responses) or thinking (Ollama), streamed or not,
    the answer empty; asked not to think (chat_template_kwargs, Ollama's think: false), the template closes the block
    and the reply is the answer."""
    url, tokenizer = api_with_template(served, tmp_path, THINKING_TEMPLATE)
    hi = [{"role": "user", "content": "Why is the sky blue?"}]
    thought = local_reply((reference[0], tokenizer), chat_prompt_ids(tokenizer, hi), 8)[0].strip()
    assert thought
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
    asked = {"model": "tiny-llama", "messages": hi, "max_tokens": 8, "temperature": 0}
    thinking = client.chat.completions.create(**asked)
    message = thinking.choices[0].message
    assert (message.reasoning_content, message.content) == (thought, "")
    assert thinking.usage.completion_tokens_details.reasoning_tokens == thinking.usage.completion_tokens == 8
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(**asked, stream=True) if chunk.choices]
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == thought
    assert not "".join(delta.content or "" for delta in deltas)
    # logprobs are the answer's tokens' (none here), as the Responses API's below; the thinking's are left out
    assert client.chat.completions.create(**asked, logprobs=True).choices[0].logprobs.content == []
    assert not streamed_logprobs(client.chat.completions.create(**asked, logprobs=True, stream=True))

    asked_once = {"model": "tiny-llama", "input": hi[0]["content"], "max_output_tokens": 8, "temperature": 0}
    response = client.responses.create(**asked_once)
    assert [item.type for item in response.output] == ["reasoning", "message"] and response.output_text == ""
    assert response.usage.output_tokens_details.reasoning_tokens == response.usage.output_tokens
    assert response.output[0].content[0].text == thought
    effort = client.responses.create(**asked_once, reasoning={"effort": "low"})  # the template shows the effort
    assert effort.reasoning.effort == "low" and response.reasoning.effort is None
    assert effort.usage.input_tokens == chat_prompt_ids(tokenizer, hi, reasoning_effort="low").shape[1]
    assert response.usage.input_tokens == chat_prompt_ids(tokenizer, hi).shape[1]
    scored = client.responses.create(**asked_once, include=["message.output_text.logprobs"])
    assert scored.output[1].content[0].logprobs == []  # the answer's tokens only: none
    events = list(client.responses.create(**asked_once, stream=True))
    assert "".join(event.delta for event in events if event.type == "response.reasoning_text.delta") == thought
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    more = [*[item.model_dump() for item in response.output], {"role": "user", "content": "And?"}]  # sent back
    went_on = client.responses.create(**{**asked_once, "input": [hi[0], *more]})
    shown = [*hi, {"role": "assistant", "content": ""}, {"role": "user", "content": "And?"}]
    assert went_on.usage.input_tokens == chat_prompt_ids(tokenizer, shown).shape[1]  # the thinking left out

    plain_ids = chat_prompt_ids(tokenizer, hi, enable_thinking=False)
    answer = local_reply((reference[0], tokenizer), plain_ids, 8)[0]
    unthinking = {**asked, "logprobs": True, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    plain = client.chat.completions.create(**unthinking)
    said = plain.choices[0].message
    assert plain.usage.prompt_tokens == plain_ids.shape[1]
    assert (said.content, getattr(said, "reasoning_content", None)) == (answer, None)
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    every = plain.usage.completion_tokens  # all of the reply is the answer: every token's logprob
    assert len(plain.choices[0].logprobs.content) == every
    assert len(streamed_logprobs(client.chat.completions.create(**unthinking, stream=True))) == every

    ollamas = ollama.Client(host=url.rstrip("/"), timeout=120)
    assert "thinking" in ollamas.show("tiny-llama").capabilities
    greedy = {"temperature": 0, "num_predict": 8}
    chat = ollamas.chat(model="tiny-llama", messages=hi, options=greedy)
    assert (chat.message.thinking, chat.message.content) == (thought, "")
    lines = list(ollamas.chat(model="tiny-llama", messages=hi, options=greedy, stream=True, think=True))
    assert "".join(line.message.thinking or "" for line in lines) == thought
    quiet = ollamas.chat(model="tiny-llama", messages=hi, options=greedy, think=False)
    assert (quiet.message.content, quiet.message.thinking) == (answer, None)
    assert quiet.prompt_eval_count == plain_ids.shape[1]
    low = ollamas.chat(model="tiny-llama", messages=hi, options=greedy, think="low")
    assert low.prompt_eval_count == chat_prompt_ids(tokenizer, hi, reasoning_effort="low").shape[1]
    generated = ollamas.generate(model="tiny-llama", prompt=hi[0]["content"], options=greedy)
    assert (generated.thinking, generated.response) == (thought, "")
    status, reply = http(served["url"] + "api/chat", json.dumps({**asked, "think": True}).encode())
    assert status == 400 and "does not support thinking" in reply["error"]  # a model that does not reason
    effortful = {**asked_once, "reasoning": {"effort": "low"}}
    status, reply = http(served["url"] + "v1/responses", json.dumps(effortful).encode())
    assert status == 400 and reply["error"]["param"] == "reasoning.effort"


def test_malformed_json_is_a_400_in_openais_shape(served):
    status, reply = http(served["url"] + "v1/chat/completions", b'{"model": "tiny-llama", "messages": [')
    assert status == 400
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "tiny-llama"}, "messages"),
        ({"model": "tiny-llama", "messages": []}, "messages"),
        ({"model": "tiny-llama", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "n": 17}, "n"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
         "tools.0.function"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "tools": [NOW, NOW]}, "tools"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "tools": [NOW],
          "functions": [NOW["function"]]}, "functions"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "function_call": "auto"},
         "function_call"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
         "tool_choice"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "tools": [NOW],
          "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "tiny-llama", "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
          "function": {"name": "now", "arguments": "{not json"}}]}]}, "messages.0.tool_calls.0.function.arguments"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json"}},
         "response_format.type"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"uniqueItems": True}}}},
         "response_format"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
         "top_logprobs"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
          "chat_template_kwargs": {"tools": [], "enable_thinking": False}}, "chat_template_kwargs"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
          "chat_template_kwargs": {"raise_exception": 1}}, "chat_template_kwargs"),  # a function templates call
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": [1]},
         "chat_template_kwargs"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "most"},
         "reasoning_effort"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"},
         "reasoning_effort"),  # a model that does not reason
    ],
)
def test_bad_fields_are_a_400_naming_the_field(served, body, param):
    status, reply = http(served["url"] + "v1/chat/completions", json.dumps(body).encode())
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny-llama", "prompt": ["a"] * 9, "n": 2}, "n"),  # 18 choices
        ({"model": "tiny-llama", "prompt": "a", "max_tokens": 0}, "max_tokens"),  # generates nothing and echoes nothing
        ({"model": "tiny-llama", "prompt": [[1, 2], []]}, "prompt"),
        ({"model": "tiny-llama", "prompt": "a", "logprobs": 21}, "logprobs"),
        ({"model": "tiny-llama", "prompt": "a", "suffix": " end"}, "suffix"),  # asks for what it would not get
        ({"model": "tiny-llama", "prompt": "a", "tools": [NOW]}, "tools"),
        ({"model": "tiny-llama", "prompt": "a", "best_of": 3}, "best_of"),
        ({"model": "tiny-llama", "prompt": "a", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": "tiny-llama", "prompt": "a", "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"model": "tiny-llama", "prompt": "a", "logit_bias": {"word": 1}}, "logit_bias.word"),
    ],
)
def test_bad_completion_fields_are_a_400_naming_the_field(served, body, param):
    status, reply = http(served["url"] + "v1/completions", json.dumps(body).encode())
    assert status == 400 and reply["error"]["param"] == param, reply


def preflight(url: str, origin: str) -> str | None:
    """The origin a browser's CORS preflight from `origin` for a request with a key is let in as (None: refused)."""
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    request = urllib.request.Request(url + "v1/chat/completions", method="OPTIONS", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.headers.get("Access-Control-Allow-Origin")
    except urllib.error.HTTPError:
        return None


def test_web_pages_on_this_machine_may_call_the_api_others_only_when_let_in(served):
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "http://[::1]:8080"):
        assert preflight(served["url"], origin) == origin
    for origin in ("https://example.org", "http://localhost.example.org", "http://127.0.0.1.example.org"):
        assert preflight(served["url"], origin) is None


def test_an_api_key_keeps_out_requests_without_it(served, reference):
    """`meadow api --api-key KEY` (here from $MEADOW_API_KEY): /v1 and /api answer only `Authorization: Bearer KEY`,
    with OpenAI's 401 otherwise; the pages themselves stay open. (Its pages let in by $MEADOW_ORIGINS: below.)"""
    api = Process(["api", str(served["path"]), "--initial-peers", *served["swarm"].initial_peers, "--port", "0",
                   "--keep-sessions", "0"], "api",  # it lives as long as the swarm: it keeps no session holding cache
                  env={"MEADOW_API_KEY": "meadow-secret", "MEADOW_ORIGINS": "https://chat.example.org"})  # fmt: skip
    served["swarm"].extra.append(api)
    url = api_url(api)
    for key in ("wrong", "Bearer meadow-secret"):  # (no key at all: below)
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0).models.list()
        assert caught.value.body["code"] == "invalid_api_key"
    for path in ("api/swarm", "api/points"):
        status, reply = http(url + path)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    with pytest.raises(ollama.ResponseError) as caught:  # Ollama's routes too, in Ollama's shape
        ollama.Client(host=url.rstrip("/")).list()
    assert caught.value.status_code == 401 and "needs a key" in caught.value.error
    with urllib.request.urlopen(url, timeout=60) as page:
        assert page.status == 200 and b"<script" in page.read()

    keyed = openai.OpenAI(base_url=url + "v1", api_key="meadow-secret", max_retries=0, timeout=120)
    prompt = "Bees"
    expected = local_reply(reference, reference[1](prompt, return_tensors="pt")["input_ids"], 8)[0]
    reply = keyed.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected
    client = ollama.Client(host=url.rstrip("/"), headers={"Authorization": "Bearer meadow-secret"})
    greedy = {"temperature": 0, "num_predict": 8}
    assert client.generate(model="tiny-llama", prompt=prompt, raw=True, options=greedy).response == expected
    request = urllib.request.Request(url + "api/swarm", headers={"Authorization": "Bearer meadow-secret"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    assert preflight(url, "https://chat.example.org") == "https://chat.example.org"
    assert preflight(url, "https://other.example.org") is None


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_one_api_serves_several_models_each_request_answered_by_the_model_it_names(served, checkpoints, reference):
    """`meadow api A B` over a swarm that serves both: one list of models, and each request (OpenAI's, Ollama's, a
    Responses one continued by the other model) answered by its own model, as it would be run locally."""
    other = checkpoints("qwen2", num_layers=2)
    with LocalSwarm() as swarm:  # a swarm of its own: the served one's list of models stays as other tests expect it
        swarm.start_dht()
        swarm.start_server(served["path"], "--blocks", "0:4", wait=False)
        swarm.start_server(other, "--blocks", "0:2", wait=False)
        api = Process(["api", str(served["path"]), str(other), "--initial-peers", *swarm.initial_peers, "--port", "0"],
                      "api")  # fmt: skip
        swarm.extra.append(api)
        for server in swarm.servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        several_models_answer(api_url(api), served["path"], other, reference)


def several_models_answer(url: str, path, other, reference) -> None:
    """The API at `url` serves `path` (whose local model is `reference`) and `other`, each as it would run locally."""
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
    ids = [entry.id for entry in client.models.list().data]
    assert len(ids) == 2 and ids[0] == dht_prefix_for(str(path)) and ids[1] == dht_prefix_for(str(other))
    references = dict(zip(ids, [reference, (load_reference_model(other), load_tokenizer(other))]))
    ollama_client = ollama.Client(host=url.rstrip("/"), timeout=120)
    tags = ollama_client.list().models
    assert [entry.model for entry in tags] == ids and [entry.details.family for entry in tags] == ["llama", "qwen2"]
    assert [entry.model for entry in ollama_client.ps().models] == ids
    question = [{"role": "user", "content": "Where do bees live?"}]
    for model_id, local in references.items():
        prompt_ids = chat_prompt_ids(local[1], question)
        text = local_reply(local, prompt_ids, 8, stop_strings(local[1]))[0]
        reply = client.chat.completions.create(model=model_id, messages=question, max_tokens=8, temperature=0)
        assert (reply.model, reply.choices[0].message.content) == (model_id, text)
        chunks = client.chat.completions.create(model=model_id, messages=question, max_tokens=8, temperature=0,
                                                stream=True)  # fmt: skip
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == text
        said = ollama_client.chat(model=f"{model_id}:latest", messages=question, options={"temperature": 0,
                                  "num_predict": 8})  # fmt: skip
        assert said.message.content == text
        assert ollama_client.show(model_id).details.family == local[0].config.model_type
    # a response stored by one model, continued by the other
    first = client.responses.create(model=ids[0], input="Hi", max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(first.id).id == first.id
    after = client.responses.create(model=ids[1], input="And?", previous_response_id=first.id, max_output_tokens=4,
                                    temperature=0)  # fmt: skip
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And?"}]  # fmt: skip
    prompt_ids = chat_prompt_ids(references[ids[1]][1], history)
    assert after.usage.input_tokens == prompt_ids.shape[1]
    assert after.output_text == local_reply(references[ids[1]], prompt_ids, 4, stop_strings(references[ids[1]][1]))[0]
    with pytest.raises(openai.NotFoundError, match=f"this API serves `{ids[0]}`, `{ids[1]}`"):
        client.chat.completions.create(model="gpt-4o", messages=question)
    with pytest.raises(ollama.ResponseError, match=f"this API serves '{ids[0]}', '{ids[1]}'"):
        ollama_client.chat(model="llama3", messages=question)


def test_too_long_prompt_is_a_400(client, model_id, reference):
    context = reference[0].config.max_position_embeddings
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_id, prompt="grass " * context, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert str(context) in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # a short prompt that asks for more than the context holds
        client.completions.create(model=model_id, prompt="grass", max_tokens=context)


def test_missing_blocks_are_a_503_naming_them(served):
    partial = openai.OpenAI(base_url=served["partial_url"] + "v1", api_key="unused", max_retries=0, timeout=120)

    def ask(stream: bool) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            partial.chat.completions.create(
                model="partial", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=stream
            )
        return caught.value

    with ThreadPoolExecutor(2) as pool:  # together: each waits a few seconds for a server to appear
        errors = list(pool.map(ask, (False, True)))
    for error in errors:
        assert error.status_code == 503
        assert "2:4" in error.body["message"], error.body
        assert error.body["code"] == "missing_blocks"


def test_concurrent_requests_all_get_their_greedy_text(client, model_id, reference):
    prompts = ["Bees", "A quiet field of", "Wind over", "Clover and", "The river"]
    expected = [local_reply(reference, reference[1](p, return_tensors="pt")["input_ids"], 14)[0] for p in prompts]

    def ask(prompt: str) -> str:
        return client.completions.create(model=model_id, prompt=prompt, max_tokens=14, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == expected


def test_ollamas_client_chats_and_generates_the_local_greedy_text(served, model_id, reference):
    """Ollama's own Python client, pointed at the API: the same greedy text as transformers, streamed or not."""
    tokenizer = reference[1]
    client = ollama.Client(host=served["url"].rstrip("/"), timeout=120)
    listed, running = client.list().models, client.ps().models
    assert [entry.model for entry in listed] == [entry.model for entry in running] == [model_id]
    shown, local = client.show(model_id), reference[0]
    details = shown.details
    assert (details.family, details.format, details.quantization_level) == ("llama", "safetensors", "F32")
    assert shown.modelinfo["general.parameter_count"] == local.num_parameters()  # what its files hold
    assert shown.modelinfo["llama.block_count"] == local.config.num_hidden_layers
    assert shown.modelinfo["llama.embedding_length"] == local.config.hidden_size
    assert listed[0].size == sum(file.stat().st_size for file in Path(served["path"]).glob("*.safetensors")) > 0
    assert client.pull(model_id).status == "success"  # there already: nothing to download
    assert [line.status for line in client.pull(f"{model_id}:latest", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError, match="cannot be deleted"):
        client.delete(model_id)
    greedy = {"temperature": 0, "num_predict": 12}

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where do bees live?"}]
    prompt_ids = chat_prompt_ids(tokenizer, messages)
    text, finish, tokens = local_reply(reference, prompt_ids, 12, stop_strings(tokenizer))
    whole = client.chat(model=model_id, messages=messages, options=greedy)
    assert (whole.message.role, whole.message.content) == ("assistant", text)
    assert whole.done and whole.done_reason == finish
    assert whole.prompt_eval_count == prompt_ids.shape[1] and whole.total_duration > whole.eval_duration > 0
    if tokens >= 0:
        assert whole.eval_count == tokens
    chunks = list(client.chat(model=f"{model_id}:latest", messages=messages, options=greedy, stream=True))
    assert len(chunks) > 2 and "".join(chunk.message.content for chunk in chunks) == text
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True] and chunks[-1].done_reason == finish

    # logprobs: the model's own, as transformers computes them, streamed or not
    flower = [{"role": "user", "content": "Name a flower."}]
    tokens, logprobs = local_logprobs(reference, chat_prompt_ids(tokenizer, flower), 8)
    for stream in (False, True):
        reply = client.chat(model=model_id, messages=flower, options={**greedy, "num_predict": 8}, stream=stream,
                            logprobs=True, top_logprobs=2)  # fmt: skip
        entries = [entry for chunk in (reply if stream else [reply]) for entry in chunk.logprobs or []]
        assert [entry.token for entry in entries] == [tokenizer.decode([t]) for t in tokens]
        for entry, token, row in zip(entries, tokens, logprobs):
            best = row.topk(2)
            assert abs(entry.logprob - row[token].item()) < 1e-4
            assert [top.token for top in entry.top_logprobs] == [tokenizer.decode([i]) for i in best.indices.tolist()]
            assert max(abs(top.logprob - v) for top, v in zip(entry.top_logprobs, best.values.tolist())) < 1e-4

    # generate: the prompt as the user's message (after the system prompt), or as it is with raw
    prompt_ids = chat_prompt_ids(tokenizer, [messages[0], {"role": "user", "content": "Hi"}])
    text = local_reply(reference, prompt_ids, 12, stop_strings(tokenizer))[0]
    chunks = client.generate(model=model_id, prompt="Hi", system="Be brief.", options=greedy, stream=True)
    assert "".join(chunk.response for chunk in chunks) == text
    text = local_reply(reference, tokenizer("A quiet field of", return_tensors="pt")["input_ids"], 12)[0]
    assert client.generate(model=model_id, prompt="A quiet field of", raw=True, options=greedy).response == text
    body = {"model": model_id, "prompt": "A quiet field of", "raw": True, "options": greedy, "stream": False}
    as_curl_sends_it = {"Content-Type": "application/x-www-form-urlencoded"}  # Ollama's examples: curl -d '{...}'
    request = urllib.request.Request(served["url"] + "api/generate", json.dumps(body).encode(), as_curl_sends_it)
    assert json.load(urllib.request.urlopen(request, timeout=60))["response"] == text
    assert client.generate(model=model_id, prompt="").done_reason == "load"  # how clients load a model ahead

    # Ollama's older way to chat through generate: each reply's `context` (its prompt's and its own tokens), passed
    # back with the next prompt, is where that prompt goes on from
    first = client.generate(model=model_id, prompt="Hi", options=greedy)
    prompt_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    assert first.context[: prompt_ids.shape[1]] == prompt_ids[0].tolist()
    assert tokenizer.decode(first.context[prompt_ids.shape[1] :], skip_special_tokens=True) == first.response
    more = chat_prompt_ids(tokenizer, [{"role": "user", "content": "And you?"}])
    prompt_ids = torch.cat([torch.tensor([first.context]), more], dim=1)
    answer = local_reply(reference, prompt_ids, 12, stop_strings(tokenizer))[0]
    chunks = list(client.generate(model=model_id, prompt="And you?", context=first.context, options=greedy,
                                  stream=True))  # fmt: skip
    assert "".join(chunk.response for chunk in chunks) == answer and chunks[-1].prompt_eval_count == prompt_ids.shape[1]
    assert chunks[-1].context[: prompt_ids.shape[1]] == prompt_ids[0].tolist() and not chunks[0].context
    for bad in ([-1], [local.config.vocab_size]):
        with pytest.raises(ollama.ResponseError, match="context token ids must be in"):
            client.generate(model=model_id, prompt="Hi", context=bad)

    # sampling: a seed repeats a reply; top_k 1 leaves only the likeliest token, whatever the temperature
    sampled = {"temperature": 1.5, "top_p": 1, "top_k": 0, "num_predict": 12, "seed": 7}
    raw = lambda options: client.generate(model=model_id, prompt="A quiet field of", raw=True, options=options).response
    assert raw(sampled) == raw(sampled) != text
    assert raw({**sampled, "top_k": 1}) == text


def penalized_greedy(reference, prompt_ids: list[int], tokens: int, penalty: float, window: int) -> list[int]:
    """Greedy decoding step by step with the local model, each logit of the last `window` tokens' ids divided by
    `penalty` (multiplied, if negative): Ollama's repeat_penalty and repeat_last_n."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(tokens):
            logits = reference[0](torch.tensor([ids])).logits[0, -1]
            for seen in set(ids[-window:]):
                logits[seen] = logits[seen] / penalty if logits[seen] > 0 else logits[seen] * penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def test_ollamas_repeat_penalty_looks_back_over_repeat_last_n_tokens(served, model_id, reference):
    client = ollama.Client(host=served["url"].rstrip("/"), timeout=120)
    prompt = "grass grass clover grass clover clover bees"
    prompt_ids = reference[1](prompt)["input_ids"]
    plain = penalized_greedy(reference, prompt_ids, 16, 1.0, 1)
    eos = reference[1].eos_token_id
    decode = lambda ids: reference[1].decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)
    replies = set()
    for window in (3, -1):  # the last 3 tokens, or all of them (transformers' repetition_penalty)
        expected = penalized_greedy(reference, prompt_ids, 16, 2.0, window if window > 0 else len(prompt_ids) + 16)
        options = {"temperature": 0, "num_predict": 16, "repeat_penalty": 2.0, "repeat_last_n": window}
        reply = client.generate(model=model_id, prompt=prompt, raw=True, options=options).response
        assert reply == decode(expected) and expected != plain
        replies.add(reply)
    assert len(replies) == 2  # the window matters


def local_embedding(reference, ids: list[int]) -> torch.Tensor:
    """The local model's last hidden states (after the final norm) for `ids`, averaged and scaled to length 1."""
    with torch.no_grad():
        hidden = reference[0].model(torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


EMBEDDED = ["Bees", "A quiet field of clover, humming in the afternoon sun, with a river beyond it", "Wind over hills"]


def test_embeddings_are_the_local_models_mean_hidden_state(client, model_id, reference, served):
    """OpenAI's client (which asks for base64) and plain JSON floats, texts of different lengths in one request (one
    padded batch), and token ids: each vector the local model's for that text alone."""
    ids = [reference[1](text)["input_ids"] for text in EMBEDDED]
    expected = torch.stack([local_embedding(reference, row) for row in ids])

    response = client.embeddings.create(model=model_id, input=EMBEDDED)
    assert [item.index for item in response.data] == [0, 1, 2]
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(map(len, ids))
    torch.testing.assert_close(torch.tensor([item.embedding for item in response.data]), expected, atol=1e-4, rtol=0)

    body = {"model": model_id, "input": ids[1], "encoding_format": "float"}  # token ids, floats in the JSON
    status, reply = http(served["url"] + "v1/embeddings", json.dumps(body).encode())
    assert status == 200 and reply["object"] == "list" and reply["data"][0]["object"] == "embedding", reply
    torch.testing.assert_close(torch.tensor(reply["data"][0]["embedding"]), expected[1], atol=1e-4, rtol=0)


def test_ollamas_client_embeds_as_the_local_model_does_cut_to_the_context(served, model_id, reference):
    ollama_client = ollama.Client(host=served["url"].rstrip("/"))
    ids = [reference[1](text)["input_ids"] for text in EMBEDDED]
    expected = torch.stack([local_embedding(reference, row) for row in ids])

    response = ollama_client.embed(model=model_id, input=EMBEDDED)
    torch.testing.assert_close(torch.tensor(response.embeddings), expected, atol=1e-4, rtol=0)
    assert response.prompt_eval_count == sum(map(len, ids))
    older = ollama_client.embeddings(model=model_id, prompt=EMBEDDED[2])  # the older route, one text
    torch.testing.assert_close(torch.tensor(older.embedding), expected[2], atol=1e-4, rtol=0)

    context = reference[0].config.max_position_embeddings
    long_text = "grass " * (context + 10)
    cut = reference[1](long_text)["input_ids"][:context]
    (vector,) = ollama_client.embed(model=model_id, input=long_text).embeddings  # truncate: Ollama's default
    torch.testing.assert_close(torch.tensor(vector), local_embedding(reference, cut), atol=1e-4, rtol=0)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.embed(model=model_id, input=long_text, truncate=False)
    assert caught.value.status_code == 400 and str(context) in caught.value.error


def test_embedding_batches_hold_every_text_once_within_their_token_budget():
    lengths = torch.randint(1, 120, (200,), generator=torch.Generator().manual_seed(0)).tolist() + [300]
    groups = batches(lengths, budget=256)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= 256 or len(group) == 1
    assert len(groups) < 60  # texts of similar length together: 201 texts of 60 tokens on average fill ~50 batches


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny-llama", "input": []}, "input"),
        ({"model": "tiny-llama", "input": ["a", ""]}, "input"),
        ({"model": "tiny-llama", "input": [[1, 2], [5, 100000]]}, "input"),
        ({"model": "tiny-llama", "input": ["a"] * 2049}, "input"),
        ({"model": "tiny-llama", "input": "a", "dimensions": 8}, "dimensions"),
        ({"model": "tiny-llama", "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "tiny-llama", "input": "grass " * 4200}, "input"),  # longer than the context
        ({"model": "tiny-llama", "input": ["grass " * 200] * 2000}, "input"),  # more tokens than a request may have
    ],
)
def test_bad_embedding_requests_are_a_400_naming_the_field(served, body, param):
    status, reply = http(served["url"] + "v1/embeddings", json.dumps(body).encode())
    assert status == 400 and reply["error"]["param"] == param, reply


HI = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("chat", {"model": "llama3", "messages": [HI]}, 404, "model 'llama3' not found"),
        ("generate", {"model": "tiny-llama", "prompt": "hi", "options": {"temperature": 3}}, 400, "temperature"),
        ("generate", {"model": "tiny-llama", "prompt": "hi", "options": {"num_predict": 0}}, 400, "num_predict"),
        ("generate", {"model": "tiny-llama", "prompt": "hi", "options": {"stop": ["", "b"]}}, 400, "options.stop"),
        ("chat", {"model": "tiny-llama", "messages": [HI], "format": {"type": "object", "not": {}}}, 400, "format"),
        ("chat", {"model": "tiny-llama", "messages": [{**HI, "images": ["aGk="]}]}, 400, "images"),
        ("generate", {"model": "tiny-llama", "prompt": "hi", "tools": [NOW]}, 400, "tool calls are for /api/chat"),
        ("chat", {"model": "tiny-llama", "messages": [HI], "tools": [NOW], "format": "json"}, 400, "tools and a JSON"),
        ("chat", {"model": "tiny-llama", "messages": []}, 400, "messages"),
        ("generate", b'{"model": "tiny-llama", "prompt": ', 400, "not valid JSON"),
        ("embed", {"model": "tiny-llama", "input": ["a", ""]}, 400, "input 1 is empty"),
        ("embed", {"model": "tiny-llama"}, 400, "input"),
        ("embeddings", {"model": "llama3", "prompt": "hi"}, 404, "model 'llama3' not found"),
        ("pull", {"model": "llama3"}, 404, "model 'llama3' not found"),
        ("copy", {"source": "tiny-llama", "destination": "mine"}, 400, "cannot be copied"),
    ],
)
def test_ollama_routes_refuse_bad_requests_in_ollamas_shape(served, path, body, status, words):
    answer = http(served["url"] + "api/" + path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert answer[0] == status and list(answer[1]) == ["error"] and words in answer[1]["error"], answer


def free_cache(url: str) -> list[int]:
    _, swarm = http(url + "api/swarm")
    (model,) = [model for model in swarm["models"] if model["dht_prefix"] == "tiny-llama"]
    return [server["cache_tokens_left"] for server in model["servers"]]


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        time.sleep(0.2)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_mid_answer_frees_its_server_sessions(client, model_id, served, stream):
    url, api = served["url"], served["api"]
    wait_until(lambda: free_cache(url) == [CACHE_TOKENS, CACHE_TOKENS])
    lines_before = len(api.lines)
    body = {"model": model_id, "prompt": "Endless", "max_tokens": 4000, "temperature": 0, "stream": stream}
    connection = HTTPConnection(urlsplit(url).netloc, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data:")
    # the session holds cache on both servers while it runs (as the servers announce)...
    wait_until(lambda: all(left < CACHE_TOKENS for left in free_cache(url)))
    connection.close()
    # ...and gives it back once the client went away, long before its 4000 tokens
    wait_until(lambda: free_cache(url) == [CACHE_TOKENS, CACHE_TOKENS])
    ended = api.wait_for(lambda line: "generation cancelled" in line, timeout=30, after=lines_before)
    generated = int(ended.split(" prompt + ")[1].split()[0])
    assert generated < 4000
    # and the API goes on serving
    assert client.completions.create(model=model_id, prompt="Again", max_tokens=3, temperature=0).choices[0].text


def test_a_request_reserves_what_reserve_tokens_asks_and_its_session_grows_as_the_reply_is_written(served, reference):
    """`meadow api --reserve-tokens 16`: a request for 4000 tokens holds far fewer on the servers while it writes
    (the whole max_tokens would be reserved otherwise), and a reply that outgrows its reservation is the local
    model's greedy text all the same."""
    api = start_api(served["path"], served["swarm"].initial_peers, "--reserve-tokens", "16", "--keep-sessions", "0")
    try:
        url = api_url(api)
        prompt_ids = reference[1]("Bees", return_tensors="pt")["input_ids"]
        expected = local_reply(reference, prompt_ids, 40)[0]
        status, reply = http(url + "v1/completions", json.dumps(
            {"model": "tiny-llama", "prompt": "Bees", "max_tokens": 40, "temperature": 0}).encode())  # fmt: skip
        assert status == 200 and reply["choices"][0]["text"] == expected
        wait_until(lambda: free_cache(url) == [CACHE_TOKENS, CACHE_TOKENS])
        body = {"model": "tiny-llama", "prompt": "Endless", "max_tokens": 4000, "temperature": 0, "stream": True}
        connection = HTTPConnection(urlsplit(url).netloc, timeout=60)
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        assert connection.getresponse().status == 200
        wait_until(lambda: all(left < CACHE_TOKENS for left in free_cache(url)))
        held = [CACHE_TOKENS - left for left in free_cache(url)]
        connection.close()
        assert max(held) < 2000, held  # the first announcements after it opened: a few growths of 128 at most
    finally:
        api.stop()


def test_a_conversations_next_turn_goes_on_in_the_session_kept_from_the_last(served, reference):
    """A request's session stays open a while after it (30 s by default): the conversation's next turn sends the
    servers only what is new (its usage says how many prompt tokens they held already), and its greedy answer is still
    the local model's. A kept session that its servers closed meanwhile (idle for their --idle-timeout) is replaced
    unseen: the turn is answered all the same."""
    local, tokenizer = reference
    api = start_api(served["path"], served["swarm"].initial_peers)
    lines_before = len(api.lines)

    def turn(messages: list[dict], held: torch.Tensor | None) -> tuple[str, torch.Tensor]:
        """The API's greedy answer, checked against the local one, and its cached tokens against the start its prompt
        shares with the ids the servers `held` (None: none); the ids they hold after it."""
        prompt_ids = chat_prompt_ids(tokenizer, messages)
        with torch.no_grad():
            out = local.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=12,
                                 do_sample=False)  # fmt: skip
        assert out.shape[1] == prompt_ids.shape[1] + 12  # no stop string or end of sequence (with this seed)
        reply = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12, temperature=0)
        answer = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
        assert reply.choices[0].message.content == answer
        shared = 0
        if held is not None:  # as far as this prompt begins with them (an answer's text may tokenize otherwise)
            n = min(held.shape[0], prompt_ids.shape[1] - 1)
            shared = int((held[:n] == prompt_ids[0, :n]).cumprod(0).sum())
        assert reply.usage.prompt_tokens_details.cached_tokens == shared
        # they hold the prompt and the answer but its last token (never sent)
        return reply.choices[0].message.content, out[0, :-1]

    try:
        client = openai.OpenAI(base_url=api_url(api) + "v1", api_key="unused", max_retries=0, timeout=120)
        messages, held = [{"role": "user", "content": "Tell me about the river by the hill farm."}], None
        for n in range(3):
            prompt_tokens = chat_prompt_ids(tokenizer, messages).shape[1]
            text, held = turn(messages, held)
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And {n}?"}]
            # the next turn's prompt begins with this whole one, at least
            assert torch.equal(chat_prompt_ids(tokenizer, messages)[0, :prompt_tokens], held[:prompt_tokens])
        # the Responses API goes on in it too
        response = client.responses.create(model="tiny-llama", input=messages, max_output_tokens=4, temperature=0)
        assert response.usage.input_tokens_details.cached_tokens >= prompt_tokens
        wait_until(lambda: all(left < CACHE_TOKENS for left in free_cache(served["url"])), timeout=4)  # kept: held
        time.sleep(5.5)  # the servers close it as idle
        turn(messages, None)
        assert any("a kept session failed" in line for line in api.lines[lines_before:])
    finally:
        api.stop()


def test_the_api_goes_on_when_its_dht_process_and_p2p_daemon_die(client, model_id, reference, served):
    """Killed under it (out of memory, say), they are started again: the monitor and generation keep working."""
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in descendants(served["api"].popen.pid)}
    helpers = [pid for pid, command in commands.items() if b"meadow" in command or b"p2pd" in command]
    assert len(helpers) == 2, commands  # the DHT process (a fork of the API) and its p2pd; not torch's helpers
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)
    status, swarm = http(served["url"] + "api/swarm")
    assert status == 200 and [model["dht_prefix"] for model in swarm["models"]] == ["partial", "tiny-llama"]
    prompt = "Bees"
    expected = local_reply(reference, reference[1](prompt, return_tensors="pt")["input_ids"], 8)[0]
    assert client.completions.create(model=model_id, prompt=prompt, max_tokens=8, temperature=0).choices[0].text == expected


def test_a_request_waits_for_room_on_a_full_server_unless_its_client_leaves(checkpoints, reference):
    """The only server is full (another peer's session holds 150 of its 200 cache slots): a request waits for room
    and gets its greedy text once that session ends, and a streamed one says at once that it waits; a request whose
    client went away while it waited is cancelled then and there, not when the server frees up. A streamed request
    that waits, is served by a new server, which dies mid-reply, says that it waits again, with no session ahead of
    it, and its text goes on."""
    path = checkpoints("llama", num_layers=4)
    prompt, max_tokens = "Bees", 60  # a session of 60-odd slots: no room in the 50 left
    expected = local_reply(reference, reference[1](prompt, return_tensors="pt")["input_ids"], max_tokens)[0]
    body = json.dumps({"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    with LocalSwarm() as swarm:
        swarm.start_dht()
        swarm.start_server(path, "--blocks", "0:4", "--cache-tokens", "200")
        api = start_api(path, swarm.initial_peers, "--keep-sessions", "0")  # each session's room is the holder's next
        keeping = start_api(path, swarm.initial_peers)  # used last (starting meanwhile)
        swarm.extra += [api, keeping]
        url, config = api_url(api), load_config(path)
        holder = connect_sequence(str(path), config, swarm.initial_peers)
        try:
            with holder.inference_session(max_length=150, batch_size=1) as held:
                hidden, positions = torch.randn(1, 3, config.hidden_size), torch.arange(3)[None]
                held.step(hidden, positions, torch.ones(1, 3, dtype=torch.bool))
                lines_before = len(api.lines)
                leaving = HTTPConnection(urlsplit(url).netloc, timeout=60)
                leaving.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                api.wait_for(lambda line: "is full (ServerBusy" in line, timeout=30, after=lines_before)
                leaving.close()
                api.wait_for(lambda line: "generation cancelled" in line, timeout=10, after=lines_before)
                # a streamed Responses request says at once that it waits, as a lifecycle event
                responses = HTTPConnection(urlsplit(url).netloc, timeout=60)
                asked = {"model": "tiny-llama", "input": prompt, "max_output_tokens": max_tokens, "stream": True}
                responses.request("POST", "/v1/responses", json.dumps(asked), {"Content-Type": "application/json"})
                events = (json.loads(line[6:]) for line in responses.getresponse() if line.startswith(b"data: "))
                lines_before = len(api.lines)
                waits = next(event for event in events if "meadow" in event.get("response", {}))
                assert waits["type"] == "response.in_progress"
                assert "not enough KV cache" in waits["response"]["meadow"]["waiting"]
                responses.close()
                api.wait_for(lambda line: "generation cancelled" in line, timeout=10, after=lines_before)
                client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
                with ThreadPoolExecutor(1) as pool:
                    staying = pool.submit(http, url + "v1/completions", body.encode())
                    streamed = client.completions.create(
                        model="tiny-llama", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
                    )  # fmt: skip
                    first = next(iter(streamed))  # at once, although no token can come yet
                    assert "not enough KV cache" in first.model_extra["meadow"]["waiting"] and not first.choices[0].text
                    time.sleep(1.0)
                    assert not staying.done()  # waiting for room, not failed
                    held.close()
                    status, reply = staying.result(timeout=60)
                    text = "".join(chunk.choices[0].text for chunk in streamed)
            assert status == 200 and reply["choices"][0]["text"] == expected
            assert text == expected
            # a streamed request waits at the full server, is served by a new one, which dies mid-reply: it says that it
            # waits again (its own old place in line, left when served, is no session ahead of it), and its text goes on
            long_tokens = 120  # room on a fresh server (150 of its 200 for one peer), not in the 50 the holder leaves
            prompt_ids = reference[1](prompt, return_tensors="pt")["input_ids"]
            expected, finish, _ = local_reply(reference, prompt_ids, long_tokens)
            assert finish == "length"  # the reply is long: its server dies before it ends
            with holder.inference_session(max_length=150, batch_size=1) as held:
                held.step(hidden, positions, torch.ones(1, 3, dtype=torch.bool))  # the only server is full again
                lines_before = len(api.lines)
                streamed = client.completions.create(
                    model="tiny-llama", prompt=prompt, max_tokens=long_tokens, temperature=0, stream=True
                )  # fmt: skip
                chunks = iter(streamed)
                assert "not enough KV cache" in next(chunks).model_extra["meadow"]["waiting"]
                spare = swarm.start_server(path, "--blocks", "0:4", "--cache-tokens", "200")
                text = ""
                while not text:
                    text = next(chunks).choices[0].text
                spare.signal(signal.SIGKILL)
                release = threading.Timer(30, held.close)  # ends the wait (and the test) if the stream never tells
                release.start()
                waits = []  # those told after the first text
                for chunk in chunks:
                    if waiting := (chunk.model_extra.get("meadow") or {}).get("waiting"):
                        waits.append(waiting)
                        release.cancel()
                        held.close()
                    text += chunk.choices[0].text
            assert len(waits) == 1 and "not enough KV cache" in waits[0]
            assert text == expected
            refusals = [line for line in api.lines[lines_before:] if "is full (ServerBusy" in line]
            assert len(refusals) >= 2 and not any("waiting ahead of yours" in line for line in refusals)
            # an API that keeps sessions lets them go when its own request waits for room: the session kept from a
            # 60-token reply and a 100-token one are more than the 150 slots one peer may hold
            kept_url = api_url(keeping)
            assert http(kept_url + "v1/completions", body.encode())[0] == 200
            other = {"model": "tiny-llama", "prompt": "Wasps", "max_tokens": 100, "temperature": 0}
            status, reply = http(kept_url + "v1/completions", json.dumps(other).encode())
            wasps_ids = reference[1]("Wasps", return_tensors="pt")["input_ids"]
            assert status == 200 and reply["choices"][0]["text"] == local_reply(reference, wasps_ids, 100)[0]
            assert any("letting 1 kept session(s) go" in line for line in keeping.lines)
        finally:
            holder.close()
