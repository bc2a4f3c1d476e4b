"""Checking a ledger as anyone can: the chain, every receipt's signature, no receipt twice, and the totals and head
its server announced. A pure function of the entries and the announcement; it can go on from an earlier check of
the same ledger, so that a peer that re-reads every ledger each minute checks only what was appended since."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from meadow.points.ledger import Entry, entry_hash, genesis_hash
from meadow.points.receipts import InvalidReceipt, check_receipt
from meadow.swarm.records import LedgerHead


@dataclass
class LedgerReport:
    """What a ledger holds once checked: totals of its valid prefix, work by signer, and the first problem found; and,
    to go on from here later, each checked entry's hash and running totals and the receipts already counted."""

    server: str
    entries: int = 0
    tokens: int = 0
    work: int = 0
    work_by_signer: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error: str | None = None  # None: the whole ledger is valid and agrees with the announcement
    # kept compact (~200 bytes an entry): entry i's hash, the tokens and work of entries 0..i (Python ints: a work
    # total may pass 2**63), and every receipt's seq by signer
    hashes: list[bytes] = field(default_factory=list, repr=False)
    tokens_to: list[int] = field(default_factory=list, repr=False)
    work_to: list[int] = field(default_factory=list, repr=False)
    seen: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set), repr=False)

    @property
    def valid(self) -> bool:
        return self.error is None

    def copy(self) -> LedgerReport:
        """A report to go on from, leaving this one as it is (others may be reading it meanwhile)."""
        seen = defaultdict(set, {signer: set(seqs) for signer, seqs in self.seen.items()})
        return LedgerReport(self.server, self.entries, self.tokens, self.work, defaultdict(int, self.work_by_signer),
                            self.error, list(self.hashes), list(self.tokens_to), list(self.work_to), seen)  # fmt: skip


def verify_ledger(
    server: str, entries: Sequence[Entry], announced: LedgerHead | None = None, after: LedgerReport | None = None
) -> LedgerReport:
    """Check `entries` of `server`'s ledger, from index 0 or, given `after` (a valid report of this ledger's first
    `after.entries` entries), from there on; and, if given, the head and totals the server announced: its announced
    entry must lie on the chain with the announced totals up to it (the ledger may have grown since), so an edited,
    dropped, reordered or truncated history is found. Entries that do not go on from `after`'s last one mean the
    history was rewritten since. Totals count the valid prefix only."""
    report = after.copy() if after is not None else LedgerReport(server)
    for position, entry in enumerate(entries, start=report.entries):
        prev = report.hashes[-1].hex() if report.hashes else genesis_hash(server)
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
                signer = receipt.signer_id
                if receipt.seq in report.seen[signer]:
                    raise InvalidReceipt(f"receipt {receipt.seq} of {signer} is counted twice")
            except InvalidReceipt as e:
                report.error = f"entry {position}: {e}"
        if report.error:
            return report
        report.seen[signer].add(receipt.seq)
        report.entries, report.tokens, report.work = position + 1, report.tokens + receipt.tokens, report.work + receipt.work
        report.work_by_signer[signer] += receipt.work
        report.hashes.append(bytes.fromhex(entry.hash))
        report.tokens_to.append(report.tokens)
        report.work_to.append(report.work)
    if announced is not None:
        report.error = _against(report, announced)
    return report


def _against(report: LedgerReport, announced: LedgerHead) -> str | None:
    """What is wrong with the checked entries given the announcement, if anything."""
    count = announced.entries
    if report.entries < count:
        return f"the ledger has {report.entries} entries, its server announced {count}: it was truncated"
    head = report.hashes[count - 1].hex() if count else genesis_hash(report.server)
    if head != announced.hash:
        return f"entry {count - 1}'s hash is not the announced head: the history was rewritten"
    tokens, work = (report.tokens_to[count - 1], report.work_to[count - 1]) if count else (0, 0)
    if (tokens, work) != (announced.tokens, announced.work):
        return f"the entries hold {tokens} tokens, {work} work; the server announced {announced.tokens}, {announced.work}"
    return None
