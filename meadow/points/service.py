"""A server's side of points: rpc_receipt (check and keep clients' receipts, learn whose client a connection is),
rpc_ledger (serve the ledger), and the priority each requester's owner's points buy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Hashable

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from meadow.points.book import PointsBook
from meadow.points.ledger import Ledger
from meadow.points.priority import priority_of
from meadow.points.receipts import InvalidReceipt, Membership, Receipt, check_membership, check_receipt
from meadow.points.rpc import LEDGER_PAGE, MAX_RECEIPTS, RPC_LEDGER, RPC_RECEIPT, decode, encode

logger = logging.getLogger(__name__)
MAX_MEMBERS = 10_000  # connections whose owner we remember; beyond it, the longest unseen are forgotten
MAX_CLOCK_SKEW = 3600.0  # seconds a receipt's timestamp may lie ahead of our clock


class PointsService:
    """Keeps this server's ledger and serves it; maps connections to their owners' points for the compute queue."""

    def __init__(self, ledger: Ledger, fingerprint: str, params_per_block: int, book: PointsBook | None = None):
        self.ledger, self.fingerprint, self.params_per_block = ledger, fingerprint, params_per_block
        self.book = book or PointsBook()
        self.owners: OrderedDict[str, tuple[str, float]] = OrderedDict()  # connection peer id -> (owner, expires)

    async def register(self, p2p: P2P, allowed: frozenset | None = None) -> None:
        """Serve rpc_receipt and rpc_ledger; in a private swarm, only to the `allowed` peers (swarm/allow_list.py)."""
        from meadow.swarm.allow_list import guard

        def refuse(error: Exception):
            raise error  # hivemind sends the caller the message

        await p2p.add_protobuf_handler(RPC_RECEIPT, guard(self.rpc_receipt, allowed, refuse), runtime_pb2.ExpertInfo)
        await p2p.add_protobuf_handler(RPC_LEDGER, guard(self.rpc_ledger, allowed, refuse), runtime_pb2.ExpertInfo)

    def owner_of(self, peer: Hashable) -> str:
        """Whose points a connection spends: the owner that vouched for it, else its own."""
        connection = str(peer)
        owner, expires = self.owners.get(connection, (connection, float("inf")))
        return owner if expires > time.time() else connection

    def priority(self, peer: Hashable) -> int:
        return priority_of(self.book.points.get(self.owner_of(peer), 0.0))

    async def rpc_receipt(self, request: runtime_pb2.ExpertInfo, context: P2PContext) -> runtime_pb2.ExpertInfo:
        connection = context.remote_id.to_base58()
        try:
            message = decode(request)
            if not isinstance(message, dict) or not isinstance(message.get("receipts", []), list):
                raise InvalidReceipt("expected {membership, receipts}")
            if len(message.get("receipts", [])) > MAX_RECEIPTS:
                raise InvalidReceipt(f"at most {MAX_RECEIPTS} receipts per call")
            if message.get("membership") is not None:
                membership = Membership.from_wire(message["membership"])
                owner = check_membership(membership, connection)
                self.owners[connection] = (owner, membership.expires)
                self.owners.move_to_end(connection)
                while len(self.owners) > MAX_MEMBERS:
                    self.owners.popitem(last=False)
        except Exception as e:  # malformed or refused: one clear line back
            return encode({"error": f"refused: {e}"})
        results = [await self._keep(item, connection) for item in message.get("receipts", [])]
        return encode({"receipts": results})

    async def _keep(self, item: object, connection: str) -> str | None:
        """Check one receipt and append it to the ledger: None if kept, else why not."""
        try:
            receipt = Receipt.from_wire(item) if isinstance(item, dict) else None
            if receipt is None:
                raise InvalidReceipt("not a receipt")
            check_receipt(receipt, self.ledger.server, connection)
            if receipt.fingerprint != self.fingerprint or receipt.params_per_block != self.params_per_block:
                raise InvalidReceipt("the receipt is for another model than the one served here")
            if receipt.timestamp > time.time() + MAX_CLOCK_SKEW:
                raise InvalidReceipt("the receipt is dated in the future")
            await asyncio.get_running_loop().run_in_executor(None, self.ledger.append, receipt)
        except Exception as e:
            logger.info(f"refused a receipt from {connection}: {e}")
            return str(e)
        return None

    async def rpc_ledger(self, request: runtime_pb2.ExpertInfo, context: P2PContext) -> runtime_pb2.ExpertInfo:
        try:
            message = decode(request)
            offset, limit = int(message["offset"]), min(int(message.get("limit", LEDGER_PAGE)), LEDGER_PAGE)
            if not 0 <= offset < 2**62 or limit < 1:  # SQLite integers are 64-bit: a bigger offset raised (fuzz test)
                raise ValueError("offset must be in [0, 2**62) and limit >= 1")
        except Exception as e:
            return encode({"error": f"bad rpc_ledger request: {e}"})
        entries = await asyncio.get_running_loop().run_in_executor(None, self.ledger.page, offset, limit)
        return encode({"entries": [entry.to_wire() for entry in entries]})
