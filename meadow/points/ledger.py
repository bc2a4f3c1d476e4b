"""A server's ledger: an append-only, hash-chained log of the receipts it was given, in SQLite.

Entry i holds a receipt (its msgpack bytes), the hash of entry i-1 (`prev`; the first names a genesis hash derived
from the server's peer id, so a ledger cannot be passed off as another server's) and its own hash, sha256(prev +
body). One entry is one transaction in WAL mode with synchronous=FULL: a server killed mid-write loses at most the
entry being written, and what is on disk is always a whole chain."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import msgpack

from meadow.points.receipts import InvalidReceipt, Receipt
from meadow.swarm.records import LedgerHead


def genesis_hash(server: str) -> str:
    return hashlib.sha256(b"meadow-ledger\0" + server.encode()).hexdigest()


def entry_hash(prev: str, body: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + body).hexdigest()


def receipt_body(receipt: Receipt) -> bytes:
    return msgpack.packb(receipt.to_wire(), use_bin_type=True)


@dataclass(frozen=True)
class Entry:
    """One link of the chain, as stored and as served by rpc_ledger."""

    index: int
    prev: str
    body: bytes
    hash: str

    def to_wire(self) -> list:
        return [self.index, self.prev, self.body, self.hash]

    @classmethod
    def from_wire(cls, data: object) -> Entry:
        try:
            index, prev, body, hash_ = data
            if not (isinstance(index, int) and isinstance(prev, str) and isinstance(body, bytes) and isinstance(hash_, str)):
                raise TypeError("wrong field types")
        except (TypeError, ValueError) as e:
            raise ValueError(f"not a ledger entry ({e})") from None
        return cls(index, prev, body, hash_)

    def receipt(self) -> Receipt:
        try:
            return Receipt.model_validate(msgpack.unpackb(self.body, raw=False))
        except Exception as e:
            raise InvalidReceipt(f"entry {self.index} holds no receipt ({e})") from None


class DuplicateReceipt(InvalidReceipt):
    """A receipt whose (signer, seq) is already in the ledger: a replay or a double count."""


class Ledger:
    """The append-only receipt log of the server `server` (peer id), in the SQLite file `path`."""

    def __init__(self, path: str | Path, server: str):
        self.path, self.server = Path(path), server
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.lock = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, prev TEXT NOT NULL, body BLOB NOT NULL, "
            "hash TEXT NOT NULL, signer TEXT NOT NULL, seq INTEGER NOT NULL, tokens INTEGER NOT NULL, "
            "work INTEGER NOT NULL, UNIQUE (signer, seq))"
        )

    def head(self) -> LedgerHead:
        with self.lock:
            count, tokens, work = self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(work), 0) FROM entries"
            ).fetchone()
            last = self.db.execute("SELECT hash FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
        return LedgerHead(entries=count, hash=last[0] if last else genesis_hash(self.server), tokens=tokens, work=work)

    def append(self, receipt: Receipt) -> Entry:
        """Add a (checked) receipt as the next entry, in one transaction; DuplicateReceipt if it is already here."""
        body = receipt_body(receipt)
        signer, seq = receipt.key
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.db.execute("SELECT 1 FROM entries WHERE signer = ? AND seq = ?", (signer, seq)).fetchone():
                    raise DuplicateReceipt(f"receipt {seq} of {signer} is already in the ledger")
                last = self.db.execute("SELECT idx, hash FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
                index, prev = (last[0] + 1, last[1]) if last else (0, genesis_hash(self.server))
                entry = Entry(index, prev, body, entry_hash(prev, body))
                self.db.execute(
                    "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (index, prev, body, entry.hash, signer, seq, receipt.tokens, receipt.work),
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return entry

    def page(self, offset: int, limit: int) -> list[Entry]:
        with self.lock:
            rows = self.db.execute(
                "SELECT idx, prev, body, hash FROM entries WHERE idx >= ? ORDER BY idx LIMIT ?", (offset, limit)
            ).fetchall()
        return [Entry(*row) for row in rows]

    def close(self) -> None:
        with self.lock:
            self.db.close()
