"""A peer's view of everyone's points: fetch every announced ledger, verify it against its announcement, and weigh
the verified work by standing (standing.py). What `meadow points` prints and what a server's priorities read."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Collection

import hivemind
from hivemind.p2p import P2P, PeerID

from meadow.points.ledger import Ledger
from meadow.points.rpc import fetch_ledger
from meadow.points.standing import points
from meadow.points.verify import LedgerReport, verify_ledger
from meadow.swarm import fetch_ledgers
from meadow.swarm.dht import call_dht
from meadow.swarm.records import LedgerHead

logger = logging.getLogger(__name__)


@dataclass
class PointsBook:
    """Verified ledgers by server (peer id, base58) and the points they give; `seeds`: trusted peers (EigenTrust's
    pre-trusted); `allow`: in a private swarm, the only signers whose receipts count."""

    seeds: Collection[str] = ()
    allow: Collection[str] | None = None
    reports: dict[str, LedgerReport] = field(default_factory=dict)
    points: dict[str, float] = field(default_factory=dict)

    def update(self, reports: dict[str, LedgerReport]) -> None:
        """Take these verified ledgers; a ledger found invalid earns nothing (its valid prefix would be a cheater's
        choice of history)."""
        self.reports = reports
        work = {server: dict(report.work_by_signer) for server, report in reports.items() if report.valid}
        self.points = {server: 0.0 for server in reports} | points(work, self.seeds, self.allow)

    async def refresh(self, dht: hivemind.DHT, p2p: P2P, local: Ledger | None = None) -> None:
        """Fetch and verify every ledger announced in the DHT (`local`: our own server's, read from disk instead),
        then recompute points. A ledger found valid before is fetched and checked from where that check ended."""
        heads = await call_dht(fetch_ledgers, dht)
        reports = await asyncio.gather(*(self._check(p2p, peer, head, local) for peer, head in heads.items()))
        self.update({report.server: report for report in reports})

    async def _check(self, p2p: P2P, peer: PeerID, head: LedgerHead, local: Ledger | None) -> LedgerReport:
        server, loop = peer.to_base58(), asyncio.get_running_loop()
        before = self.reports.get(server)
        after = before if before is not None and before.valid else None
        offset = after.entries if after is not None else 0
        try:
            if local is not None and local.server == server:
                entries = await loop.run_in_executor(None, local.page, offset, 2**62)
            else:
                entries = await fetch_ledger(p2p, peer, offset)
        except Exception as e:  # unreachable is not invalid: what we verified last time stands until it answers again
            if before is not None:
                return before
            report = LedgerReport(server)
            report.error = f"could not fetch its ledger: {e!r}"
            return report
        return await loop.run_in_executor(None, verify_ledger, server, entries, head, after)
