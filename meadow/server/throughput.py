"""How fast this server is. Compute speed per block is measured once per model shape, device, dtype, quant and
torch version, on a random block of the model's shape quantized like the served ones, and cached on disk so a
restart does not measure again. The network is not speed-tested (that would mean traffic to strangers): the
server only times a DHT ping to a few peers it already knows, and reports that round trip."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import hivemind
import torch
from torch import nn

from meadow.home import meadow_home
from meadow.models import BlockConfig, KVCache, make_block
from meadow.models.packed import pack_block, packs
from meadow.models.quant import quantize_block

FORWARD_TOKENS = 128  # one batched forward of this many tokens stands for prefill and training traffic
CACHE_LENGTH = 256  # decoding steps attend to up to this many cached tokens while being timed
CACHE_FILE = "throughput.json"


@dataclass(frozen=True)
class BlockSpeed:
    """Compute speed of one block of a model on one device and dtype."""

    forward_tps: float  # tokens/s through one block in a 1 x 128-token forward
    inference_rps: float  # single-token decoding steps/s through one block with a KV cache

    def span_throughput(self, num_blocks: int) -> float:
        """Tokens/s through a span of `num_blocks` blocks when batching: what ServerInfo.throughput announces.
        It is also how much this server adds to each block of its span when the swarm is balanced."""
        return self.forward_tps / num_blocks


def cache_key(config: BlockConfig, dtype: torch.dtype, device: torch.device, quant: str = "none") -> str:
    """Everything the speed depends on: the block's shape, the device (and CPU threads), the dtype, the quant of its
    linear layers, torch's version."""
    shape = config.block_shape()
    dtype_name = str(dtype).removeprefix("torch.")
    layers = f"quant {quant}" + (" packed" if quant == "none" and packs(dtype, device) else "")  # packed: faster
    return f"{shape} | {device_name(device)} | {dtype_name} | {layers} | torch {torch.__version__}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type} {cpu}, {torch.get_num_threads()} threads"


def block_speed(
    config: BlockConfig, dtype: torch.dtype, device: torch.device, quant: str = "none", *, remeasure: bool = False
) -> tuple[BlockSpeed, bool]:
    """This machine's speed for `config`'s blocks, and whether it came from the cache (False: measured just now)."""
    path, key = meadow_home() / CACHE_FILE, cache_key(config, dtype, device, quant)
    cached = _read(path)
    if not remeasure and key in cached:
        try:
            return BlockSpeed(**{name: float(cached[key][name]) for name in ("forward_tps", "inference_rps")}), True
        except (KeyError, TypeError, ValueError):
            pass  # a damaged entry is measured again
    speed = measure_block_speed(config, dtype, device, quant)
    cached = _read(path)  # another server may have written meanwhile; keep its entries
    cached[key] = {**asdict(speed), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write(path, cached)
    return speed, False


def measure_block_speed(
    config: BlockConfig, dtype: torch.dtype, device: torch.device, quant: str = "none", seconds: float = 0.1
) -> BlockSpeed:
    """Time a random block of `config`'s shape, its linear layers quantized per `quant`: a 1 x 128-token forward,
    and single-token steps with a KV cache. Each is repeated for about `seconds` (at least 3 times), so a tiny
    model takes well under a second."""
    block = random_block(config, dtype, device, quant)
    with torch.inference_mode():
        x = torch.randn(1, FORWARD_TOKENS, config.hidden_size, dtype=dtype, device=device)
        positions = torch.arange(FORWARD_TOKENS, device=device)[None]
        forward_time = _time_per_call(lambda: block(x, positions), device, seconds)

        cache = KVCache(1, config.num_key_value_heads, CACHE_LENGTH, config.head_dim, dtype, device)
        token, step = x[:, :1], iter(range(10**9))

        def decode() -> None:
            position = next(step) % CACHE_LENGTH
            block(token, torch.tensor([[position]], device=device), None, cache, start=position)

        step_time = _time_per_call(decode, device, seconds)
    return BlockSpeed(forward_tps=FORWARD_TOKENS / forward_time, inference_rps=1.0 / step_time)


def random_block(config: BlockConfig, dtype: torch.dtype, device: torch.device, quant: str = "none") -> nn.Module:
    """A block of `config`'s shape with small random weights on `device` in `dtype`, its linear layers quantized
    per `quant` like a server's (made on the CPU then, where bitsandbytes quantizes from)."""
    with torch.device("meta"):
        block = make_block(config)
    block = block.to(dtype=dtype).to_empty(device=device if quant == "none" else "cpu").requires_grad_(False)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            # norm scales of 1 and weights of std 0.02 keep activations finite in float16
            parameter.fill_(1.0) if "norm" in name else parameter.normal_(0.0, 0.02)
    return pack_block(quantize_block(block, quant, device)).eval()


def _time_per_call(fn: Callable[[], object], device: torch.device, seconds: float) -> float:
    fn()  # warm-up: kernels, allocator
    _sync(device)
    calls, began = 0, time.perf_counter()
    while calls < 3 or (time.perf_counter() - began < seconds and calls < 10_000):
        fn()
        calls += 1
        if device.type == "cuda" and calls % 8 == 0:
            _sync(device)  # calls are timed end to end, not just queued
    _sync(device)
    return (time.perf_counter() - began) / calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    """Write atomically: servers started together may write at once, and a reader must never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def ping_peers(dht: hivemind.DHT, count: int = 3, timeout: float = 2.0) -> float | None:
    """Median round trip (seconds) of a DHT ping to up to `count` peers this node knows, None if none answered."""
    times = dht.run_coroutine(partial(_ping_peers, count=count, timeout=timeout))
    return statistics.median(times) if times else None


# run_coroutine pickles its function into the DHT's process, so this lives at module level.
async def _ping_peers(_dht, node, *, count: int, timeout: float) -> list[float]:
    import asyncio

    async def ping(peer) -> float | None:
        began = time.perf_counter()
        try:
            answered = await asyncio.wait_for(node.protocol.call_ping(peer), timeout)
        except Exception:
            return None
        return time.perf_counter() - began if answered is not None else None

    peers = sorted(node.protocol.routing_table.peer_id_to_uid, key=str)[:count]
    times = await asyncio.gather(*(ping(peer) for peer in peers))
    return [t for t in times if t is not None]
