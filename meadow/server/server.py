"""The server process: join the DHT, pick and load a span of blocks, serve RPCs, keep the announcement fresh."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meadow.models import load_blocks, load_config, resolve_model_path
from meadow.models.lora import BlockLora, load_peft_adapter
from meadow.server.block_selection import choose_span
from meadow.server.handler import BlockHandler, Limits
from meadow.server.memory import CacheBudget
from meadow.server.span import Span
from meadow.swarm import ServerInfo, ServerState, announce, dht_prefix_for, fetch_servers, start_dht
from meadow.wire import BlockRange

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServerConfig:
    """Everything `meadow serve` can be told."""

    model: str
    initial_peers: list[str] = field(default_factory=list)
    blocks: BlockRange | None = None
    num_blocks: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    cache_tokens: int = 16384
    dht_prefix: str | None = None
    public_name: str | None = None
    update_period: float = 30.0  # seconds between announcements; records expire after 3 periods
    nat_port_map: bool = False
    adapters: list[str] = field(default_factory=list)  # peft LoRA adapter folders to serve, each named by its folder
    limits: Limits = field(default_factory=Limits)


class Server:
    """One volunteer server. `run()` blocks until SIGINT/SIGTERM, then announces it is offline and exits."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = load_config(self.model_path)
        self.dht_prefix = config.dht_prefix or dht_prefix_for(config.model)
        if config.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype}")
        self.dtype, self.device = DTYPES[config.dtype], torch.device(config.device)
        self.state = ServerState.JOINING
        self.throughput = self.inference_rps = 0.0

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        self.dht = start_dht(config.initial_peers, host=config.host, port=config.port, nat_port_map=config.nat_port_map)
        try:
            self.span_range = self._pick_span()
            await self._announce()  # joining: clients see who is coming but do not route through us yet
            blocks = await loop.run_in_executor(
                None,
                lambda: load_blocks(
                    self.model_path, self.model_config, self.span_range.start, self.span_range.end, self.dtype, self.device
                ),
            )
            adapters = await loop.run_in_executor(None, self._load_adapters)
            self.span = Span(blocks, self.span_range.start, self.model_config, self.dtype, self.device, adapters)
            self.budget = CacheBudget(config.cache_tokens)
            self.throughput, self.inference_rps = await loop.run_in_executor(None, self._measure_speed)
            handler = BlockHandler(self.span, self.budget, config.limits, self.info_dict)
            p2p = await self.dht.replicate_p2p()
            await handler.register(p2p)

            self.state = ServerState.ONLINE
            await self._announce()
            print(
                f"Server ready: {self.dht_prefix} blocks {self.span_range} as {self.dht.peer_id}, "
                f"{self.throughput:.0f} tokens/s, {self.inference_rps:.0f} steps/s/block",
                flush=True,
            )
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), config.update_period)
                except asyncio.TimeoutError:
                    await self._announce()
        finally:
            self.state = ServerState.OFFLINE
            try:
                await self._announce()  # at once, so clients reroute before the record would expire
            except Exception as e:
                logger.warning(f"could not announce going offline: {e}")
            self.dht.shutdown()
            print("Server stopped", flush=True)

    def _pick_span(self) -> BlockRange:
        total = self.model_config.num_hidden_layers
        if self.config.blocks is not None:
            if self.config.blocks.end > total:
                raise ValueError(f"--blocks {self.config.blocks} is out of range: the model has {total} blocks")
            return self.config.blocks
        num_blocks = min(self.config.num_blocks or total, total)
        coverage = [len(servers) for servers in fetch_servers(self.dht, self.dht_prefix, total)]
        start = choose_span(coverage, num_blocks)
        return BlockRange(start=start, end=start + num_blocks)

    def _load_adapters(self) -> dict[str, list[BlockLora]]:
        """The LoRA updates of every --adapters folder for this server's blocks (AdapterError if one does not fit)."""
        start, end = self.span_range.start, self.span_range.end
        return {
            Path(path).name: load_peft_adapter(path, self.model_config, start, end, self.dtype, self.device)
            for path in self.config.adapters
        }

    def info(self) -> ServerInfo:
        return ServerInfo(
            state=self.state,
            start=self.span_range.start,
            end=self.span_range.end,
            throughput=self.throughput,
            inference_rps=self.inference_rps,
            cache_tokens_left=self.budget.left if hasattr(self, "budget") else self.config.cache_tokens,
            dtype=self.config.dtype,
            public_name=self.config.public_name,
            adapters=tuple(Path(path).name for path in self.config.adapters),
        )

    def info_dict(self) -> dict:
        return {**self.info().to_wire(), "dht_prefix": self.dht_prefix, "max_length": self.config.limits.max_length}

    async def _announce(self) -> None:
        info, expiration = self.info(), 3 * self.config.update_period
        await asyncio.get_running_loop().run_in_executor(None, announce, self.dht, self.dht_prefix, info, expiration)

    @torch.inference_mode()
    def _measure_speed(self) -> tuple[float, float]:
        """Rough speeds for routing: tokens/s of a 128-token forward through the span, and 1-token steps/s per block.
        (Proper, cached measurement belongs to load balancing.)"""
        block = self.span.blocks[0]
        hidden_size = self.model_config.hidden_size
        timings = []
        for length in (1, 128):
            x = torch.randn(1, length, hidden_size, dtype=self.dtype, device=self.device)
            positions = torch.arange(length, device=self.device)[None]
            block(x, positions)  # warm-up
            began = time.perf_counter()
            for _ in range(3):
                block(x, positions)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            timings.append((time.perf_counter() - began) / 3)
        step_time, forward_time = timings
        return 128 / (forward_time * len(self.span.blocks)), 1 / step_time
