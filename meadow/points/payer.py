"""A client's side of points: it signs a receipt with its owner's identity for the work each server did for it
(every `every_tokens` tokens of a server's blocks, and at a session's end), and introduces itself to each server
with its owner's membership statement before its first request there, so busy servers serve it with its owner's
priority. Receipts go out in the background: generation never waits for them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import defaultdict

from hivemind.p2p import P2P, PeerID

from meadow.client.event_loop import client_loop
from meadow.points.receipts import Receipt, membership_for
from meadow.points.rpc import MAX_RECEIPTS, send_receipts
from meadow.swarm.identity import Identity
from meadow.wire import BlockRange

logger = logging.getLogger(__name__)


class Payer:
    """Signs and sends the receipts of one client (peer id `client`) on behalf of `owner`."""

    def __init__(self, owner: Identity, p2p: P2P, fingerprint: str, params: int, every_tokens: int = 64):
        self.owner, self.p2p, self.fingerprint, self.params, self.every_tokens = owner, p2p, fingerprint, params, every_tokens
        self.client = p2p.peer_id.to_base58()
        self.membership = membership_for(owner, self.client)
        self.introduced: dict[PeerID, asyncio.Future] = {}
        self.pending: dict[tuple[PeerID, int, int, str], int] = defaultdict(int)  # tokens not yet receipted
        self.seq = self.first_seq = time.time_ns() // 1000  # microseconds: a restarted client never reuses a number
        self.lock = threading.Lock()
        self.sending: set[concurrent.futures.Future] = set()
        self.refused: list[str] = []  # the servers' reasons for refusing receipts (none, for an honest client)

    def reconnect(self, p2p: P2P) -> None:
        """Our connection was replaced (its p2p daemon died): receipts and the membership name the new one, and each
        server gets the membership again."""
        with self.lock:
            self.p2p, self.client = p2p, p2p.peer_id.to_base58()
            self.membership = membership_for(self.owner, self.client)
            self.introduced = {}

    async def introduce(self, peer: PeerID) -> None:
        """Before our first request to `peer`: hand it our membership, once (a failure is logged, not raised: the
        server then serves us as anyone)."""
        if peer not in self.introduced:
            self.introduced[peer] = asyncio.ensure_future(send_receipts(self.p2p, peer, [], self.membership))
        try:
            await asyncio.shield(self.introduced[peer])
        except Exception as e:
            logger.debug(f"could not introduce ourselves to {peer}: {e!r}")

    def served(self, peer: PeerID, blocks: BlockRange, tokens: int, kind: str) -> None:
        """`peer` ran `blocks` over `tokens` tokens for us: receipt them once every_tokens have added up."""
        key = (peer, blocks.start, blocks.end, kind)
        with self.lock:
            self.pending[key] += tokens
            due = self.pending[key] >= self.every_tokens
        if due:
            self.flush(peer)

    def flush(self, peer: PeerID | None = None) -> None:
        """Receipt now everything `peer` (None: every server) did for us that is not receipted yet."""
        with self.lock:
            keys = [key for key in self.pending if peer is None or key[0] == peer]
            work = [(key, self.pending.pop(key)) for key in keys]
        by_peer: dict[PeerID, list[Receipt]] = defaultdict(list)
        for (server, start, end, kind), tokens in work:
            by_peer[server].append(self._receipt(server, start, end, kind, tokens))
        for server, receipts in by_peer.items():
            for i in range(0, len(receipts), MAX_RECEIPTS):
                future = asyncio.run_coroutine_threadsafe(self._send(server, receipts[i : i + MAX_RECEIPTS]), client_loop())
                with self.lock:
                    self.sending.add(future)
                future.add_done_callback(self._sent)

    def wait(self, timeout: float = 30.0) -> None:
        """Flush, and wait until every receipt so far has been answered (for tests, benchmarks and a clean exit)."""
        self.flush()
        with self.lock:
            sending = list(self.sending)
        concurrent.futures.wait(sending, timeout)

    def _receipt(self, server: PeerID, start: int, end: int, kind: str, tokens: int) -> Receipt:
        with self.lock:
            self.seq += 1
            seq = self.seq
        receipt = Receipt(
            signer="", server=server.to_base58(), client=self.client, fingerprint=self.fingerprint, start=start,
            end=end, tokens=tokens, params_per_block=self.params, kind=kind, timestamp=time.time(), seq=seq,
        )  # fmt: skip
        return receipt.signed_by(self.owner)

    async def _send(self, server: PeerID, receipts: list[Receipt]) -> None:
        try:
            refused = [reason for reason in await send_receipts(self.p2p, server, receipts) if reason is not None]
        except Exception as e:
            refused = [f"could not send receipts: {e!r}"]
        if refused:
            logger.warning(f"{server} refused {len(refused)} of our receipts: {refused[0]}")
            self.refused.extend(refused)

    def _sent(self, future: concurrent.futures.Future) -> None:
        with self.lock:
            self.sending.discard(future)
