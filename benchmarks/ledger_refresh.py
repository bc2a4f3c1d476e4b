"""What re-checking ledgers costs a peer: every server (and the API's monitor) re-reads every announced ledger each
points period (60 s). Checking a whole ledger again costs time in proportion to its length; going on from the last
check costs only what was appended since. Prints both for ledgers of growing length, with the memory the kept check
holds per entry.

    python benchmarks/ledger_refresh.py [--entries 1000 4000 16000] [--new 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

from meadow.points.ledger import Entry, entry_hash, genesis_hash, receipt_body
from meadow.points.receipts import Receipt
from meadow.points.verify import verify_ledger
from meadow.swarm import generate_identity

SERVER = "QmServer"


def make_entries(count: int, signers: int = 8) -> list[Entry]:
    """A valid chain of `count` receipts from a few signers (signing dominates: ~0.7 ms a receipt)."""
    with tempfile.TemporaryDirectory() as folder:
        owners = [generate_identity(Path(folder) / f"{n}.key") for n in range(signers)]
    entries, prev = [], genesis_hash(SERVER)
    for seq in range(count):
        receipt = Receipt(signer="", server=SERVER, client="QmClient", fingerprint="f", start=0, end=4, tokens=64,
                          params_per_block=7_000_000, kind="inference", timestamp=time.time(), seq=seq)  # fmt: skip
        body = receipt_body(receipt.signed_by(owners[seq % signers]))
        entries.append(Entry(seq, prev, body, entry_hash(prev, body)))
        prev = entries[-1].hash
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--new", type=int, default=64, help="entries appended since the last check")
    args = parser.parse_args()
    entries = make_entries(max(args.entries))
    print(f"{'entries':>8} {'whole check, ms':>16} {'from the last, ms':>18} {'ratio':>7} {'kept, bytes/entry':>18}")
    for count in args.entries:
        began = time.perf_counter()
        whole = verify_ledger(SERVER, entries[:count])
        whole_ms = (time.perf_counter() - began) * 1000
        tracemalloc.start()
        earlier = verify_ledger(SERVER, entries[: count - args.new])
        kept = tracemalloc.get_traced_memory()[0] / (count - args.new)
        tracemalloc.stop()
        began = time.perf_counter()
        resumed = verify_ledger(SERVER, entries[count - args.new : count], after=earlier)
        resumed_ms = (time.perf_counter() - began) * 1000
        assert whole.valid and resumed.valid and (resumed.entries, resumed.work) == (whole.entries, whole.work)
        print(f"{count:>8} {whole_ms:>16.1f} {resumed_ms:>18.1f} {whole_ms / resumed_ms:>6.0f}x {kept:>18.0f}")


if __name__ == "__main__":
    main()
