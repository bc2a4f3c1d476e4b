"""`meadow points [PEER]`: fetch and verify every announced ledger (or PEER's among them) and print the totals."""

from __future__ import annotations

import sys
from typing import Collection, Sequence

from meadow.points.book import PointsBook
from meadow.points.standing import PARAMETER_TOKENS_PER_POINT


def collect_points(
    initial_peers: Sequence[str], seeds: Collection[str] = (), allow: Collection[str] | None = None
) -> PointsBook:
    """Join the swarm as a client, verify every announced ledger, leave."""
    from meadow.client.event_loop import run
    from meadow.swarm import start_dht

    dht = start_dht(initial_peers, client_mode=True)
    try:
        p2p = run(dht.replicate_p2p())
        book = PointsBook(seeds=seeds, allow=allow)
        run(book.refresh(dht, p2p))
        run(p2p.shutdown())
        return book
    finally:
        dht.shutdown()


def format_points(book: PointsBook, peer: str | None = None) -> str:
    unit = f"1 point = {PARAMETER_TOKENS_PER_POINT:.0e} parameter-tokens"
    lines = [f"{'server':<52} {'entries':>8} {'tokens':>10} {'points':>12}  ledger   ({unit})"]
    for server, report in sorted(book.reports.items(), key=lambda item: -book.points.get(item[0], 0.0)):
        if peer is not None and server != peer:
            continue
        status = "valid" if report.valid else f"INVALID: {report.error}"
        lines.append(f"{server:<52} {report.entries:>8} {report.tokens:>10} {book.points.get(server, 0.0):>12.6f}  {status}")
    return "\n".join(lines)


def print_points(
    initial_peers: Sequence[str], peer: str | None = None, seeds: Collection[str] = (), allow: Collection[str] | None = None
) -> None:
    """Print the verified totals of every ledger (or PEER's); exit with status 1 if one shown is invalid or PEER
    announces none."""
    book = collect_points(initial_peers, seeds, allow)
    if peer is not None and peer not in book.reports:
        sys.exit(f"meadow points: {peer} announces no ledger in this swarm")
    print(format_points(book, peer), flush=True)
    shown = [report for server, report in book.reports.items() if peer is None or server == peer]
    if any(not report.valid for report in shown):
        sys.exit(1)
