"""How many blocks a server given no span takes: what a block holds, quantized or not, and its KV cache; the memory
other servers on the machine have claimed."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from meadow.models import load_config
from meadow.models.default import default_model_path
from meadow.server.memory_claims import MemoryClaims
from meadow.server.sizing import NotEnoughMemory, block_bytes, blocks_that_fit
from meadow.server.throughput import random_block

CPU = torch.device("cpu")
LAYERS = {"llama": "layers.0", "mixtral": "layers.0", "bloom": "h.0"}  # where transformers keeps block 0


def test_a_block_is_sized_as_a_server_holds_it(checkpoints):
    config = load_config(default_model_path())
    for quant in ("int8", "nf4"):  # bitsandbytes' weights and constants, as a quantized server loads them
        block = random_block(config, torch.float32, CPU, quant)
        held = sum(tensor.numel() * tensor.element_size() for tensor in block.state_dict().values())
        assert held <= block_bytes(config, torch.float32, quant) <= 1.25 * held, quant
    for family in ("llama", "mixtral", "bloom"):  # transformers' own blocks, float32
        path = checkpoints(family, num_layers=2)
        layer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).base_model.get_submodule(LAYERS[family])
        weights = block_bytes(load_config(path), torch.float32)
        assert weights == sum(parameter.numel() * 4 for parameter in layer.parameters()), family
        assert block_bytes(load_config(path), torch.bfloat16) * 2 == weights
    cache = block_bytes(config, torch.float32, cache_tokens=1000) - block_bytes(config, torch.float32)
    assert cache == 1000 * 2 * config.num_key_value_heads * config.head_dim * 4  # keys and values, float32


def test_as_many_blocks_as_fit_and_a_clear_error_when_none_does():
    block = 100 * 2**20
    assert blocks_that_fit(8 * 2**30, block, 30, CPU) == 30  # all of them, with room to spare
    assert blocks_that_fit(3 * 2**30, block, 30, CPU) == 17  # 90% of 3 GiB, less 1 GiB for the process: 1741 MiB
    with pytest.raises(NotEnoughMemory, match="one block needs 100 MiB .* 1.0 GiB free: use --quant"):
        blocks_that_fit(2**30, block, 30, CPU)


def hold_claim(folder: Path, nbytes: int, ready, done) -> None:
    """A server's claim, in another process, for as long as `done` is not set."""
    claims = MemoryClaims(CPU, folder)
    with claims.locked():
        claims.set(nbytes)
    ready.set()
    done.wait(60)


def test_servers_on_one_machine_count_each_others_claims_until_they_end(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    other = context.Process(target=hold_claim, args=(tmp_path, 3 * 2**30, ready, done))
    other.start()
    try:
        assert ready.wait(60)
        mine, on_gpu = MemoryClaims(CPU, tmp_path), MemoryClaims(torch.device("cuda"), tmp_path)
        with mine.locked():
            assert mine.others() == 3 * 2**30 and on_gpu.others() == 0  # claims are per device
            mine.set(2**30)
        assert mine.others() == 3 * 2**30  # its own claim is not among the others'
        done.set()
        other.join(60)
        assert mine.others() == 0 and not (tmp_path / f"{other.pid}.json").exists()  # it ended: its claim is dropped
        (tmp_path / "1.json").write_text(json.dumps({"device": "cpu", "bytes": 5, "started": 0.0}))
        assert mine.others() == 0  # a claim whose pid now names another process (started at another time)
        mine.release()
        assert not list(tmp_path.glob("*.json"))
    finally:
        done.set()
        other.join(60)


def size_and_claim(folder: Path, nbytes: int, go, seen, done) -> None:
    """A server sizing itself, in another process: it reads the others' claims, thinks, and claims `nbytes`; it lives
    until `done`."""
    claims = MemoryClaims(CPU, folder)
    go.wait(60)
    with claims.locked():
        others = claims.others()
        time.sleep(0.3)  # loading a config, measuring free memory...
        claims.set(nbytes)
    seen.put(others)
    done.wait(60)


def test_servers_sizing_themselves_at_once_each_count_the_claim_of_the_one_before(tmp_path):
    """The lock makes reading the others' claims and setting one's own a single step: of two servers that size
    themselves at the same moment, the second counts the first's claim (without it, both would count none)."""
    context = multiprocessing.get_context("spawn")
    go, seen, done = context.Event(), context.Queue(), context.Event()
    servers = [context.Process(target=size_and_claim, args=(tmp_path, n, go, seen, done)) for n in (2**30, 2**31)]
    for server in servers:
        server.start()
    time.sleep(1.0)  # both started (most likely waiting at the same line by now)
    go.set()
    try:
        counted = sorted(seen.get(timeout=60) for _ in servers)
    finally:
        done.set()
        for server in servers:
            server.join(60)
    assert counted[0] == 0 and counted[1] in (2**30, 2**31)
