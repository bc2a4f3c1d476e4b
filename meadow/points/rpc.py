"""The points RPCs on the wire: rpc_receipt (a client hands a server its membership and receipts) and rpc_ledger (a
page of a server's ledger, for anyone). Unary calls carrying msgpack, like rpc_info."""

from __future__ import annotations

import asyncio

import msgpack
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from meadow.points.ledger import Entry
from meadow.points.receipts import Membership, Receipt

RPC_RECEIPT = "meadow.rpc_receipt"
RPC_LEDGER = "meadow.rpc_ledger"
LEDGER_PAGE = 500  # entries per rpc_ledger reply: ~1 KB each, well under the 4 MiB cap of a unary message
MAX_RECEIPTS = 64  # per rpc_receipt call


def encode(data: object) -> runtime_pb2.ExpertInfo:
    return runtime_pb2.ExpertInfo(serialized_info=msgpack.packb(data, use_bin_type=True))


def decode(message: runtime_pb2.ExpertInfo) -> object:
    return msgpack.unpackb(message.serialized_info, raw=False)


async def send_receipts(
    p2p: P2P, peer: PeerID, receipts: list[Receipt], membership: Membership | None = None, timeout: float = 10.0
) -> list[str | None]:
    """Hand `receipts` (and our membership, if given) to the server `peer`: per receipt, None if it was kept, else
    the server's reason for refusing it. ValueError if the membership was refused."""
    request = {"membership": membership.to_wire() if membership else None, "receipts": [r.to_wire() for r in receipts]}
    reply = decode(await asyncio.wait_for(
        p2p.call_protobuf_handler(peer, RPC_RECEIPT, encode(request), runtime_pb2.ExpertInfo), timeout
    ))  # fmt: skip
    if not isinstance(reply, dict):
        raise ValueError("malformed rpc_receipt reply")
    if reply.get("error"):
        raise ValueError(reply["error"])
    return list(reply.get("receipts", []))


async def fetch_ledger(p2p: P2P, peer: PeerID, offset: int = 0, timeout: float = 30.0) -> list[Entry]:
    """The entries of `peer`'s ledger from index `offset` on, page by page (ValueError on a malformed reply)."""
    entries: list[Entry] = []
    while True:
        request = encode({"offset": offset + len(entries), "limit": LEDGER_PAGE})
        reply = decode(await asyncio.wait_for(
            p2p.call_protobuf_handler(peer, RPC_LEDGER, request, runtime_pb2.ExpertInfo), timeout
        ))  # fmt: skip
        if not isinstance(reply, dict) or not isinstance(reply.get("entries"), list):
            raise ValueError(f"malformed rpc_ledger reply from {peer}")
        page = [Entry.from_wire(item) for item in reply["entries"]]
        entries.extend(page)
        if len(page) < LEDGER_PAGE:
            return entries
