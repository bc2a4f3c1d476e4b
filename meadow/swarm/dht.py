"""Starting DHT nodes with Meadow's network hygiene, and writing / reading server announcements."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import hivemind
import psutil
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.utils import get_dht_time

from meadow.listening import check_port_free
from meadow.swarm.allow_list import AllowListDHT, NotAllowed, load_allow_list, refused_reason
from meadow.swarm.identity import IdentityCheckingP2P, generate_identity, load_identity
from meadow.swarm.records import LEDGERS_KEY, MODELS_KEY, LedgerHead, ModelInfo, ServerInfo, ServerState, block_key
from meadow.swarm.validation import (
    InvalidRecord, check_ledger_record, check_model_record, check_record, meadow_validators, owner_subkey,
)  # fmt: skip
from meadow.wire import MeadowError

logger = logging.getLogger(__name__)


def start_shared_memory() -> None:
    """Start this process's torch_shm_manager, if it needs one and has none yet, with SIGINT and SIGTERM held back
    meanwhile. It needs one only with HIVEMIND_MEMORY_SHARING_STRATEGY=file_system (hivemind's default, not Meadow's:
    startup.py): hivemind shares one byte per DHT call's future through torch's memory sharing, whose first use with
    named files starts that manager and reads its address from a pipe; a signal with a handler (Python's own Ctrl-C
    handler counts) that interrupts the read makes torch retry the same failed result forever: a process spinning at
    full CPU that only SIGKILL ends. Held back, the signal is handled as soon as the manager is up."""
    from hivemind.utils.mpfuture import SharedBytes

    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        SharedBytes.next()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


READY_TIMEOUT = 60.0  # a DHT joins in seconds (p2pd is given 15 s to start); one not ready by then is stuck


class JoinFailed(MeadowError):
    """The DHT node could not join the swarm: none of the initial peers answered, or p2pd refused to start (its
    identity in use by another peer, say)."""


class DHTProcessDied(MeadowError):
    """A command's DHT process ended under it (killed, out of memory): nobody can find the command in the swarm."""


def check_dht_alive(dht: hivemind.DHT) -> None:
    """Raise DHTProcessDied if `dht`'s process has ended: a server or node that lived on without it would be unseen,
    its calls into the DHT failing or never returning."""
    if not dht.is_alive():
        raise DHTProcessDied(f"the DHT process ended (exit code {dht.exitcode}): nobody can find this process in the "
                             "swarm any more, so it stops")  # fmt: skip


async def call_dht(fn: Callable, *args):
    """`fn(*args)`, a blocking call into a DHT process, awaited from an event loop, in a daemon thread of its own. A
    DHT process that hangs (stopped, stuck) never answers, and the thread left waiting must not keep its process from
    exiting: asyncio.run joins its executor's threads at the end, and so does a normal exit."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def call() -> None:
        if future.set_running_or_notify_cancel():  # not cancelled before it began
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    threading.Thread(target=call, name=f"meadow-dht-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await asyncio.wrap_future(future)  # which drops a reply that comes after a cancel or the loop's end


def shut_down_dht(dht: hivemind.DHT) -> None:
    """Ask the DHT process to leave. One that does not (stopped, or stuck) is killed: hivemind then only sends it a
    SIGTERM, which a stopped process never acts on, and our exit would wait for it forever (multiprocessing joins
    its children)."""
    dht.shutdown()
    if dht.is_alive():
        dht.kill()
        dht.join(5)


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    nat_port_map: bool = False,
    identity: str | Path | None = None,
    swarms: Mapping[str, int] = {},
    allow_peers: str | Path | None = None,
    while_joining: Callable[[], None] | None = None,
) -> hivemind.DHT:
    """A hivemind DHT node listening on host:port only. UPnP port mapping stays off unless asked for:
    hivemind's default multicasts SSDP on the local network even when bound to 127.0.0.1.

    Its peer id and the key that signs its records come from the `identity` file (`meadow keygen`), or from a fresh
    random key. It refuses unsigned or forged records, and checks the list of models and the block records of
    `swarms` (dht_prefix -> number of blocks) in full (swarm/validation.py).

    With `allow_peers` (a file of peer ids, allow_list.py) it is a node of a private swarm: it answers, keeps and
    reads only the listed peers (and itself). A node that a private swarm's nodes refuse gets NotAllowed.

    `while_joining` runs here while the DHT's own process (already forked, so none of its threads are copied there)
    starts p2pd and joins the swarm: a server loads its blocks meanwhile. If it raises, the DHT is shut down."""
    check_port_free(host, port)  # p2pd would share a port in use (SO_REUSEPORT) instead of failing
    start_shared_memory()
    allowed = None
    with tempfile.TemporaryDirectory(prefix="meadow-identity-") as folder:
        # p2pd reads its key from a file at start; a fresh one's file is gone once it has (the key stays in memory)
        key = load_identity(identity) if identity is not None else generate_identity(Path(folder) / "identity.key")
        if allow_peers is not None:
            allowed = load_allow_list(allow_peers) | {key.peer_id}
        kind, extra = (hivemind.DHT, {}) if allowed is None else (AllowListDHT, {"allowed": allowed})
        if client_mode:
            kind = type(f"Client{kind.__name__}", (ClientProcess, kind), {})
        if identity is not None:
            kind = type(f"IdentityChecked{kind.__name__}", (IdentityChecked, kind), {})
        with _objects_frozen():  # while the DHT's process is forked (start=True)
            dht = kind(
                initial_peers=list(initial_peers),
                host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                client_mode=client_mode,
                nat_port_map=nat_port_map,
                identity_path=str(key.path),
                # a kept identity is checked not to be in use by another peer (the same server started twice), by
                # IdentityChecked; a fresh one cannot be
                check_if_identity_free=identity is not None,
                record_validators=meadow_validators(key, dict(swarms), allowed),
                start=True,
                await_ready=False,
                **extra,
            )
        try:
            if while_joining is not None:
                while_joining()
        except BaseException:
            dht.shutdown()
            raise
        try:
            _wait_until_ready(dht)  # inside the folder: p2pd may not have read a fresh identity's key before
        except (RuntimeError, P2PDaemonError) as e:  # "none of the initial_peers responded" (hivemind's DHT), or
            # "failed to connect to bootstrap peers" (p2pd, which reached none): say why, if they refused us, and what
            # to check if not
            asked = initial_peers and isinstance(e, RuntimeError)
            reason = refused_reason(list(initial_peers), key.path) if asked else None
            if reason is not None:
                raise NotAllowed(reason) from None
            if initial_peers and "bootstrap" in str(e):
                raise JoinFailed(
                    f"none of the initial peers answered ({' '.join(initial_peers)}): is a DHT node (`meadow dht`) "
                    "or a server of the swarm running there, at that address and with that peer id?"
                ) from e
            if isinstance(e, P2PDaemonError):  # its own words say why (an identity another peer uses, say)
                raise JoinFailed(f"could not start the p2p daemon: {e}") from e
            raise
    if dht.peer_id != key.peer_id:  # readers derive a server's peer id from its signing key: they must agree
        dht.shutdown()
        raise RuntimeError(f"p2pd took peer id {dht.peer_id}, not {key.peer_id} of its identity file")
    dht.owner_subkey = owner_subkey(key)  # announce writes under it; the DHT process signs with the key it was given
    dht.allowed = allowed  # fetch_servers reads only these peers' records (None: anyone's)
    return dht


@contextmanager
def _objects_frozen() -> Iterator[None]:
    """Every object of ours frozen (gc.freeze, as Python's docs advise before a fork) while hivemind forks the DHT's
    process: the child inherits our garbage too, and collecting it there ran its finalizers in a process that
    does not own it. An abandoned inference session's close, run by the DHT process's first collection, waited forever
    for servers it could not reach there, so that DHT was never ready. Unfrozen, our objects wait here for the next
    full collection."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _wait_until_ready(dht: hivemind.DHT) -> None:
    """hivemind waits for its DHT process to be ready without a timeout: one that never is (the hang above) is killed
    after READY_TIMEOUT, and the user told."""
    try:
        dht.wait_until_ready(READY_TIMEOUT)
    except TimeoutError:
        _kill_process_tree(dht.pid)
        raise JoinFailed(
            f"the DHT process was not ready within {READY_TIMEOUT:.0f} s: is this machine overloaded, or does its "
            "network drop packets to the initial peers?"
        ) from None


def _kill_process_tree(pid: int) -> None:
    """SIGKILL a process and its children (a stuck DHT and its p2pd): a stopped process does not act on SIGTERM."""
    try:
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), root]:
            process.kill()
    except psutil.Error:  # it ended meanwhile
        pass


class IdentityChecked:
    """A DHT whose process checks that its kept identity is not in use with Meadow's check (IdentityCheckingP2P).
    hivemind's DHTNode creates its P2P inside the DHT's own (forked) process, so that process swaps in the subclass;
    the parent process is untouched."""

    def run(self) -> None:
        hivemind.dht.node.P2P = IdentityCheckingP2P
        super().run()


class ClientProcess:
    """A client's DHT process (and so its p2pd) in a process group of its own, which ends when the client does.

    A terminal sends Ctrl-C to its whole foreground process group: `meadow chat` takes a Ctrl-C to stop a reply, but
    p2pd takes it as a reason to quit (not always: it depends on how it was spawned), which left the chat without a
    network. Out of the group, they no longer get it; a group kill no longer reaches them either, so the process
    watches its parent, as hivemind's does not (a client killed alone used to leave both behind)."""

    def run(self) -> None:
        os.setpgid(0, 0)
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
        super().run()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)  # p2pd sees its parent gone and quits too


def announce(
    dht: hivemind.DHT, dht_prefix: str, info: ServerInfo, expiration: float, model: ModelInfo | None = None
) -> None:
    """Write `info` under every block key of the server's span and `model`, if given, in the swarm's list of models;
    subkey = the server's owner marker: the DHT signs the records with its key, and readers derive its peer id from
    that key."""
    keys = [block_key(dht_prefix, i) for i in range(info.start, info.end)]
    values = [info.to_wire()] * len(keys)
    if model is not None:
        keys, values = [*keys, MODELS_KEY], [*values, model.to_wire()]
    subkeys = [dht.owner_subkey] * len(keys)
    dht.run_coroutine(partial(_store_many, keys=keys, values=values, subkeys=subkeys, expiration=expiration))


def fetch_models(dht: hivemind.DHT) -> dict[str, ModelInfo]:
    """Every model some server announced, by dht_prefix; invalid records are skipped. Each server lists its own model,
    so that no peer can change another's entry; where servers of one swarm name disagree, most of them win."""
    entry = dht.run_coroutine(partial(_get_many, keys=[MODELS_KEY])).get(MODELS_KEY)
    votes: dict[str, Counter] = defaultdict(Counter)
    if entry is not None and isinstance(entry.value, dict):
        for subkey, record in entry.value.items():
            try:
                _, model = check_model_record(subkey, record.value)
            except InvalidRecord as e:
                logger.debug(f"skipped a record in the list of models: {e}")
                continue
            votes[model.dht_prefix][model] += 1
    return {dht_prefix: counts.most_common(1)[0][0] for dht_prefix, counts in votes.items()}


def announce_ledger(dht: hivemind.DHT, head: LedgerHead, expiration: float) -> None:
    """Write the server's ledger head under LEDGERS_KEY (signed, as its other records)."""
    dht.run_coroutine(partial(
        _store_many, keys=[LEDGERS_KEY], values=[head.to_wire()], subkeys=[dht.owner_subkey], expiration=expiration
    ))  # fmt: skip


def fetch_ledgers(dht: hivemind.DHT) -> dict[PeerID, LedgerHead]:
    """Every server's announced ledger head, by peer id; invalid records are skipped."""
    entry = dht.run_coroutine(partial(_get_many, keys=[LEDGERS_KEY])).get(LEDGERS_KEY)
    heads = {}
    if entry is not None and isinstance(entry.value, dict):
        for subkey, record in entry.value.items():
            try:
                peer, head = check_ledger_record(subkey, record.value)
            except InvalidRecord as e:
                logger.debug(f"skipped a record in the list of ledgers: {e}")
                continue
            heads[peer] = head
    return heads


def fetch_servers(dht: hivemind.DHT, dht_prefix: str, num_blocks: int) -> list[dict[PeerID, ServerInfo]]:
    """For each block, the servers that announce it and are not offline. The DHT node dropped records with a bad
    signature; a record that is not a sane ServerInfo of that block (check_record) is skipped here too, for a stranger's
    node may answer anything, and DHT nodes check only the swarms they were told of."""
    return fetch_announcements(dht, dht_prefix, num_blocks)[0]


def fetch_announcements(
    dht: hivemind.DHT, dht_prefix: str, num_blocks: int
) -> tuple[list[dict[PeerID, ServerInfo]], dict[PeerID, float]]:
    """What fetch_servers returns, and when each server's latest record expires (DHT time): later with each of its
    announcements, so a server whose expiration has not moved since some moment has not announced since."""
    keys = [block_key(dht_prefix, i) for i in range(num_blocks)]
    found = dht.run_coroutine(partial(_get_many, keys=keys))
    servers: list[dict[PeerID, ServerInfo]] = []
    expirations: dict[PeerID, float] = {}
    for block, key in enumerate(keys):
        entry, by_peer = found.get(key), {}
        if entry is not None and isinstance(entry.value, dict):
            for subkey, record in entry.value.items():
                try:
                    peer, info = check_record(block, num_blocks, subkey, record.value)
                except InvalidRecord as e:
                    logger.debug(f"skipped a record under block {block}: {e}")
                    continue
                if info.state != ServerState.OFFLINE and (getattr(dht, "allowed", None) is None or peer in dht.allowed):
                    by_peer[peer] = info
                    expirations[peer] = max(expirations.get(peer, 0.0), record.expiration_time)
        servers.append(by_peer)
    return servers, expirations


# run_coroutine pickles its function into the DHT's process, so these live at module level.
async def _store_many(_dht, node, *, keys: list[str], values: list, subkeys: list[bytes], expiration: float) -> None:
    await node.store_many(keys, values, get_dht_time() + expiration, subkeys=subkeys)


async def _get_many(_dht, node, *, keys: list[str]) -> dict:
    # every server stores its own subkey under a block's key, on the nodes it knows: by default the search stops at the
    # first node with any record, which may lack some servers. "Latest" searches on and merges what it finds.
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def serve_dht_node(
    host: str = "127.0.0.1",
    port: int = 0,
    initial_peers: Sequence[str] = (),
    nat_port_map: bool = False,
    identity: str | Path | None = None,
    allow_peers: str | Path | None = None,
) -> None:
    """`meadow dht`: a bootstrap node that prints its multiaddrs once reachable and runs until SIGINT/SIGTERM."""
    import time

    from meadow.stopping import exit_now, on_stop_signals

    started, stop = [], []  # flags, not Events: a signal handler must not wait on a lock the main thread may hold
    # stopped while the DHT starts (it may have died, and would never report ready): do not wait
    on_stop_signals(lambda: stop.append(True) if started else exit_now(1))
    dht = start_dht(initial_peers, host=host, port=port, nat_port_map=nat_port_map, identity=identity, allow_peers=allow_peers)
    started.append(True)
    try:
        maddrs = dht.get_visible_maddrs()
        for maddr in maddrs:
            print(maddr, flush=True)
        print(f"Others join with --initial-peers {maddrs[0]}, or after export MEADOW_INITIAL_PEERS={maddrs[0]}",
              file=sys.stderr, flush=True)  # fmt: skip
        while not stop:
            check_dht_alive(dht)
            time.sleep(0.2)
    finally:
        shut_down_dht(dht)
