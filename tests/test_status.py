"""`meadow status` and the swarm's list of models: servers announce their model, and a person sees every model's
coverage and every server's row from the terminal."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from meadow.local_swarm import LocalSwarm
from meadow.swarm import fetch_models, start_dht


@pytest.fixture(scope="module")
def two_models(checkpoints):
    """One model fully served (blocks 0:4), and the same checkpoint under another swarm name with blocks 0:2 only."""
    path = checkpoints("llama", num_layers=4)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        servers = [
            swarm.start_server(path, "--blocks", "0:4", "--public-name", "meadow-lark", wait=False),
            swarm.start_server(path, "--blocks", "0:2", "--dht-prefix", "half-served", wait=False),
        ]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        yield swarm
        for server in servers:  # all at once: each takes a moment to leave
            server.popen.send_signal(signal.SIGTERM)


def peer_ids(swarm) -> list[str]:
    return [next(line for line in server.lines if "ready" in line).split(" as ")[1].split(",")[0] for server in swarm.servers]


def test_servers_list_their_model_in_the_dht(two_models):
    dht = start_dht(two_models.initial_peers, client_mode=True)
    try:
        models = fetch_models(dht)
    finally:
        dht.shutdown()
    assert {prefix: (model.name, model.num_blocks) for prefix, model in models.items()} == {
        "tiny-llama": ("tiny-llama", 4),
        "half-served": ("tiny-llama", 4),
    }


def test_status_prints_coverage_and_a_row_per_server(two_models):
    result = subprocess.run(
        [sys.executable, "-m", "meadow", "status", "--initial-peers", *two_models.initial_peers],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    sections = {block.split("swarm name ")[1].split(")")[0]: block for block in out.split("\n\n") if "swarm name" in block}
    assert "4/4 blocks online" in sections["tiny-llama"] and "████" in sections["tiny-llama"]
    assert "2/4 blocks online" in sections["half-served"] and "██··" in sections["half-served"]

    full, half = peer_ids(two_models)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("…")}
    assert rows["…" + full[-6:]][1:3] == ["0:4", "online"] and rows["…" + full[-6:]][-1] == "meadow-lark"
    assert rows["…" + half[-6:]][1:3] == ["0:2", "online"] and rows["…" + half[-6:]][-1] == "-"
    assert "…" + full[-6:] in sections["tiny-llama"] and "…" + half[-6:] in sections["half-served"]
    for row in rows.values():  # throughput, and the whole KV cache free
        assert row[3:7] == [row[3], "tokens/s", "16384", "tokens"] and float(row[3]) > 0
