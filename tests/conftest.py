"""Shared fixtures: tiny random checkpoints and real swarms (a DHT node and servers as processes on 127.0.0.1)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

import meadow  # noqa: F401  first, as a user's program imports it: its start-up changes come before hivemind loads
from hivemind.p2p import PeerID  # noqa: E402

from meadow.client.routing import UNREACHABLE_RTT
from meadow.local_swarm import LocalSwarm, Process

# the suite starts hundreds of `meadow` processes: forked from a zygote that has imported torch, hivemind and
# transformers once, each saves those 2-3 CPU seconds (`meadow.warm_start`); what they run is the same
Process.forked = True

# the speed a server announces when routing must take other servers of its blocks first: a step through its span
# costs 120 s, more than a server whose ping failed (UNREACHABLE_RTT), so neither a slow first ping on a loaded
# machine nor a failed one sends the client to it first (with 1 s announced, one clean-clone run of test_verify did)
SLOW = ("--throughput", str(1 / (2 * UNREACHABLE_RTT)))


def peer_of(server: Process) -> str | None:
    """The peer ID in a server's ready line (None before it): its later lines name other peers too (its points)."""
    found = re.search(r"Server ready: .* as (\w+),", "\n".join(list(server.lines)))
    return found and found.group(1)


def server_with_peer(servers: Sequence[Process], peer: PeerID) -> Process:
    return next(server for server in servers if peer_of(server) == peer.to_base58())


def p2p_daemons(groups: set[int]) -> list[list[str]]:
    """The command lines of the p2pd processes running now in these process groups."""
    daemons = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            group = os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
        if group in groups and args and args[0].endswith(b"p2pd"):
            daemons.append([arg.decode() for arg in args if arg])
    return daemons


def assert_on_loopback_with_upnp_off(daemon: list[str]) -> None:
    assert "-natPortMap=0" in daemon, daemon
    listen = [arg for arg in daemon if arg.startswith("-hostAddrs=")]
    assert listen and all("/ip4/127.0.0.1/" in addr for addr in listen[0].split("=", 1)[1].split(",")), daemon


def start_swarm(model, spans: list[str], *extra: str, options: dict[str, Sequence[str]] = {}) -> LocalSwarm:
    """A DHT node and one server per span ("START:END"), started in parallel, all ready on return. Every server gets
    `extra` arguments, and those of a span in `options` its own too."""
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        servers = [
            swarm.start_server(model, "--blocks", span, *extra, *options.get(span, []), wait=False) for span in spans
        ]
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
    except BaseException:
        swarm.stop()
        raise
    return swarm


@pytest.fixture(scope="session", autouse=True)
def meadow_home(tmp_path_factory):
    """A fresh MEADOW_HOME for the test run (servers cache their measured speed there), never the user's."""
    home, before = tmp_path_factory.mktemp("meadow-home"), os.environ.get("MEADOW_HOME")
    os.environ["MEADOW_HOME"] = str(home)  # servers are child processes: they inherit it
    yield home
    if before is None:
        os.environ.pop("MEADOW_HOME", None)
    else:
        os.environ["MEADOW_HOME"] = before


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random checkpoints per family, made once per test run."""
    from meadow.models.tiny import make_tiny_checkpoint

    made = {}

    def get(family: str, **kwargs):
        key = (family, repr(sorted(kwargs.items())))  # values may be lists and dicts
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}") / f"tiny-{family}"
            made[key] = make_tiny_checkpoint(path, family, **kwargs)
        return made[key]

    return get
