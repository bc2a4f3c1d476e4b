"""Contribution points: servers keep only receipts their clients really signed, each once; a ledger's history cannot be
edited, dropped or reordered unseen; a killed writer leaves a valid chain; points buy priority on a busy server without
starving anyone. Real processes on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
import sqlite3
import threading
import time

import pytest
import torch

from meadow.cli import _client_config, build_parser, main
from meadow.client.config import ClientConfig
from meadow.client.event_loop import run
from meadow.client.sequence import connect_sequence
from meadow.client.transport import forward
from meadow.local_swarm import Process
from meadow.models import load_config
from meadow.models.fingerprint import checkpoint_fingerprint
from meadow.points.ledger import Entry, Ledger, entry_hash
from meadow.points.work import params_per_block
from meadow.points.receipts import Receipt
from meadow.points.rpc import send_receipts
from meadow.points.verify import verify_ledger
from meadow.swarm import generate_identity, load_identity
from meadow.swarm.records import LedgerHead
from meadow.wire import BlockRange, ForwardRequest
from tests.conftest import peer_of, start_swarm
from tests.test_pages import browser  # noqa: F401 (a fixture: headless Chromium)

NUM_BLOCKS = 4
CHUNK = 8  # the busy server runs 8 tokens a pass: a 512-token forward takes 64 passes, so requests queue there
FORWARD_TOKENS = 512
THREADS = 5  # requests each client keeps in flight: enough that its queue at the busy server never runs dry


@pytest.fixture(scope="module")
def swarm(checkpoints, tmp_path_factory):
    """Server A (blocks 0:2) and a busy server B (2:4, few tokens per pass), both with kept identities; every chain
    goes A -> B. Both refresh everyone's points every second."""
    path = checkpoints("llama", num_layers=NUM_BLOCKS)
    keys = tmp_path_factory.mktemp("keys")
    for name in ("a", "b", "client"):
        generate_identity(keys / f"{name}.key")
    fast = ("--throughput", "1000", "--points-period", "1", "--update-period", "2")
    swarm = start_swarm(path, [], *fast)
    try:
        swarm.start_server(path, "--blocks", "0:2", "--identity", str(keys / "a.key"), *fast, wait=False)
        swarm.start_server(path, "--blocks", "2:4", "--identity", str(keys / "b.key"), "--chunk-tokens", str(CHUNK), *fast, wait=False)  # fmt: skip
        for server in swarm.servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        yield swarm, path, keys
    finally:
        for server in swarm.servers:  # all at once: each takes a few seconds to leave
            server.popen.send_signal(signal.SIGTERM)
        swarm.stop()


def client(swarm, keys, **config):
    local_swarm, path, _ = swarm
    return connect_sequence(path, load_config(path), local_swarm.initial_peers, client_config=ClientConfig(**config))


def receipt(signer, server: str, client_id: str, path, tokens: int = 100, seq: int = 1) -> Receipt:
    unsigned = Receipt(
        signer="", server=server, client=client_id, fingerprint=checkpoint_fingerprint(path), start=0, end=2,
        tokens=tokens, params_per_block=params_per_block(load_config(path)), kind="forward", timestamp=time.time(), seq=seq,
    )  # fmt: skip
    return unsigned.signed_by(signer)


def test_forged_altered_replayed_and_double_counted_receipts_are_refused(swarm, tmp_path):
    local_swarm, path, keys = swarm
    a, b = (peer_of(server) for server in local_swarm.servers)
    owner, stranger = load_identity(keys / "b.key"), generate_identity(tmp_path / "stranger.key")
    sequence = client(swarm, keys)  # anonymous: we sign these receipts ourselves
    try:
        me, p2p, server = sequence.p2p.peer_id.to_base58(), sequence.p2p, local_swarm.servers[0]
        server_id = sequence.p2p.peer_id.from_base58(a)
        good = receipt(owner, a, me, path, seq=7)
        altered = good.model_copy(update={"tokens": 10**6})  # more work than was signed for
        forged = receipt(stranger, a, me, path, seq=8).model_copy(update={"signer": good.signer})  # not B's signature
        other_client = receipt(owner, a, "QmSomeoneElse", path, seq=9)  # copied from another client's connection
        other_server = receipt(owner, b, me, path, seq=10)  # made out to another server
        replies = run(send_receipts(p2p, server_id, [good, good, altered, forged, other_client, other_server]))
        assert replies[0] is None, replies
        assert "already in the ledger" in replies[1]  # counted once
        assert "signature does not match" in replies[2] and "signature does not match" in replies[3]
        assert "names client QmSomeoneElse" in replies[4] and f"is for server {b}" in replies[5]
        assert "already in the ledger" in run(send_receipts(p2p, server_id, [good]))[0]  # replayed later: still once
        assert server.popen.poll() is None
    finally:
        sequence.close()


def test_points_buy_priority_on_a_busy_server_and_the_anonymous_still_progress(swarm):
    local_swarm, path, keys = swarm
    a, b = (peer_of(server) for server in local_swarm.servers)
    # B's owner uses the swarm: A's ledger gets receipts signed by B, so A earns points
    sequence = client(swarm, keys, identity=str(keys / "client.key"), points_identity=str(keys / "b.key"))
    try:
        hidden = torch.randn(1, 100, 64)
        for _ in range(3):
            sequence.forward(hidden, torch.arange(100)[None], None)
        sequence.payer.wait()
        assert not sequence.payer.refused
    finally:
        sequence.close()
    local_swarm.servers[1].wait_for(lambda line: re.search(rf"points: .*{a} [0-9.e-]*[1-9]", line) is not None, 30)

    # A's owner's client and an anonymous one load the busy server B at once, several requests each in flight
    rich = client(swarm, keys, points_identity=str(keys / "a.key"))
    poor = client(swarm, keys)
    served, stop = {"rich": 0, "poor": 0}, threading.Event()
    b_id = rich.p2p.peer_id.from_base58(b)
    tensors = [torch.randn(1, FORWARD_TOKENS, 64), torch.arange(FORWARD_TOKENS)[None], torch.ones(1, FORWARD_TOKENS, dtype=torch.bool)]
    request = ForwardRequest(blocks=BlockRange(start=2, end=4))

    def load(name, sequence):
        while not stop.is_set():
            if sequence.payer is not None:
                run(sequence.payer.introduce(b_id))
            run(forward(sequence.p2p, b_id, request, tensors, 60))
            if not stop.is_set():  # what finishes after the race ends would flatter whoever was left waiting
                served[name] += 1

    try:
        threads = [threading.Thread(target=load, args=(name, seq)) for name, seq in (("rich", rich), ("poor", poor)) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        while served["rich"] < 24 and all(thread.is_alive() for thread in threads):
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(60)
        print(f"forwards of {FORWARD_TOKENS} tokens served on the busy server: {served}")
        assert served["rich"] >= 24
        said = [line for line in local_swarm.servers[1].lines if "points" in line][-10:]  # what B knew of them
        assert served["rich"] > 2 * served["poor"], said  # points buy clearly more throughput (3/4 of the passes)...
        assert served["poor"] > 0  # ...and the reserved share keeps the anonymous going
    finally:
        rich.close()
        poor.close()


def test_the_monitor_shows_verified_points_per_server_and_the_chat_page_the_users_own(swarm, browser):
    local_swarm, path, keys = swarm
    a, b = (peer_of(server) for server in local_swarm.servers)
    api = Process(["api", str(path), "--initial-peers", *local_swarm.initial_peers, "--port", "0",
                   "--points-identity", str(keys / "a.key")], "api")  # the API spends (and shows) A's points
    try:
        url = api.wait_for(lambda line: line.startswith("API ready"), timeout=180).split()[2]
        with urllib.request.urlopen(url + "/api/points", timeout=60) as response:
            body = json.load(response)
        assert body["servers"][a]["valid"] and body["servers"][b]["valid"], body
        assert body["servers"][a]["points"] > 0 and body["servers"][a]["entries"] >= 1
        assert body["me"] == {"peer": a, "points": body["servers"][a]["points"]}

        page, errors = browser.new_page(), []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/monitor")
        row = page.locator("tr", has=page.locator(f'td.peer[title="{a}"]'))
        row.locator("td", has_text="points").filter(has_not_text="0 points").wait_for(timeout=30_000)
        shown = float(row.locator("td", has_text="points").inner_text().split()[0])
        assert shown == pytest.approx(body["servers"][a]["points"], rel=0.01)
        page.goto(url + "/")
        page.wait_for_selector("#my-points:not([hidden])", timeout=30_000)
        assert float(page.inner_text("#my-points").split()[-1]) == pytest.approx(body["me"]["points"], rel=0.01)
        assert not errors
    finally:
        api.stop()


def test_generate_and_chat_sign_receipts_with_a_points_identity(swarm, meadow_home):
    """`meadow generate --points-identity` pays with your server's identity while the client runs under another peer
    id (it cannot be your server's: two processes cannot be one peer); `meadow chat` takes the same option."""
    local_swarm, path, keys = swarm
    b = peer_of(local_swarm.servers[1])
    owner = load_identity(keys / "a.key").peer_id.to_base58()
    ledger = Ledger(meadow_home / "ledgers" / f"{b}.sqlite", b)

    def paid_by_owner() -> int:
        receipts = [entry.receipt() for entry in ledger.page(0, 10**9)]
        return sum(receipt.kind == "inference" and receipt.signer_id == owner for receipt in receipts)

    before = paid_by_owner()
    result = subprocess.run(
        [sys.executable, "-m", "meadow", "generate", str(path), "--initial-peers", *local_swarm.initial_peers,
         "--prompt", "hi", "--max-new-tokens", "4", "--points-identity", str(keys / "a.key")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    deadline = time.monotonic() + 30  # the server appends a receipt beside its compute loop
    while paid_by_owner() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert paid_by_owner() > before
    ledger.close()

    args = build_parser().parse_args(["chat", "--initial-peers", *local_swarm.initial_peers, "--points-identity", str(keys / "a.key")])
    assert _client_config(args).points_identity == str(keys / "a.key")


def points_cli(capsys, peer: str, initial_peers) -> tuple[int, str]:
    try:
        main(["points", peer, "--initial-peers", *initial_peers])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().out


def test_meadow_points_detects_an_edited_dropped_or_reordered_ledger(swarm, capsys, meadow_home):
    local_swarm, path, keys = swarm
    a = peer_of(local_swarm.servers[0])
    code, out = points_cli(capsys, a, local_swarm.initial_peers)
    assert code == 0 and "valid" in out and "INVALID" not in out, out
    db = sqlite3.connect(meadow_home / "ledgers" / f"{a}.sqlite", isolation_level=None)
    rows = db.execute("SELECT * FROM entries ORDER BY idx LIMIT 3").fetchall()
    assert len(rows) == 3

    def tampered(change, undo) -> str:
        db.execute(change[0], change[1])
        try:
            code, out = points_cli(capsys, a, local_swarm.initial_peers)
        finally:
            for statement, values in undo:
                db.execute(statement, values)
        assert code == 1, out
        return out

    body = bytearray(rows[1][2])
    body[body.index(b"tokens") + 6] ^= 1  # one bit of the token count
    assert "edited" in tampered(("UPDATE entries SET body = ? WHERE idx = 1", (bytes(body),)),
                                [("UPDATE entries SET body = ? WHERE idx = 1", (rows[1][2],))])  # fmt: skip
    assert "dropped or reordered" in tampered(("DELETE FROM entries WHERE idx = 1", ()),
                                              [("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows[1])])  # fmt: skip
    def swap(first, second) -> None:  # entries 1 and 2 trade places (seq negated first: it is unique per signer)
        db.execute("BEGIN")
        db.execute("UPDATE entries SET seq = -seq WHERE idx IN (1, 2)")
        for row, index in ((first, 1), (second, 2)):
            db.execute("UPDATE entries SET prev = ?, body = ?, hash = ?, signer = ?, seq = ? WHERE idx = ?", (*row[1:6], index))
        db.execute("COMMIT")

    swap(rows[2], rows[1])
    try:
        code, out = points_cli(capsys, a, local_swarm.initial_peers)
        assert code == 1 and "chain is broken" in out, out
    finally:
        swap(rows[1], rows[2])
    # the server announces its head from its ledger every update period (2 s): one announced while the ledger was
    # tampered with stays in the DHT until the next, so the restored ledger is valid again within a few periods
    deadline = time.monotonic() + 5 * 2
    while (result := points_cli(capsys, a, local_swarm.initial_peers))[0] != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    code, out = result
    assert code == 0 and "INVALID" not in out, out


def test_a_ledger_checked_in_parts_counts_what_one_check_counts_and_finds_what_changed_between(tmp_path):
    """Peers re-read every ledger each period and check only what was appended since their last check: that must
    find the same totals, a receipt counted again across the parts, and a history rewritten in between."""
    server, owner = "QmServer", generate_identity(tmp_path / "owner.key")
    ledger, other = Ledger(tmp_path / "a.sqlite", server), Ledger(tmp_path / "b.sqlite", server)
    for seq in range(10):
        unsigned = Receipt(signer="", server=server, client="QmClient", fingerprint="f", start=0, end=2 + seq % 3,
                           tokens=64 + seq, params_per_block=1000, kind="inference", timestamp=time.time(), seq=seq)  # fmt: skip
        ledger.append(unsigned.signed_by(owner))
        other.append(unsigned.model_copy(update={"tokens": 1}).signed_by(owner))  # another history of the same length
    entries, head, rewritten, rewritten_head = ledger.page(0, 100), ledger.head(), other.page(0, 100), other.head()

    whole = verify_ledger(server, entries, head)
    first = verify_ledger(server, entries[:6])
    rest = verify_ledger(server, entries[6:], head, after=first)
    assert whole.valid and rest.valid and first.entries == 6
    assert (rest.entries, rest.tokens, rest.work, dict(rest.work_by_signer)) == (10, whole.tokens, whole.work, dict(whole.work_by_signer))
    assert verify_ledger(server, [], head, after=rest).valid  # nothing new
    assert verify_ledger(server, [], ledger_head_of(entries[:4]), after=rest).valid  # announced before our last check
    assert "rewritten" in verify_ledger(server, [], rewritten_head, after=rest).error
    assert "chain is broken" in verify_ledger(server, rewritten[6:], after=first).error
    replayed = Entry(6, entries[5].hash, entries[2].body, entry_hash(entries[5].hash, entries[2].body))
    assert "counted twice" in verify_ledger(server, [replayed], after=first).error
    assert first.entries == 6 and first.valid  # going on from a report leaves it as it was
    ledger.close()
    other.close()


def ledger_head_of(entries: list[Entry]) -> LedgerHead:
    receipts = [entry.receipt() for entry in entries]
    return LedgerHead(entries=len(entries), hash=entries[-1].hash, tokens=sum(r.tokens for r in receipts), work=sum(r.work for r in receipts))


def test_standing_weighs_receipts_by_their_signers_ledgers_and_reserved_passes_serve_the_lowest_first():
    from dataclasses import dataclass

    from meadow.points.standing import PARAMETER_TOKENS_PER_POINT, points
    from meadow.server.compute_loop import choose_batch

    work = {"A": {"B": 1e9, "fake": 1e12, "A": 1e12}, "B": {"A": 1e9}}  # fake clients and self-signed receipts
    earned = points(work)
    assert earned["A"] == pytest.approx(earned["B"]) and 0 < earned["A"] <= 1e9 / PARAMETER_TOKENS_PER_POINT
    assert points(work, allow=["fake"])["A"] == 1e12 / PARAMETER_TOKENS_PER_POINT  # a private swarm's list decides

    @dataclass
    class Job:
        peer: str
        priority: int
        order: int
        decoding: bool = False
        tokens: int = 8

    jobs = [Job("anonymous", 0, 0), Job("rich", 5, 1)]
    turns = {True: {}, False: {}}
    assert [job.peer for job in choose_batch(jobs, turns, 8, chunk_tokens=8)] == ["rich"]
    assert [job.peer for job in choose_batch(jobs, turns, 8, chunk_tokens=8, reserved=True)] == ["anonymous"]


def test_a_server_killed_while_writing_its_ledger_keeps_a_valid_chain(swarm, meadow_home):
    """Last in this module: it kills server A."""
    local_swarm, path, keys = swarm
    server = local_swarm.servers[0]
    a, owner = peer_of(server), load_identity(keys / "b.key")
    file = meadow_home / "ledgers" / f"{a}.sqlite"
    count = lambda: sqlite3.connect(file).execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    before, stop = count(), threading.Event()
    sequence = client(swarm, keys)
    me, server_id = sequence.p2p.peer_id.to_base58(), sequence.p2p.peer_id.from_base58(a)

    def flood(first: int) -> None:  # receipts nonstop, so that the kill lands in the middle of some append
        for seq in range(first, first + 10**6, 16):
            batch = [receipt(owner, a, me, path, seq=n) for n in range(seq, seq + 16)]
            try:
                run(send_receipts(sequence.p2p, server_id, batch))
            except Exception:
                return  # the server is gone
            if stop.is_set():
                return

    threads = [threading.Thread(target=flood, args=(10**9 * (i + 1),)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while count() < before + 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        server.signal(signal.SIGKILL)  # the whole process group: no chance to finish anything
        stop.set()
        for thread in threads:
            thread.join(60)
    finally:
        sequence.close()
    ledger = Ledger(file, a)
    entries = ledger.page(0, 10**9)
    report = verify_ledger(a, entries)
    assert report.valid, report.error
    assert report.entries == len(entries) >= before + 100
    assert entries[-1].receipt().signer_id == owner.peer_id.to_base58()  # the flood's receipts, up to the kill


def test_a_servers_points_line_shows_the_highest_and_its_own_and_counts_the_rest():
    from meadow.server.server import points_summary

    points = {f"peer{i:02d}": float(i) for i in range(15)}
    line = points_summary(points, "peer01", shown=3)
    assert line == "peer14 14, peer13 13, peer12 12, peer01 1, and 11 more"
    assert points_summary(points, "peer13", shown=3) == "peer14 14, peer13 13, peer12 12, and 12 more"
    assert points_summary({"a": 1.0}, "b") == "a 1"  # a server not yet in the book
