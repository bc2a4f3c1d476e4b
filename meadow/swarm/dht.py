"""Starting DHT nodes with Meadow's network hygiene, and writing / reading server announcements."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from meadow.swarm.records import MODELS_KEY, ModelInfo, ServerInfo, ServerState, block_key


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    nat_port_map: bool = False,
) -> hivemind.DHT:
    """A hivemind DHT node listening on host:port only. UPnP port mapping stays off unless asked for:
    hivemind's default multicasts SSDP on the local network even when bound to 127.0.0.1."""
    return hivemind.DHT(
        initial_peers=list(initial_peers),
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        client_mode=client_mode,
        nat_port_map=nat_port_map,
        start=True,
    )


def announce(
    dht: hivemind.DHT, dht_prefix: str, info: ServerInfo, expiration: float, model: ModelInfo | None = None
) -> None:
    """Write `info` under every block key of the server's span, subkey = its peer id; and `model`, if given, in the
    swarm's list of models, subkey = dht_prefix."""
    keys = [block_key(dht_prefix, i) for i in range(info.start, info.end)]
    values, subkeys = [info.to_wire()] * len(keys), [dht.peer_id.to_base58()] * len(keys)
    if model is not None:
        keys, values, subkeys = [*keys, MODELS_KEY], [*values, model.to_wire()], [*subkeys, dht_prefix]
    dht.run_coroutine(partial(_store_many, keys=keys, values=values, subkeys=subkeys, expiration=expiration))


def fetch_models(dht: hivemind.DHT) -> dict[str, ModelInfo]:
    """Every model some server announced, by dht_prefix; malformed records are skipped."""
    entry = dht.run_coroutine(partial(_get_many, keys=[MODELS_KEY])).get(MODELS_KEY)
    models = {}
    if entry is not None and isinstance(entry.value, dict):
        for dht_prefix, record in entry.value.items():
            try:
                models[str(dht_prefix)] = ModelInfo.model_validate(record.value)
            except Exception:
                continue  # a stranger's garbage must not hide the other models
    return models


def fetch_servers(dht: hivemind.DHT, dht_prefix: str, num_blocks: int) -> list[dict[PeerID, ServerInfo]]:
    """For each block, the servers that announce it and are not offline; malformed records are skipped."""
    keys = [block_key(dht_prefix, i) for i in range(num_blocks)]
    found = dht.run_coroutine(partial(_get_many, keys=keys))
    servers: list[dict[PeerID, ServerInfo]] = []
    for key in keys:
        entry, by_peer = found.get(key), {}
        if entry is not None and isinstance(entry.value, dict):
            for subkey, record in entry.value.items():
                try:
                    info = ServerInfo.model_validate(record.value)
                    peer = PeerID.from_base58(subkey)
                except Exception:
                    continue  # a stranger's garbage must not break discovery
                if info.state != ServerState.OFFLINE:
                    by_peer[peer] = info
        servers.append(by_peer)
    return servers


# run_coroutine pickles its function into the DHT's process, so these live at module level.
async def _store_many(_dht, node, *, keys: list[str], values: list[dict], subkeys: list[str], expiration: float) -> None:
    await node.store_many(keys, values, get_dht_time() + expiration, subkeys=subkeys)


async def _get_many(_dht, node, *, keys: list[str]) -> dict:
    # every server stores its own subkey under a block's key, on the nodes it knows: by default the search stops at the
    # first node with any record, which may lack some servers. "Latest" searches on and merges what it finds.
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def serve_dht_node(host: str = "127.0.0.1", port: int = 0, initial_peers: Sequence[str] = (), nat_port_map: bool = False) -> None:
    """`meadow dht`: a bootstrap node that prints its multiaddrs once reachable and runs until SIGINT/SIGTERM."""
    import threading

    from meadow.stopping import exit_now, on_stop_signals

    started, stop = threading.Event(), threading.Event()
    # stopped while the DHT starts (it may have died, and would never report ready), or stopped twice: do not wait
    on_stop_signals(lambda: stop.set() if started.is_set() and not stop.is_set() else exit_now(1))
    dht = start_dht(initial_peers, host=host, port=port, nat_port_map=nat_port_map)
    started.set()
    try:
        for maddr in dht.get_visible_maddrs():
            print(maddr, flush=True)
        stop.wait()
    finally:
        dht.shutdown()
