"""The server process: join the DHT, pick and load a span of blocks, serve RPCs, keep the announcement fresh."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from meadow.home import meadow_home
from meadow.models import BlockConfig, load_blocks, load_config, resolve_model_path
from meadow.models.fingerprint import checkpoint_fingerprint
from meadow.models.lora import BlockLora, load_peft_adapter
from meadow.models.packed import pack_block, stop_packing
from meadow.models.quant import check_quant, quantize_block
from meadow.server.block_selection import Placement, block_throughputs, choose_move, choose_span, placements
from meadow.server.handler import BlockHandler, Limits
from meadow.server.memory import CacheBudget
from meadow.server.memory_claims import MemoryClaims
from meadow.server.sizing import NotEnoughMemory, block_bytes, blocks_that_fit, free_memory
from meadow.server.span import Span
from meadow.server.throughput import BlockSpeed, block_speed, ping_peers
from meadow.stopping import exit_now, on_stop_signals
from meadow.swarm import (
    ModelInfo, ServerInfo, ServerState, announce, announce_ledger, dht_prefix_for, fetch_servers, model_name, start_dht,
)  # fmt: skip
from meadow.swarm.dht import call_dht, check_dht_alive, shut_down_dht
from meadow.swarm.records import MAX_SPEED
from meadow.wire import BlockRange

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_blocks(
    path: Path, config: BlockConfig, blocks: BlockRange, dtype: torch.dtype, device: torch.device, quant: str
) -> list[nn.Module]:
    """The blocks on `device`, their linear layers made ready to serve: quantized per `quant`, or else packed for
    oneDNN on a CPU (packed.py); each before the next block is read, so peak memory is the span plus one float block."""
    read_on = "cpu" if quant != "none" else device  # bitsandbytes quantizes from the CPU
    prepare = lambda block: pack_block(quantize_block(block, quant, device))
    return load_blocks(path, config, blocks.start, blocks.end, dtype, read_on, prepare=prepare)


def _quiet_about_cancelled_callbacks(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The loop's handler of errors in callbacks, minus a cancellation: Python 3.11's asyncio streams call a cancelled
    handler task's exception() in a callback (3.12 checks first), so each stream another server still had open to us
    (a push) when we stopped printed a traceback after "Server stopped", for nothing."""
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


def points_summary(points: dict[str, float], me: str, shown: int = 10) -> str:
    """The `shown` highest points and ours, highest first, and how many more peers there are: in a swarm of a
    thousand servers, a line listing every one would be unreadable."""
    top = sorted(points, key=points.get, reverse=True)[:shown]
    top += [me] if me in points and me not in top else []
    more = f", and {len(points) - len(top)} more" if len(points) > len(top) else ""
    return ", ".join(f"{peer} {points[peer]:.6g}" for peer in top) + more


async def unless_stopped(work: asyncio.Future, stop: asyncio.Event) -> bool:
    """Wait for `work` or for `stop`, whichever comes first; True if `work` is done, else it is cancelled. A server
    must obey its stop even while a call into its DHT process hangs (stopped, stuck), which never returns."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not work.done():
        work.cancel()
        return False
    return True


class BadServerConfig(ValueError):
    """A server option that cannot work (here): out of range, or a device this machine lacks."""


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
    quant: str = "none"  # the blocks' linear layers as loaded: none, int8 (LLM.int8()) or nf4
    exact: bool = False  # CPU float32: torch's own products, not oneDNN's faster packed ones (models/packed.py)
    cache_tokens: int = 16384
    dht_prefix: str | None = None
    public_name: str | None = None
    update_period: float = 30.0  # seconds between announcements; records expire after 3 periods
    balance_period: float = 60.0  # mean seconds between checks whether to move (only servers without --blocks move)
    balance_quality: float = 0.75  # move only if the weakest block's throughput then exceeds (what it is now) / this
    throughput: str | float = "auto"  # "auto": measured once, then cached; "eval": measure again; a number: announce it
    nat_port_map: bool = False
    identity: str | None = None  # `meadow keygen` file: the same peer id across restarts (default: a new one each start)
    allow_peers: str | None = None  # a private swarm: file of the peer ids we serve and talk to (swarm/allow_list.py)
    adapters: list[str] = field(default_factory=list)  # peft LoRA adapter folders to serve, each named by its folder
    limits: Limits = field(default_factory=Limits)
    points_period: float = 60.0  # seconds between re-reading and verifying every ledger (for priorities)
    points_seeds: list[str] = field(default_factory=list)  # trusted peer ids: EigenTrust's pre-trusted peers
    points_allow: list[str] | None = None  # a private swarm: only receipts signed by these peer ids count


def usable_device(name: str) -> torch.device:
    """The torch device `name` if this machine has it; BadServerConfig if not (a CPU build of torch, a GPU index past
    the last), before any block is loaded onto it."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # torch's "not compiled with CUDA enabled" is an AssertionError
        raise BadServerConfig(f"--device {name} cannot be used here: {e}") from None
    return device


class Server:
    """One volunteer server. `run()` blocks until SIGINT/SIGTERM, then tells its sessions it is leaving, announces
    it is offline and exits. Started with --num-blocks, it moves to other blocks when the swarm needs it there."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = load_config(self.model_path)
        self.dht_prefix = config.dht_prefix or dht_prefix_for(config.model)
        self.fingerprint = checkpoint_fingerprint(self.model_path)  # clients use only servers of their checkpoint
        if config.dtype not in DTYPES:
            raise BadServerConfig(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype}")
        if not 0 < config.balance_quality <= 1:
            raise BadServerConfig(f"--balance-quality must be in (0, 1], got {config.balance_quality}")
        self.dtype, self.device = DTYPES[config.dtype], usable_device(config.device)
        check_quant(config.quant, self.dtype, self.device)  # a quant this machine cannot run stops us now
        if config.exact:
            stop_packing()  # before any block is loaded or timed: the speed announced is the unpacked blocks' speed
        self.state = ServerState.JOINING
        self.span_range: BlockRange | None = None
        self.claims = MemoryClaims(self.device)  # what this server will take, for others starting on this machine
        # of a server that picks its span: given, or as many as fit in memory
        self.num_blocks = self._blocks_that_fit(len(config.blocks) if config.blocks is not None else config.num_blocks)
        self.speed: BlockSpeed | None = None  # None when --throughput gives a number instead of measuring
        limits = config.limits  # one budget for the server's life: a move keeps its size
        self.budget = CacheBudget(config.cache_tokens, limits.max_peer_cache_share, limits.max_peer_sessions)
        self.handler = BlockHandler(self.model_config, self.budget, config.limits, self.info_dict)

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_about_cancelled_callbacks)
        stop, started = asyncio.Event(), threading.Event()

        def on_stop() -> None:
            # before we serve anything, nothing needs an orderly goodbye (and the DHT process may have died during
            # start-up, leaving us waiting for it); a second stop does not wait for the first one either (stopping.py)
            if not started.is_set():
                exit_now(1)
            loop.call_soon_threadsafe(stop.set)

        on_stop_signals(on_stop)

        preloaded: list[Span] = []

        def load_given_span() -> None:
            # with --blocks the span is known before the swarm is: it loads while the DHT process joins
            if config.blocks is not None:
                preloaded.append(self._load_span(self._pick_span()))

        self.dht = start_dht(
            config.initial_peers, host=config.host, port=config.port, nat_port_map=config.nat_port_map,
            identity=config.identity, swarms={self.dht_prefix: self.model_config.num_hidden_layers},
            allow_peers=config.allow_peers, while_joining=load_given_span,
        )  # fmt: skip
        p2p = None
        try:
            speed_source = await loop.run_in_executor(None, self._measure)
            rtt = await loop.run_in_executor(None, ping_peers, self.dht)
            first = self._pick_span()
            self.span_range = first
            p2p = await self.dht.replicate_p2p()
            await self.handler.register(p2p, self.dht.allowed)
            await self._start_points(p2p)
            await self._take(first, preloaded[0] if preloaded else None)
            print(
                f"Server ready: {self.dht_prefix} blocks {self.span_range} as {self.dht.peer_id}, "
                f"{self.throughput:.0f} tokens/s, {self.inference_rps:.0f} steps/s/block ({speed_source}), "
                f"DHT ping {'none answered' if rtt is None else f'{rtt * 1000:.1f} ms'}",
                flush=True,
            )
            started.set()
            await self._run_until(stop)
        finally:
            # tell open sessions first, so their clients fail over now rather than after their step timeout
            self.handler.release("the server is leaving the swarm")
            self.state = ServerState.OFFLINE
            if self.span_range is not None:
                await self._announce_offline()
            await self.handler.sessions_told(timeout=1.0)
            if p2p is not None:  # our line to the DHT process's p2pd: closed here, its socket file is removed
                try:
                    await p2p.shutdown()
                except Exception as e:  # whatever went wrong there, the DHT process must still be shut down below
                    logger.debug(f"could not close our p2p connection: {e!r}")
            shut_down_dht(self.dht)
            if self.handler.points is not None:
                self.handler.points.ledger.close()
            self.claims.release()
            print("Server stopped", flush=True)

    async def _start_points(self, p2p) -> None:
        """Open our receipt ledger (one per peer id, under MEADOW_HOME), serve rpc_receipt and rpc_ledger, and keep
        everyone's points fresh for priorities."""
        from meadow.points.book import PointsBook
        from meadow.points.ledger import Ledger
        from meadow.points.service import PointsService
        from meadow.points.work import params_per_block

        me, config = self.dht.peer_id.to_base58(), self.config
        ledger = Ledger(meadow_home() / "ledgers" / f"{me}.sqlite", me)
        book = PointsBook(seeds=config.points_seeds, allow=config.points_allow)
        self.handler.points = PointsService(ledger, self.fingerprint, params_per_block(self.model_config), book)
        await self.handler.points.register(p2p, self.dht.allowed)
        asyncio.ensure_future(self._refresh_points(p2p))

    async def _refresh_points(self, p2p) -> None:
        service = self.handler.points
        while True:
            await asyncio.sleep(self.config.points_period)
            try:
                head = await asyncio.get_running_loop().run_in_executor(None, service.ledger.head)
                await call_dht(announce_ledger, self.dht, head, 3 * self.config.update_period)
                before = dict(service.book.points)
                await service.book.refresh(self.dht, p2p, local=service.ledger)
                if service.book.points != before:  # a line when something changed, for operators and tests
                    logger.info(f"points: {points_summary(service.book.points, self.dht.peer_id.to_base58())}")
            except Exception as e:  # a DHT or peer hiccup: priorities stay as they were until the next refresh
                logger.warning(f"could not refresh points: {e!r}")

    @property
    def throughput(self) -> float:
        """Tokens/s through the whole span when batching, as announced."""
        if self.speed is None:
            return float(self.config.throughput)
        return self.speed.span_throughput(len(self.span_range)) if self.span_range is not None else 0.0

    @property
    def inference_rps(self) -> float:
        if self.speed is None:  # --throughput N: routing takes a decoding step through the span to last 1 / N s
            return float(self.config.throughput) * len(self.span_range) if self.span_range is not None else 0.0
        return self.speed.inference_rps

    def _measure(self) -> str:
        """Set self.speed per --throughput; return where the numbers came from."""
        option = self.config.throughput
        if option not in ("auto", "eval"):
            if float(option) <= 0:
                raise BadServerConfig(f"--throughput must be auto, eval or a positive number, got {option}")
            return "given"
        self.speed, cached = block_speed(
            self.model_config, self.dtype, self.device, self.config.quant, remeasure=option == "eval"
        )
        return "cached" if cached else "measured"

    def _pick_span(self) -> BlockRange:
        total = self.model_config.num_hidden_layers
        if self.config.blocks is not None:
            if self.config.blocks.end > total:
                raise BadServerConfig(f"--blocks {self.config.blocks} is out of range: the model has {total} blocks")
            return self.config.blocks
        num_blocks = min(self.num_blocks, total)
        swarm = placements(fetch_servers(self.dht, self.dht_prefix, total), total)
        start = choose_span(block_throughputs(swarm.values(), total), num_blocks)
        return BlockRange(start=start, end=start + num_blocks)

    def _blocks_that_fit(self, asked: int | None) -> int | None:
        """As many blocks as fit in memory, if none were `asked` for (NotEnoughMemory if not one does); else `asked`,
        with a warning if they may not fit (the estimate counts every KV-cache slot in use, which may never happen).
        The free memory counted is less what other servers on this machine claim; the blocks' memory is then ours."""
        total, config = self.model_config.num_hidden_layers, self.config
        per_block = self._block_bytes(config.cache_tokens)
        each = f"{per_block / 2**20:.0f} MiB a block, with {config.cache_tokens} tokens of KV cache"
        with self.claims.locked():
            claimed = self.claims.others()
            free = max(0, free_memory(self.device) - claimed)
            where = f"{free / 2**30:.1f} GiB free on {self.device}" + (
                f" (less {claimed / 2**20:.0f} MiB other servers here have claimed)" if claimed else "")  # fmt: skip
            try:
                fit = blocks_that_fit(free, per_block, asked or total, self.device)
            except NotEnoughMemory as e:
                if asked is None:
                    others = f"; other servers here have claimed {claimed / 2**20:.0f} MiB of it" if claimed else ""
                    raise NotEnoughMemory(f"{e}{others}") from None
                fit = 0
            self.claimable = free  # a claim never counts more than there was (blocks asked for may not fit)
            self.claims.set(min((asked or fit) * per_block, free))
        if asked is None:
            logger.info(f"{fit} of {total} blocks fit in the {where} ({each})")
            return fit
        if fit < asked:
            logger.warning(f"{asked} blocks may not fit in the {where}: {fit} do ({each}); fewer blocks, a --quant or "
                           "fewer --cache-tokens would")  # fmt: skip
        return asked

    def _load_span(self, blocks: BlockRange) -> Span:
        return Span(self._load_blocks(blocks), blocks.start, self.model_config, self.dtype, self.device,
                    self._load_adapters(blocks))  # fmt: skip

    def _load_adapters(self, blocks: BlockRange) -> dict[str, list[BlockLora]]:
        """The LoRA updates of every --adapters folder for `blocks` (AdapterError if one does not fit)."""
        start, end = blocks.start, blocks.end
        return {
            Path(path).name: load_peft_adapter(path, self.model_config, start, end, self.dtype, self.device)
            for path in self.config.adapters
        }

    def _load_blocks(self, blocks: BlockRange) -> list:
        return serving_blocks(self.model_path, self.model_config, blocks, self.dtype, self.device, self.config.quant)

    async def _take(self, blocks: BlockRange, loaded: Span | None = None) -> None:
        """Announce `blocks` as joining, load them, serve them, announce them online (at once if already `loaded`)."""
        self.span_range, self.state = blocks, ServerState.JOINING
        if loaded is None:
            await self._announce()  # clients see who is coming but do not route through us yet
            loaded = await asyncio.get_running_loop().run_in_executor(None, self._load_span, blocks)
        self.handler.serve(loaded)
        self.state = ServerState.ONLINE
        await self._announce()

    def _block_bytes(self, cache_tokens: int) -> int:
        """What one of our blocks takes, with `cache_tokens` of KV cache."""
        return block_bytes(self.model_config, self.dtype, self.config.quant, cache_tokens)

    def _claim_untaken_cache(self) -> None:
        """Claim the KV cache our sessions have not taken yet: the weights are taken, and so is the cache of open
        sessions (allocated as each opens), which other servers count as used memory already."""
        cache = self._block_bytes(self.config.cache_tokens) - self._block_bytes(0)
        untaken = len(self.span_range) * cache * self.budget.left // max(1, self.budget.total)
        self.claims.set(min(untaken, self.claimable))

    async def _run_until(self, stop: asyncio.Event) -> None:
        """Announce every update period; with --num-blocks, also check the balance every (jittered) balance period."""
        loop, config = asyncio.get_running_loop(), self.config
        next_announce = loop.time() + config.update_period
        next_check = loop.time() + self._balance_wait() if config.blocks is None else float("inf")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, min(next_announce, next_check) - loop.time()))
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                break
            check_dht_alive(self.dht)
            if loop.time() >= next_check:
                balancing = asyncio.ensure_future(self._balance())
                if not await unless_stopped(balancing, stop):
                    break
                moved = balancing.result()
                # a server that just moved sits out one more period: the swarm's view of it needs time to settle
                next_check = loop.time() + self._balance_wait() + (config.balance_period if moved else 0.0)
                if moved:
                    next_announce = loop.time() + config.update_period
            if loop.time() >= next_announce:
                announcing = asyncio.ensure_future(self._announce())
                if not await unless_stopped(announcing, stop):
                    break
                if announcing.exception() is not None:  # the record lives 3 periods: the next one may still make it
                    logger.warning(f"could not announce: {announcing.exception()!r}")
                next_announce = loop.time() + config.update_period

    def _balance_wait(self) -> float:
        # random, so that servers which see the same swarm do not all decide (and move) at the same moment
        return self.config.balance_period * random.uniform(0.5, 1.5)

    async def _balance(self) -> bool:
        """One balance check: move if the swarm needs this server elsewhere. True if it moved."""
        total = self.model_config.num_hidden_layers
        try:
            per_block = await call_dht(fetch_servers, self.dht, self.dht_prefix, total)
        except Exception as e:  # a DHT hiccup: keep serving where we are, look again next time
            logger.warning(f"balance check skipped: could not read the swarm ({e!r})")
            return False
        others = placements(per_block, total)
        others.pop(self.dht.peer_id, None)  # our own record may lag; our contribution is known exactly
        mine = Placement(self.span_range.start, self.span_range.end, self.throughput)
        start = choose_move(mine, others.values(), total, self.config.balance_quality)
        weakest = min(block_throughputs([*others.values(), mine], total))
        if start is None:
            logger.info(f"balance check: staying at blocks {self.span_range} (weakest block {weakest:.0f} tokens/s)")
            return False
        await self._move(BlockRange(start=start, end=start + len(mine)), weakest)
        return True

    async def _move(self, new: BlockRange, weakest: float) -> None:
        old = self.span_range
        print(f"Moving from blocks {old} to {new} (weakest block {weakest:.0f} tokens/s)", flush=True)
        self.state = ServerState.OFFLINE
        await self._announce()  # the old span, at once: clients and other servers stop counting on us there
        self.handler.release(f"the server is moving from blocks {old} to {new}")
        await self.handler.sessions_told(timeout=1.0)
        gc.collect()  # free the old blocks before loading the new ones: memory stays one span's worth
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        # what the old span freed is the new one's: claimed
        self.claims.set(min(len(new) * self._block_bytes(self.config.cache_tokens), self.claimable))
        await self._take(new)
        print(f"Server moved: blocks {new} online", flush=True)

    def info(self) -> ServerInfo:
        return ServerInfo(
            state=self.state,
            start=self.span_range.start,
            end=self.span_range.end,
            throughput=min(self.throughput, MAX_SPEED),  # beyond it, a record is refused as absurd
            inference_rps=min(self.inference_rps, MAX_SPEED),
            cache_tokens_left=self.budget.room,  # less what sessions waiting for room need: they come first
            open_sessions=len(self.handler.sessions),
            dtype=self.config.dtype,
            quant=self.config.quant,
            public_name=self.config.public_name,
            adapters=tuple(Path(path).name for path in self.config.adapters),
            fingerprint=self.fingerprint,
        )

    def info_dict(self) -> dict:
        return {**self.info().to_wire(), "dht_prefix": self.dht_prefix, "max_length": self.config.limits.max_length}

    async def _announce_offline(self, timeout: float = 5.0) -> None:
        """Announce at once that we are leaving, so clients reroute before our record would expire. In a daemon
        thread, waited for while the DHT process lives (`timeout` at most): a call into a DHT process that died
        (a SIGTERM to our whole process group reaches it too) never returns, and would keep us from exiting."""
        info, expiration = self.info(), 3 * self.config.update_period

        def attempt() -> None:
            try:
                announce(self.dht, self.dht_prefix, info, expiration)
            except Exception as e:
                logger.warning(f"could not announce going offline: {e!r}")

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        deadline = asyncio.get_running_loop().time() + timeout
        while thread.is_alive() and self.dht.is_alive() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)

    async def _announce(self) -> None:
        if self.state == ServerState.ONLINE:  # (while it loads, its claim is the whole span's)
            self._claim_untaken_cache()
        info, expiration = self.info(), 3 * self.config.update_period
        model = ModelInfo(  # for monitors
            dht_prefix=self.dht_prefix, num_blocks=self.model_config.num_hidden_layers, name=model_name(self.model_path)
        )
        await call_dht(announce, self.dht, self.dht_prefix, info, expiration, model)
        if self.handler.points is not None:
            head = await asyncio.get_running_loop().run_in_executor(None, self.handler.points.ledger.head)
            await call_dht(announce_ledger, self.dht, head, expiration)
