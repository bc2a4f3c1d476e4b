"""One client model, many threads: as in a web server, each thread's generate gets its own inference session."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from meadow.client.model import AutoDistributedModelForCausalLM
from tests.conftest import start_swarm

THREADS = 32
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def swarm(checkpoints):
    path = checkpoints("llama", num_layers=4)
    with start_swarm(path, ["0:2", "2:4"]) as swarm:
        yield swarm, path


def test_threads_generating_at_once_on_one_model_each_get_their_own_greedy_tokens(swarm):
    swarm, path = swarm
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [f"Request number {i} asks for {'x' * (i % 7)} something" for i in range(THREADS)]
    expected = [local.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=NEW_TOKENS, do_sample=False)[0] for p in prompts]

    with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as model:
        start = threading.Barrier(THREADS)

        def generate(prompt: str) -> torch.Tensor:
            inputs = tokenizer(prompt, return_tensors="pt")
            start.wait()  # all at once
            return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0]

        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(generate, prompts))
    for prompt, result, want in zip(prompts, results, expected):
        assert result.tolist() == want.tolist(), prompt


def test_an_inference_session_belongs_to_the_thread_that_opened_it(swarm):
    swarm, path = swarm
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers) as model:
        opened, release = threading.Event(), threading.Event()

        def chat() -> list[int]:
            # a two-turn chat in one session, while another thread generates without one
            with model.inference_session(max_length=64):
                ids = tokenizer("First turn", return_tensors="pt")["input_ids"]
                ids = model.generate(ids, max_new_tokens=3, do_sample=False)
                opened.set()
                release.wait(60)
                more = tokenizer(" and more", add_special_tokens=False, return_tensors="pt")["input_ids"]
                return model.generate(torch.cat([ids, more], dim=1), max_new_tokens=3, do_sample=False)[0].tolist()

        with ThreadPoolExecutor(1) as pool:
            chatted = pool.submit(chat)
            assert opened.wait(120)
            assert model.session is None  # the other thread's session is not ours
            other = tokenizer("Another thread", return_tensors="pt")["input_ids"]
            assert model.generate(other, max_new_tokens=3, do_sample=False)[0].tolist() == local.generate(
                other, max_new_tokens=3, do_sample=False
            )[0].tolist()
            release.set()
            turns = chatted.result(120)
    first = local.generate(tokenizer("First turn", return_tensors="pt")["input_ids"], max_new_tokens=3, do_sample=False)
    more = tokenizer(" and more", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert turns == local.generate(torch.cat([first, more], dim=1), max_new_tokens=3, do_sample=False)[0].tolist()
