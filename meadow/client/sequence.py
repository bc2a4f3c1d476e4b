"""The chain of remote servers that together run every block of the model, seen as one module."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Sequence

import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from meadow.client import transport
from meadow.client.config import ClientConfig
from meadow.client.routing import Hop, choose_chain, servers_by_peer
from meadow.swarm import ServerInfo, dht_prefix_for, fetch_servers, start_dht
from meadow.wire import RPC_INFO, BlockRange, ForwardRequest, OpenSession


def run(coroutine):
    """Run a coroutine on the client's background event loop (hivemind's) and wait for it."""
    return RemoteExpertWorker.run_coroutine(coroutine)


class RemoteSequence:
    """All blocks of one model, served by the swarm. `forward` runs a full pass; `inference_session` keeps KV caches."""

    def __init__(self, dht, dht_prefix: str, num_blocks: int, config: ClientConfig):
        self.dht, self.dht_prefix, self.num_blocks, self.config = dht, dht_prefix, num_blocks, config
        self.p2p = run(dht.replicate_p2p())
        self.servers: dict[PeerID, ServerInfo] = {}
        self.rtt: dict[PeerID, float] = {}
        self.routes_updated = 0.0

    def update_routes(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.routes_updated < self.config.routes_max_age:
            return
        self.servers = servers_by_peer(fetch_servers(self.dht, self.dht_prefix, self.num_blocks))
        unpinged = [peer for peer in self.servers if peer not in self.rtt]
        if unpinged:
            self.rtt.update(run(self._ping_all(unpinged)))
        self.routes_updated = time.monotonic()

    def make_chain(self, blocks: BlockRange | None = None) -> list[Hop]:
        self.update_routes()
        blocks = blocks or BlockRange(start=0, end=self.num_blocks)
        return choose_chain(self.servers, self.rtt, blocks, default_rtt=self.config.default_rtt)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return run(self._forward(self.make_chain(), hidden, position_ids, _full_mask(hidden, key_mask)))

    async def _forward(self, chain: list[Hop], hidden, position_ids, key_mask) -> torch.Tensor:
        for hop in chain:
            request = ForwardRequest(blocks=hop.blocks)
            tensors = [hidden, position_ids, key_mask]
            hidden = await transport.forward(self.p2p, hop.peer, request, tensors, self.config.request_timeout)
        return hidden

    def inference_session(self, max_length: int, batch_size: int) -> "InferenceSession":
        return InferenceSession(self, max_length, batch_size)

    def close(self) -> None:
        """Leave the swarm: close our P2P connection on its own event loop, then stop the DHT process."""
        if self.p2p is not None:
            run(self.p2p.shutdown())
            self.p2p = None
            self.dht.shutdown()

    async def _ping_all(self, peers: list[PeerID]) -> dict[PeerID, float]:
        async def ping(peer: PeerID) -> tuple[PeerID, float]:
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


class InferenceSession:
    """A server-side KV cache along the chain. `step` sends new tokens' hidden states through every hop."""

    def __init__(self, sequence: RemoteSequence, max_length: int, batch_size: int):
        self.sequence, self.max_length, self.batch_size = sequence, max_length, batch_size
        self.position = 0
        self.streams: list[tuple[Hop, transport.InferenceStream]] | None = None

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        length = hidden.shape[1]
        if self.position + length > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded: {self.position} + {length} tokens")
        if self.streams is None:
            self.streams = run(self._open(self.sequence.make_chain()))  # route here: make_chain blocks on the loop
        hidden = run(self._step(hidden, position_ids, _full_mask(hidden, key_mask)))
        self.position += length
        return hidden

    async def _step(self, hidden: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for _, stream in self.streams:
            hidden = await stream.step([hidden, position_ids, key_mask], self.sequence.config.request_timeout)
        return hidden

    def close(self) -> None:
        if self.streams is not None:
            run(self._close())
            self.streams = None

    async def _open(self, chain: list[Hop]) -> list[tuple[Hop, transport.InferenceStream]]:
        opened = []
        try:
            for hop in chain:
                stream = transport.InferenceStream(self.sequence.p2p, hop.peer)
                opened.append((hop, stream))
                request = OpenSession(blocks=hop.blocks, max_length=self.max_length, batch_size=self.batch_size)
                await stream.open(request, self.sequence.config.connect_timeout)
        except BaseException:
            for _, stream in opened:
                await stream.close()
            raise
        return opened

    async def _close(self) -> None:
        for _, stream in self.streams:
            await stream.close()

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _full_mask(hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    if key_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.bool)
    return key_mask.bool()


def connect_sequence(
    model: str | Path,
    config,
    initial_peers: Sequence[str] = (),
    *,
    client_config: ClientConfig | None = None,
    dht_prefix: str | None = None,
    host: str = "127.0.0.1",
    **unused,
) -> RemoteSequence:
    """Join the swarm as a client (no listening for strangers, no UPnP) and return the model's remote blocks."""
    client_config = client_config or ClientConfig()
    if not initial_peers:
        raise ValueError("initial_peers is empty: pass the multiaddr printed by `meadow dht` (or a server's)")
    dht = start_dht(initial_peers, host=host, client_mode=True)
    prefix = dht_prefix or client_config.dht_prefix or dht_prefix_for(model)
    return RemoteSequence(dht, prefix, config.num_hidden_layers, client_config)
