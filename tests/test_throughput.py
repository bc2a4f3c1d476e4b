"""A server's speed is measured once per model shape, device, dtype and torch version, then read from the cache."""

from __future__ import annotations

import json
import math

import torch

from meadow.models import load_config
from meadow.server.throughput import CACHE_FILE, block_speed, cache_key, measure_block_speed

CPU = torch.device("cpu")


def test_speed_is_measured_once_then_read_from_the_cache(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("MEADOW_HOME", str(tmp_path))
    config = load_config(checkpoints("llama", num_layers=2))
    speed, cached = block_speed(config, torch.float32, CPU)
    assert not cached
    assert math.isfinite(speed.forward_tps) and speed.forward_tps > 0
    assert math.isfinite(speed.inference_rps) and speed.inference_rps > 0
    stored = json.loads((tmp_path / CACHE_FILE).read_text())
    assert stored[cache_key(config, torch.float32, CPU)]["forward_tps"] == speed.forward_tps

    again, cached = block_speed(config, torch.float32, CPU)
    assert cached and again == speed  # a restart does not measure again
    _, cached = block_speed(config, torch.float32, CPU, remeasure=True)  # --throughput eval
    assert not cached

    _, cached = block_speed(config, torch.bfloat16, CPU)  # another dtype is another entry
    assert not cached
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_cache_key_names_shape_device_dtype_and_torch_version(checkpoints):
    small = load_config(checkpoints("llama", num_layers=2))
    wide = load_config(checkpoints("llama", num_layers=2, hidden_size=128))
    key = cache_key(small, torch.float32, CPU)
    assert torch.__version__ in key and "float32" in key and "cpu" in key
    assert key != cache_key(wide, torch.float32, CPU)
    assert key != cache_key(small, torch.float16, CPU)
    assert key == cache_key(load_config(checkpoints("llama", num_layers=4)), torch.float32, CPU)  # depth is not shape


def test_a_damaged_cache_is_measured_again(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("MEADOW_HOME", str(tmp_path))
    config = load_config(checkpoints("llama", num_layers=2))
    (tmp_path / CACHE_FILE).write_text("{not json")
    _, cached = block_speed(config, torch.float32, CPU)
    assert not cached
    (tmp_path / CACHE_FILE).write_text(json.dumps({cache_key(config, torch.float32, CPU): {"forward_tps": "fast"}}))
    _, cached = block_speed(config, torch.float32, CPU)
    assert not cached
    assert block_speed(config, torch.float32, CPU)[1]


def test_blocks_with_biases_are_timed_in_half_precision(checkpoints):
    speed = measure_block_speed(load_config(checkpoints("qwen2", num_layers=1)), torch.bfloat16, CPU, seconds=0.01)
    assert speed.forward_tps > 0 and speed.inference_rps > 0
