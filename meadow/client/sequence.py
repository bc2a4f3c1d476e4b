"""The chain of remote servers that together run every block of the model, seen as one module:
routing over the DHT's announcements, bans of failed servers, and a forward pass that survives failures."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import hivemind
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from meadow.client import transport
from meadow.client.config import ClientConfig
from meadow.client.event_loop import client_loop, on_client_loop, run
from meadow.client.retries import Retries, is_busy
from meadow.client.routing import (
    Hop, MeasuredStep, MissingBlocksError, block_ranges, choose_chain, peers_to_ping, servers_by_peer,
)  # fmt: skip
from meadow.client.verify import SpotChecker, WrongOutputs
from meadow.models import resolve_model_path
from meadow.models.fingerprint import checkpoint_fingerprint
from meadow.swarm import ServerInfo, dht_prefix_for, fetch_announcements, start_dht
from meadow.client.tuning import RemoteTuning
from meadow.models.quant import with_quant_at_least
from meadow.wire import (
    PROTOCOL_VERSION, RPC_BACKWARD, RPC_FORWARD, RPC_INFO, RPC_LEAVE_LINE, BackwardRequest, BlockRange, ForwardRequest,
    RemoteError, default_wire,
)  # fmt: skip

logger = logging.getLogger(__name__)
PING_ROUNDS = 2  # a route refresh pings the best chains' unmeasured servers up to this many times (each round waits
# for its slowest ping); the next refreshes go on where it stopped
# micro-batches of one request sent to a server at once: enough to keep it busy, and well under the requests it lets
# one peer run at once (Limits.max_peer_requests, 16), which a big batch would otherwise exceed on its own
PARTS_IN_FLIGHT = 4
MOVED = ("ServerLeaving", "WrongServer", "ServerBusy")  # healthy servers that left, moved or are full: skipped, not banned


class OtherCheckpointError(MissingBlocksError):
    """Servers hold the missing blocks under this swarm name, but of another checkpoint than the client's."""

    def __init__(self, missing: list[int], others: dict[PeerID, ServerInfo], fingerprint: str, adapter: str | None):
        super().__init__(missing, adapter)
        covered = sorted({i for info in others.values() for i in range(info.start, info.end) if i in missing})
        fingerprints = ", ".join(sorted({info.fingerprint or "none" for info in others.values()}))
        many = len(others) != 1
        self.args = (  # the message: what MissingBlocksError says, and why
            f"{self}; {len(others)} server{'s' * many} announce{'s' * (not many)} blocks {block_ranges(covered)} of this "
            f"swarm but serve{'s' * (not many)} a different checkpoint (fingerprint {fingerprints}, ours "
            f"{fingerprint}): start servers with the same files as the client, or give the other model another "
            "--dht-prefix",
        )


class ClosedError(RuntimeError):
    """The model was closed: it has left the swarm."""


class RemoteSequence:
    """The blocks of one model that the swarm serves for us: all of them, or those after the client's `local_blocks`.
    `forward` runs a full pass; `inference_session` keeps KV caches. Threads may share one: routes and bans are shared
    (a failed server is avoided by all), each session is its own."""

    def __init__(
        self,
        dht,
        dht_prefix: str,
        num_blocks: int,
        config: ClientConfig,
        active_adapter: str | None = None,
        fingerprint: str | None = None,
        first_block: int = 0,
        restart_dht: Callable[[], hivemind.DHT] | None = None,
    ):
        self.dht, self.dht_prefix, self.num_blocks, self.config = dht, dht_prefix, num_blocks, config
        self.restart_dht = restart_dht  # starts a DHT process like `dht`, for when ours dies (None: we cannot)
        self.blocks = BlockRange(start=first_block, end=num_blocks)  # the blocks that run remotely
        self.active_adapter = active_adapter  # a served LoRA adapter: only servers that have it are used
        self.fingerprint = fingerprint  # of our checkpoint: only servers of the same one are used (None: any)
        self.other_checkpoints: dict[PeerID, ServerInfo] = {}  # online servers of this swarm name but not our model
        self.checker = SpotChecker(self)  # spot-checks of the servers' results (ClientConfig.verify)
        self.last_hops: list[Hop] = []  # the chain of the last forward pass (for logs and tests)
        self.p2p = run(dht.replicate_p2p())
        self.salt = self.p2p.peer_id.to_bytes()  # our tie-break among near-equal chains: other clients take others
        self.servers: dict[PeerID, ServerInfo] = {}
        self.rtt: dict[PeerID, float] = {}  # measured round trips (inf: the ping failed)...
        self.rtt_expires: dict[PeerID, float] = {}  # ...until these times, when a server is pinged again if we may use it
        self.steps: dict[PeerID, MeasuredStep] = {}  # a decoding step as our sessions last timed it on each server
        self.routes_updated = 0.0
        self.banned_until: dict[PeerID, float] = {}  # failed servers...
        # ...and when their records expired as they failed: until they announce again (a later expiration), they stay
        # avoided after their ban, for a dead server's record lives on for minutes and dialling it may take seconds
        self.failed_record: dict[PeerID, float] = {}
        self.expirations: dict[PeerID, float] = {}  # of each server's latest record, as last read
        self.skipped_until: dict[PeerID, float] = {}  # ...and healthy ones that left, moved or are full (MOVED)
        self.failures: dict[PeerID, int] = defaultdict(int)
        self.payer = None  # signs receipts for the servers' work, if we have an identity (meadow/points/payer.py)
        # one DHT read (and round of pings) at a time, for all threads that need routes; bans change under a lock
        self._routes_lock, self._bans_lock, self._close_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._network_lock = threading.Lock()

    def update_routes(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.routes_updated < self.config.routes_max_age:
            return
        self.revive_network()  # a dead DHT process would not answer the read below
        per_block, self.expirations = fetch_announcements(self.dht, self.dht_prefix, self.num_blocks)
        with self._bans_lock:  # forget those that announced since they failed (their bans still run out) or are gone
            self.failed_record = {
                peer: seen for peer, seen in self.failed_record.items() if self.expirations.get(peer, math.inf) <= seen
            }  # fmt: skip
        online = servers_by_peer(per_block)
        online = with_quant_at_least(online, self.config.min_quant)
        self.servers = {peer: info for peer, info in online.items() if self.fingerprint in (None, info.fingerprint)}
        self.other_checkpoints = {peer: info for peer, info in online.items() if peer not in self.servers}
        now = time.monotonic()
        self.rtt = {peer: rtt for peer, rtt in self.rtt.items() if self.rtt_expires.get(peer, now) >= now}
        everything = self.blocks
        options = dict(default_rtt=self.config.default_rtt, banned=self.banned(), salt=self.salt)
        for _ in range(PING_ROUNDS):  # ping the servers of the chains we would take; measured, they may change them
            peers = peers_to_ping(self.usable_servers(), self.rtt, everything, **options)
            if not peers:
                break
            for peer, rtt in run(self._ping_all(peers)).items():
                self.rtt[peer] = rtt
                self.rtt_expires[peer] = now + (self.config.rtt_max_age if rtt < float("inf") else self.config.ping_retry)
        self.routes_updated = time.monotonic()

    def ban(self, peer: PeerID, error: BaseException, p2p: P2P | None = None) -> None:
        """Avoid a failed server for a while; each further failure doubles the while. Failures while it is avoided
        (requests of other sessions that were in flight when it went down) change nothing. A healthy server that left
        or moved its blocks is only skipped for moved_seconds, one that is full (ServerBusy) for busy_retry, and our
        routes are read again. A failure that was ours is not held against the server: our p2p daemon or DHT process
        died (new ones are started), or the call went over `p2p`, a connection of ours that has been replaced since."""
        if p2p is not None and p2p is not self.p2p:
            return
        if self.revive_network():
            return
        if isinstance(error, RemoteError) and error.kind in MOVED:
            seconds = self.config.busy_retry if is_busy(error) else self.config.moved_seconds
            with self._bans_lock:
                self.skipped_until[peer] = time.monotonic() + seconds
            self.routes_updated = 0.0
            level = logging.DEBUG if is_busy(error) else logging.INFO  # Retries says it once per request
            logger.log(level, f"server {peer} cannot serve us now ({error.kind}: {error.remote_message}); rerouting")
            return
        if isinstance(error, WrongOutputs):  # not a mishap: it computes wrong results
            with self._bans_lock:
                self.banned_until[peer] = time.monotonic() + self.config.verify_ban_seconds
            logger.warning(f"{error}; avoiding it for {self.config.verify_ban_seconds:.0f} s")
            return
        with self._bans_lock:
            now = time.monotonic()  # failed too while avoided (banned or skipped): in flight meanwhile
            if self.banned_until.get(peer, 0.0) > now or self.skipped_until.get(peer, 0.0) > now:
                logger.debug(f"server {peer} failed again while avoided ({error!r})")
                return
            self.failures[peer] += 1
            seconds = min(self.config.ban_seconds * 2 ** (self.failures[peer] - 1), self.config.max_ban_seconds)
            self.banned_until[peer] = time.monotonic() + seconds
            if peer in self.expirations:
                self.failed_record[peer] = self.expirations[peer]
        logger.warning(f"server {peer} failed ({error!r}); avoiding it for {seconds:.0f} s and until it announces")

    def revive_network(self) -> bool:
        """If our DHT process or its p2p daemon is gone, start new ones (once, whichever thread finds it); True if
        they were down. Not on the client loop (a spot-check's coroutine bans there), which cannot wait for this: the
        next failure on another thread finds it."""
        if on_client_loop():
            return False
        with self._network_lock:
            if self.restart_dht is None or self.p2p is None or self._network_is_up():
                return False
            logger.warning("our DHT process or p2p daemon died; starting new ones")
            old_dht, old_p2p = self.dht, self.p2p
            try:
                run(asyncio.wait_for(old_p2p.shutdown(), 5.0))
            except Exception:
                pass  # its daemon is gone: nothing to close cleanly
            old_dht.shutdown()
            self.dht = self.restart_dht()
            self.p2p = run(self.dht.replicate_p2p())
            if self.payer is not None:
                self.payer.reconnect(self.p2p)
            self.rtt, self.rtt_expires, self.routes_updated = {}, {}, 0.0  # pings through the dead daemon failed
            return True

    def _network_is_up(self) -> bool:
        if not self.dht.is_alive():
            return False
        try:  # a call to our p2p daemon itself, not to any peer
            run(asyncio.wait_for(self.p2p.list_peers(), self.config.connect_timeout))
            return True
        except Exception:
            return False

    def banned(self, skipped: bool = True) -> frozenset[PeerID]:
        """The servers routing avoids now: failed ones (for their ban, and after it until they announce again), and
        (with `skipped`) healthy ones skipped for a moment."""
        now = time.monotonic()
        with self._bans_lock:
            avoided = [self.banned_until, self.skipped_until] if skipped else [self.banned_until]
            banned = {peer for until in avoided for peer, end in until.items() if end > now}
            return frozenset(banned | self.failed_record.keys())  # update_routes keeps only those not announced since

    def skipped_hold(self, blocks: list[int]) -> bool:
        """True if a server we only skip for a moment (it is full, say) holds some of `blocks`: worth waiting for."""
        skipped = self.banned() - self.banned(skipped=False)
        return any(info.start <= i < info.end for peer in skipped if (info := self.servers.get(peer)) for i in blocks)

    def make_chain(self, blocks: BlockRange | None = None, cache_tokens: int = 0) -> list[Hop]:
        """The fastest chain for `blocks` (default: all remote blocks; for a session that needs `cache_tokens` KV-cache
        slots on each server), waiting up to `wait_for_servers` for missing blocks to appear."""
        blocks = blocks or self.blocks
        deadline = time.monotonic() + self.config.wait_for_servers
        force = False
        while True:
            self.check_open()
            with self._routes_lock:
                self.update_routes(force)
                servers, rtt = dict(self.usable_servers()), dict(self.rtt)  # copies: other threads update routes
            try:
                return choose_chain(
                    servers, rtt, blocks, default_rtt=self.config.default_rtt, banned=self.banned(),
                    steps=dict(self.steps), failures=dict(self.failures), cache_tokens=cache_tokens, salt=self.salt,
                )  # fmt: skip
            except MissingBlocksError as e:
                if not force:  # the routes we had may predate the servers that hold these blocks now: read them at once
                    force = True
                    continue
                # missing blocks that a full server holds come back when it is tried again: Retries bound that wait
                if time.monotonic() >= deadline and not self.skipped_hold(e.missing):
                    others = {
                        peer: info for peer, info in self.other_checkpoints.items()
                        if any(info.start <= i < info.end for i in e.missing)
                    }  # fmt: skip
                    if others:
                        raise OtherCheckpointError(e.missing, others, self.fingerprint, self.active_adapter) from None
                    raise MissingBlocksError(e.missing, self.active_adapter, self.adapters_at(e.missing)) from None
                time.sleep(1.0)
                force = True

    def adapters_at(self, blocks: list[int]) -> list[str]:
        """The adapters that servers of our version holding any of `blocks` serve: what a user may have meant."""
        return sorted({
            name for info in self.servers.values() if info.version == PROTOCOL_VERSION
            and any(info.start <= i < info.end for i in blocks) for name in info.adapters
        })  # fmt: skip

    def usable_servers(self) -> dict[PeerID, ServerInfo]:
        """The servers we may route to: those of our protocol version (and with our adapter, if we use one)."""
        return {
            peer: info for peer, info in self.servers.items()
            if info.version == PROTOCOL_VERSION and (self.active_adapter is None or self.active_adapter in info.adapters)
        }  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
        tuning: RemoteTuning | None = None,
    ) -> torch.Tensor:
        """A full pass without cache, differentiable: backward asks the servers for the gradients w.r.t. `hidden`
        and the tuning tensors (deep prompts, LoRA weights)."""
        from meadow.client.autograd import RemoteBlocks

        tuning = tuning or RemoteTuning()
        key_mask = full_mask(hidden, key_mask)
        tensors = (hidden, tuning.prompts, tuning.lora_flat)
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return RemoteBlocks.apply(self, position_ids, key_mask, tuning, training, *tensors)

    def forward_hops(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor,
        tuning: RemoteTuning,
        training: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor, str | None]]]:
        """The output of every block, and each hop (server and blocks) with its input and, when `training`, the name
        under which its server keeps the pass's graph: what backward needs. A failed hop is retried on other
        servers from the failed block on."""
        block, retries, hops = self.blocks.start, Retries(self.config), []
        while block < self.num_blocks:
            for hop in self.make_chain(BlockRange(start=block, end=self.num_blocks)):
                graph_id = uuid.uuid4().hex if training else None
                try:
                    rpc = self._checked_call(RPC_FORWARD, hop, hidden, position_ids, key_mask, tuning, graph_id=graph_id)
                    (output,) = run(rpc)
                except Exception as e:
                    if not retries.allow(e):
                        raise
                    self.ban(hop.peer, e)
                    break  # route again from `block`
                self.failures.pop(hop.peer, None)
                hops.append((hop, hidden, graph_id))
                hidden, block = output, hop.blocks.end
        self.last_hops = [hop for hop, _, _ in hops]
        return hidden, hops

    def backward_hop(
        self,
        hop: Hop,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor,
        tuning: RemoteTuning,
        graph_id: str | None = None,
    ) -> list[torch.Tensor | None]:
        """Gradients w.r.t. the input `hidden` of `hop`'s blocks, their deep prompts and their LoRA weights (None
        for what was not sent). The forward's server goes first, as it may still hold the pass's graph; any server or
        chain of servers holding the blocks can do it too: a replacement chain recomputes its inner activations."""
        retries, chain = Retries(self.config), [hop] if hop.peer not in self.banned() else self.make_chain(hop.blocks)
        while True:
            current = chain[0]
            try:
                # a replacement chain's inner activations come from training forwards: the products that the lost
                # server's forward ran (not inference's, models/packed.py), and graphs kept for the backward
                graphs = [uuid.uuid4().hex for _ in chain[:-1]] + [graph_id if chain == [hop] else None]
                inputs, context = [hidden], (position_ids, key_mask, tuning)
                for current, graph in zip(chain[:-1], graphs):
                    (output,) = run(self._checked_call(RPC_FORWARD, current, inputs[-1], *context, graph_id=graph))
                    inputs.append(output)
                grad, prompt_grads, lora_grads = grad_output, [], []
                for current, x, graph in zip(reversed(chain), reversed(inputs), reversed(graphs)):
                    rpc = self._checked_call(RPC_BACKWARD, current, x, *context, grad, graph_id=graph)
                    grad, *rest = run(rpc)
                    rest = iter(rest)
                    if tuning.prompts is not None:
                        prompt_grads.insert(0, next(rest))
                    lora_grads.insert(0, next(rest, None))
                    self.failures.pop(current.peer, None)
                prompts = torch.cat(prompt_grads) if prompt_grads else None
                lora = [g for g in lora_grads if g is not None]
                return [grad, prompts, torch.cat(lora) if lora else None]
            except Exception as e:
                if not retries.allow(e):
                    raise
                self.ban(current.peer, e)
                chain = self.make_chain(hop.blocks)

    async def _checked_call(self, rpc: str, hop: Hop, *args, graph_id: str | None = None) -> list[torch.Tensor]:
        """_call, and now and then (ClientConfig.verify) the same call on another server holding hop's blocks to check
        the result: WrongOutputs if hop's server is found wrong."""
        result = await self._call(rpc, hop, *args, graph_id=graph_id)
        if self.checker.due():
            await self.checker.check(hop, result, lambda other: self._call(rpc, other, *args))
        return result

    async def _call(
        self,
        rpc: str,
        hop: Hop,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor,
        tuning: RemoteTuning,
        grad_output: torch.Tensor | None = None,
        graph_id: str | None = None,
    ) -> list[torch.Tensor]:
        """rpc_forward or rpc_backward on one server, the batch cut into micro-batches of at most
        `micro_batch_tokens` tokens, PARTS_IN_FLIGHT of them on their way at a time; outputs are joined, gradients of
        shared tensors summed.
        Micro-batch i of a pass named `graph_id` is named f"{graph_id}.{i}", in the forward and its backward alike."""
        fields, extra = tuning.for_hop(hop.blocks)
        request_type = BackwardRequest if grad_output is not None else ForwardRequest
        batch, length = hidden.shape[:2]
        step = max(1, self.config.micro_batch_tokens // max(length, 1))
        batched = [hidden, position_ids.expand(batch, length), key_mask] + ([grad_output] if grad_output is not None else [])
        calls, timeout = [], self.work_timeout(hop.peer, hop.blocks, hidden)  # the parts queue on one server
        in_flight = asyncio.Semaphore(PARTS_IN_FLIGHT)

        async def send(*args) -> list[torch.Tensor]:
            async with in_flight:
                return await transport.call(*args)

        for i, start in enumerate(range(0, batch, step)):
            part = [tensor[start : start + step] for tensor in batched]
            tensors = part[:3] + extra + part[3:]
            name = None if graph_id is None else f"{graph_id}.{i}"
            request = request_type(
                blocks=hop.blocks, adapter=self.active_adapter, graph_id=name, wire=self.wire_for(hop.peer), **fields
            )
            expected = part[:1] + (extra if grad_output is not None else [])  # outputs, or gradients of what was sent
            calls.append(send(self.p2p, hop.peer, rpc, request, tensors, timeout, expected))
        if self.payer is not None:
            await self.payer.introduce(hop.peer)
        replies = await asyncio.gather(*calls)
        if self.payer is not None:
            self.payer.served(hop.peer, hop.blocks, batch * length, "forward" if grad_output is None else "backward")
        joined = [torch.cat([reply[0] for reply in replies])]
        return joined + [sum(reply[i] for reply in replies) for i in range(1, len(replies[0]))]

    def work_timeout(self, peer: PeerID, blocks: BlockRange, hidden: torch.Tensor) -> float:
        """How long to wait for `hidden`'s tokens (B, T, H) to go through `blocks` on `peer`: request_timeout, plus
        step_slowdown times what the server's announced speed says the work takes. A long prompt on a slow server, or
        one busy with other clients' prompts, is not a dead server."""
        info, config, tokens = self.servers.get(peer), self.config, hidden.shape[0] * hidden.shape[1]
        if info is None or info.throughput <= 0:
            return config.request_timeout
        speed = info.throughput * (info.end - info.start) / len(blocks)  # tokens/s through `blocks` alone
        return min(config.max_request_timeout, config.request_timeout + config.step_slowdown * tokens / speed)

    def wire_for(self, peer: PeerID) -> str:
        """The wire format of our requests to `peer`: ClientConfig.wire, or else the one its announced dtype implies."""
        info = self.servers.get(peer)
        return self.config.wire or default_wire(info.dtype if info is not None else "float32")

    def inference_session(
        self,
        max_length: int,
        batch_size: int,
        tuning: RemoteTuning | None = None,
        give_up: threading.Event | None = None,
    ):
        from meadow.client.session import InferenceSession

        self.check_open()
        return InferenceSession(self, max_length, batch_size, tuning, give_up)

    def check_open(self) -> None:
        if self.p2p is None:
            raise ClosedError("this model is closed (it has left the swarm): load it again with from_pretrained")

    def close(self) -> None:
        """Leave the swarm: close our P2P connection, then stop the DHT process (and with it the p2p daemon).
        Closing again does nothing."""
        with self._close_lock, self._network_lock:  # not while a new DHT process starts: it would be left running
            if self.p2p is not None:
                if self.payer is not None:
                    self.payer.wait(timeout=5.0)  # the last receipts, before the connection goes
                p2p, self.p2p = self.p2p, None
                try:
                    run(p2p.shutdown())
                finally:
                    self.dht.shutdown()

    def leave_lines(self, peers: set[PeerID], ticket: str) -> None:
        """Tell the full servers `peers`, where a session of ours waited for room with `ticket`, that it waits no more
        (served elsewhere, or given up): its place stops claiming room at once, not when it lapses. Not waited for: a
        dead server cannot hold us up, and an older one (without the handler) keeps the place until it lapses."""

        async def leave(peer: PeerID) -> None:
            request = runtime_pb2.ExpertUID(uid=ticket)
            try:
                call = self.p2p.call_protobuf_handler(peer, RPC_LEAVE_LINE, request, runtime_pb2.ExpertInfo)
                await asyncio.wait_for(call, self.config.connect_timeout)
            except Exception as e:
                logger.debug(f"could not leave the line at {peer}: {e!r}")

        for peer in peers:
            asyncio.run_coroutine_threadsafe(leave(peer), client_loop())

    async def _ping_all(self, peers: list[PeerID]) -> dict[PeerID, float]:
        """Round trips to `peers`, at most `max_concurrent_pings` at a time; inf for a server that did not answer."""
        slots = asyncio.Semaphore(self.config.max_concurrent_pings)

        async def ping(peer: PeerID) -> tuple[PeerID, float]:
            async with slots:
                began = time.perf_counter()
                try:
                    await asyncio.wait_for(
                        self.p2p.call_protobuf_handler(peer, RPC_INFO, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo),
                        self.config.connect_timeout,
                    )
                    return peer, time.perf_counter() - began
                except Exception:
                    return peer, float("inf")

        return dict(await asyncio.gather(*(ping(peer) for peer in peers)))


def full_mask(hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    if key_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool)
    return key_mask if key_mask.dtype == torch.bool else key_mask.bool()  # no op per decoding step


def connect_sequence(
    model: str | Path,
    config,
    initial_peers: Sequence[str] = (),
    *,
    client_config: ClientConfig | None = None,
    dht_prefix: str | None = None,
    host: str = "127.0.0.1",
    active_adapter: str | None = None,
    first_block: int = 0,
) -> RemoteSequence:
    """Join the swarm as a client (no listening for strangers, no UPnP) and return the model's remote blocks: those
    from `first_block` on (the client runs the ones before)."""
    client_config = client_config or ClientConfig()
    if not initial_peers:
        raise ValueError("initial_peers is empty: pass the multiaddr printed by `meadow dht` (or a server's)")
    prefix = dht_prefix or client_config.dht_prefix or dht_prefix_for(model)
    fingerprint = checkpoint_fingerprint(resolve_model_path(model))
    swarms = {prefix: config.num_hidden_layers}  # the DHT node checks these records in full (swarm/validation.py)
    restart_dht = partial(
        start_dht, initial_peers, host=host, client_mode=True, identity=client_config.identity, swarms=swarms,
        allow_peers=client_config.allow_peers,
    )  # fmt: skip
    sequence = RemoteSequence(
        restart_dht(), prefix, config.num_hidden_layers, client_config, active_adapter, fingerprint, first_block, restart_dht
    )  # fmt: skip
    owner = client_config.points_identity or client_config.identity
    if owner is not None:
        from meadow.points.payer import Payer
        from meadow.points.work import params_per_block
        from meadow.swarm import load_identity

        params, every = params_per_block(config), client_config.receipt_every_tokens
        sequence.payer = Payer(load_identity(owner), sequence.p2p, fingerprint, params, every)
    return sequence
