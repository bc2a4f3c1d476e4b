"""Private swarms: an allow-list of peer ids (`--allow-peers FILE`). libp2p authenticates every connection's peer id,
so a node that knows who is calling refuses anyone off the list: our RPCs check P2PContext.remote_id (guard), DHT
nodes answer no ping, store or find of theirs (AllowListDHT), and the record validator (validation.py) keeps no record
an outsider signed, nor returns one a stranger's node sends."""

from __future__ import annotations

import asyncio
import functools
import inspect
from contextlib import aclosing
from pathlib import Path
from typing import Callable, Collection

import hivemind
import hivemind.dht.node
from hivemind.dht.protocol import DHTProtocol
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import dht_pb2

from meadow.wire import MeadowError, drain_requests

NOT_ALLOWED = "not allowed in this swarm"


class NotAllowed(MeadowError):
    """A peer is not on a node's allow-list: the node refuses it."""

    @classmethod
    def peer(cls, peer: PeerID | str) -> "NotAllowed":
        return cls(f"peer {peer} is {NOT_ALLOWED} (it is not on this node's --allow-peers list)")


def load_allow_list(path: str | Path) -> frozenset[PeerID]:
    """The peer ids in `path`: one a line (as `meadow keygen` prints them), `#` starts a comment."""
    path = Path(path).expanduser()
    peers = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            peers.add(PeerID.from_base58(text))
        except Exception:
            raise ValueError(f"{path}:{number}: {text!r} is not a peer id (as `meadow keygen` prints them)") from None
    if not peers:
        raise ValueError(f"{path} lists no peer id: an empty allow-list would refuse everyone")
    return frozenset(peers)


def guard(handler: Callable, allowed: Collection[PeerID] | None, refusal: Callable[[NotAllowed], object]) -> Callable:
    """`handler` (an RPC: request, context -> reply or stream of replies) that answers callers off `allowed` with
    refusal(NotAllowed) instead of running; `handler` itself if allowed is None (an open swarm)."""
    if allowed is None:
        return handler
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def guarded_stream(requests, context: P2PContext):
            if context.remote_id not in allowed:
                yield refusal(NotAllowed.peer(context.remote_id))
                await drain_requests(requests)  # closing before the caller does may lose the refusal (see there)
                return
            async with aclosing(handler(requests, context)) as replies:  # its own clean-up runs now, not at GC
                async for reply in replies:
                    yield reply

        return guarded_stream

    @functools.wraps(handler)
    async def guarded(request, context: P2PContext):
        if context.remote_id not in allowed:
            return refusal(NotAllowed.peer(context.remote_id))
        return await handler(request, context)

    return guarded


class _AllowListProtocol(DHTProtocol):
    """hivemind's DHT protocol that raises NotAllowed to callers off `allowed`: hivemind sends them the message."""

    allowed: frozenset[PeerID] = frozenset()

    @classmethod
    def _get_handle_name(cls, namespace, method_name):
        return DHTProtocol._get_handle_name(namespace, method_name)  # the same protocol names as every other node

    def _check(self, context: P2PContext) -> None:
        if context.remote_id not in self.allowed:
            raise NotAllowed.peer(context.remote_id)

    async def rpc_ping(self, request: dht_pb2.PingRequest, context: P2PContext) -> dht_pb2.PingResponse:
        self._check(context)
        return await super().rpc_ping(request, context)

    async def rpc_store(self, request: dht_pb2.StoreRequest, context: P2PContext) -> dht_pb2.StoreResponse:
        self._check(context)
        return await super().rpc_store(request, context)

    async def rpc_find(self, request: dht_pb2.FindRequest, context: P2PContext) -> dht_pb2.FindResponse:
        self._check(context)
        return await super().rpc_find(request, context)


class AllowListDHT(hivemind.DHT):
    """A hivemind DHT whose node answers only peers in `allowed`. hivemind builds its DHTProtocol inside the DHT's
    own (forked) process and offers no hook for the caller's peer id, so that process swaps in our subclass before it
    builds the node; the parent process is untouched."""

    def __init__(self, *args, allowed: frozenset[PeerID], **kwargs):
        self.allowed = allowed
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        hivemind.dht.node.DHTProtocol = type("DHTProtocol", (_AllowListProtocol,), {"allowed": self.allowed})
        super().run()


def refused_reason(initial_peers: list[str], identity_path: str | Path) -> str | None:
    """Why the DHT nodes at `initial_peers` did not answer us: their refusal if one is not allowing us in, else None.
    Asked with a direct ping, for hivemind's bootstrap swallows the reason."""

    async def ask() -> str | None:
        from hivemind.p2p import P2P
        from hivemind.utils.multiaddr import Multiaddr

        # (the identity is ours, and its DHT failed to start: no need to ask the swarm whether it is in use)
        p2p = await P2P.create(initial_peers=initial_peers, identity_path=str(identity_path),
                               host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False,
                               check_if_identity_free=False)  # fmt: skip
        try:
            for maddr in initial_peers:
                peer = PeerID.from_base58(Multiaddr(maddr)["p2p"])
                try:
                    await asyncio.wait_for(p2p.call_protobuf_handler(
                        peer, DHTProtocol._get_handle_name(None, "rpc_ping"), dht_pb2.PingRequest(), dht_pb2.PingResponse
                    ), 5.0)  # fmt: skip
                except Exception as e:
                    if NOT_ALLOWED in str(e):
                        return (f"DHT node {peer} refused us (peer {p2p.peer_id}): {NOT_ALLOWED}; its operators must add "
                                f"our peer id to their --allow-peers file")
            return None
        finally:
            await p2p.shutdown()

    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:  # its own event loop, whether or not the caller runs one
            return pool.submit(asyncio.run, ask()).result()
    except Exception:
        return None
