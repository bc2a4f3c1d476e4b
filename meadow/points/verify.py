"""Checking a ledger as anyone can: the chain, every receipt's signature, no receipt twice, and the totals and head
its server announced. A pure function of the entries and the announcement."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from meadow.points.ledger import Entry, entry_hash, genesis_hash
from meadow.points.receipts import InvalidReceipt, check_receipt
from meadow.swarm.records import LedgerHead


@dataclass
class LedgerReport:
    """What a ledger holds once checked: totals of its valid prefix, work by signer, and the first problem found."""

    server: str
    entries: int = 0
    tokens: int = 0
    work: int = 0
    work_by_signer: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error: str | None = None  # None: the whole ledger is valid and agrees with the announcement

    @property
    def valid(self) -> bool:
        return self.error is None


def verify_ledger(server: str, entries: Sequence[Entry], announced: LedgerHead | None = None) -> LedgerReport:
    """Check `entries` (the whole ledger of `server`, from index 0) and, if given, the head and totals the server
    announced: its announced entry must lie on the chain with the announced totals up to it (the ledger may have grown
    since), so an edited, dropped, reordered or truncated history is found. Totals count the valid prefix only."""
    report, prev, seen = LedgerReport(server), genesis_hash(server), set()
    for position, entry in enumerate(entries):
        if announced is not None and position == announced.entries:
            report.error = _against(report, prev, announced)
            if report.error:
                return report
        if entry.index != position:
            report.error = f"entry {position} is numbered {entry.index}: entries were dropped or reordered"
        elif entry.prev != prev:
            report.error = f"entry {position} does not name the previous entry's hash: the chain is broken"
        elif entry.hash != entry_hash(entry.prev, entry.body):
            report.error = f"entry {position}'s hash does not match its content: it was edited"
        else:
            try:
                receipt = entry.receipt()
                check_receipt(receipt, server)
                if receipt.key in seen:
                    raise InvalidReceipt(f"receipt {receipt.seq} of {receipt.signer_id} is counted twice")
            except InvalidReceipt as e:
                report.error = f"entry {position}: {e}"
        if report.error:
            return report
        seen.add(receipt.key)
        prev = entry.hash
        report.entries, report.tokens, report.work = position + 1, report.tokens + receipt.tokens, report.work + receipt.work
        report.work_by_signer[receipt.signer_id] += receipt.work
    if announced is not None and len(entries) <= announced.entries:
        report.error = _against(report, prev, announced)
    return report


def _against(report: LedgerReport, prev: str, announced: LedgerHead) -> str | None:
    """What is wrong with the first `announced.entries` entries (checked so far) given the announcement, if anything."""
    if report.entries < announced.entries:
        return f"the ledger has {report.entries} entries, its server announced {announced.entries}: it was truncated"
    if prev != announced.hash:
        return f"entry {announced.entries - 1}'s hash is not the announced head: the history was rewritten"
    if (report.tokens, report.work) != (announced.tokens, announced.work):
        return f"the entries hold {report.tokens} tokens, {report.work} work; the server announced {announced.tokens}, {announced.work}"
    return None
