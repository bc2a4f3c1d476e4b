"""What the swarm looks like: every announced model, its block coverage and its servers. JSON for /api/swarm and the
monitor page, a text table for `meadow status`."""

from __future__ import annotations

import threading
import time

from hivemind.p2p import PeerID

from meadow.swarm import ServerInfo, ServerState, fetch_models, fetch_servers

COVERAGE_MARKS = {"online": "█", "joining": "▒", "missing": "·"}


def read_swarm(dht) -> dict:
    """{"models": [{dht_prefix, name, num_blocks, coverage: [state per block], block_servers: [count per block],
    servers: [...]}]}, models by swarm name."""
    models = []
    for dht_prefix, model in sorted(fetch_models(dht).items()):
        per_block = fetch_servers(dht, dht_prefix, model.num_blocks)
        servers: dict[PeerID, ServerInfo] = {peer: info for block in per_block for peer, info in block.items()}
        models.append({
            "dht_prefix": dht_prefix,
            "name": model.name,
            "num_blocks": model.num_blocks,
            "coverage": [block_state(block.values()) for block in per_block],
            "block_servers": [len(block) for block in per_block],
            "servers": [_server(peer, info) for peer, info in sorted(servers.items(), key=lambda item: (item[1].start, item[1].end))],
        })  # fmt: skip
    return {"models": models}


POINTS_MAX_AGE = 30.0  # seconds a verification of every ledger is reused: fetching them all is not for every poll


class PointsView:
    """Verified points per server (meadow/points/book.py) for /api/points, refreshed at most every POINTS_MAX_AGE
    seconds, and the points of this API's own owner (its client's points identity), if it has one."""

    def __init__(self, sequence):
        from meadow.points.book import PointsBook

        self.sequence, self.book, self.read_at = sequence, PointsBook(), float("-inf")
        payer = getattr(sequence, "payer", None)
        self.me = payer.owner.peer_id.to_base58() if payer is not None else None
        self.lock = threading.Lock()

    def read(self) -> dict:
        """{"unit", "servers": {peer: {points, entries, tokens, valid, error}}, "me": {peer, points} or None}."""
        from meadow.client.event_loop import run
        from meadow.points.standing import PARAMETER_TOKENS_PER_POINT

        with self.lock:
            if time.monotonic() - self.read_at > POINTS_MAX_AGE:
                self.sequence.revive_network()  # a dead DHT process would never answer
                run(self.book.refresh(self.sequence.dht, self.sequence.p2p))
                self.read_at = time.monotonic()
            servers = {
                peer: {"points": self.book.points.get(peer, 0.0), "entries": report.entries, "tokens": report.tokens,
                       "valid": report.valid, "error": report.error}
                for peer, report in self.book.reports.items()
            }  # fmt: skip
            me = None if self.me is None else {"peer": self.me, "points": self.book.points.get(self.me, 0.0)}
        return {"unit": f"1 point = {PARAMETER_TOKENS_PER_POINT:.0e} parameter-tokens", "servers": servers, "me": me}


def block_state(servers) -> str:
    """The best state among a block's servers: online, joining, or missing (nobody)."""
    states = {info.state for info in servers}
    return "online" if ServerState.ONLINE in states else "joining" if ServerState.JOINING in states else "missing"


def _server(peer: PeerID, info: ServerInfo) -> dict:
    return {
        "peer": peer.to_base58(),
        "blocks": f"{info.start}:{info.end}",
        "state": info.state.name.lower(),
        "throughput": info.throughput,
        "cache_tokens_left": info.cache_tokens_left,
        "version": info.version,
        "public_name": info.public_name,
        "adapters": list(info.adapters),
    }


def format_swarm(view: dict) -> str:
    """`meadow status`: per model a coverage bar, then a row per server."""
    if not view["models"]:
        return "No models announced in this swarm yet (servers announce themselves when they start)."
    lines = []
    for model in view["models"]:
        coverage = model["coverage"]
        served = sum(state == "online" for state in coverage)
        bar = "".join(COVERAGE_MARKS[state] for state in coverage)
        lines += [f"{model['name']} (swarm name {model['dht_prefix']}): {served}/{model['num_blocks']} blocks online", f"  {bar}"]
        rows = [("peer", "blocks", "state", "throughput", "cache left", "version", "name")]
        rows += [
            (
                short_peer(s["peer"]), s["blocks"], s["state"], f"{s['throughput']:.0f} tokens/s",
                f"{s['cache_tokens_left']} tokens", str(s["version"]), s["public_name"] or "-",
            )
            for s in model["servers"]
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.append("")
    lines.append("  ".join(f"{mark} {state}" for state, mark in COVERAGE_MARKS.items()))
    return "\n".join(lines)


def short_peer(peer: str) -> str:
    """The end of a peer id: every libp2p ed25519 id starts with the same 12D3KooW."""
    return "…" + peer[-6:]


def print_swarm(initial_peers: list[str], identity: str | None = None, allow_peers: str | None = None) -> None:
    """`meadow status`: join the DHT as a client (as `identity`, in a private swarm), print the table, leave."""
    from meadow.swarm import start_dht

    dht = start_dht(initial_peers, client_mode=True, identity=identity, allow_peers=allow_peers)
    try:
        print(format_swarm(read_swarm(dht)), flush=True)
    finally:
        dht.shutdown()
