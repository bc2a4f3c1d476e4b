"""No peer can change what another peer announced, nor pass garbage off as an announcement; identities persist; clients
route only to servers of their own checkpoint. Real processes on 127.0.0.1; the attacker runs plain hivemind nodes."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from functools import partial

import hivemind
import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from conftest import assert_on_loopback_with_upnp_off, p2p_daemons, peer_of
from meadow import AutoDistributedModelForCausalLM
from meadow.cli import main
from meadow.client.config import ClientConfig
from meadow.client.routing import MissingBlocksError
from meadow.local_swarm import LocalSwarm, Process
from meadow.models import load_reference_model, resolve_model_path
from meadow.models.tiny import make_tiny_checkpoint, make_tiny_gguf
from meadow.models.fingerprint import checkpoint_fingerprint
from meadow.swarm import (
    ModelInfo, ServerState, block_key, dht_prefix_for, fetch_models, fetch_servers, generate_identity, load_identity,
    start_dht,
)  # fmt: skip
from meadow.swarm.records import MODELS_KEY

NUM_BLOCKS = 4
HOUR = 3600.0


def keygen(path) -> str:
    """`meadow keygen PATH` as a person runs it; the peer id it prints."""
    result = subprocess.run([sys.executable, "-m", "meadow", "keygen", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return re.search(r"peer id (\w+)", result.stdout).group(1)


@pytest.fixture(scope="module")
def swarm(checkpoints, tmp_path_factory):
    """Checkpoint A served by two servers with kept identities (0:2, 2:4); checkpoint B, another model in a folder of
    the same name (so the same swarm name), served whole by a third server that routing would prefer (one hop)."""
    path_a = checkpoints("llama", num_layers=NUM_BLOCKS)
    path_b = make_tiny_checkpoint(tmp_path_factory.mktemp("other") / path_a.name, num_layers=NUM_BLOCKS, seed=1)
    keys = tmp_path_factory.mktemp("keys")
    ids = [generate_identity(keys / f"server{i}.key").peer_id.to_base58() for i in range(2)]  # what keygen runs
    swarm = LocalSwarm()
    try:
        swarm.start_dht()
        fixed = ("--throughput", "1000")  # nothing to measure; equal announced speeds
        servers = [swarm.start_server(path_a, "--blocks", span, "--identity", str(keys / f"server{i}.key"), *fixed,
                                      wait=False) for i, span in enumerate(["0:2", "2:4"])]  # fmt: skip
        servers.append(swarm.start_server(path_b, "--blocks", "0:4", *fixed, wait=False))
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        yield swarm, path_a, path_b, ids, keys
    finally:
        swarm.stop()


def test_keygen_file_gives_the_same_peer_id_at_every_start(swarm, tmp_path, capsys):
    local_swarm, _, _, ids, keys = swarm
    assert [peer_of(server) for server in local_swarm.servers[:2]] == ids  # `serve --identity` took the identity
    assert load_identity(keys / "server0.key").peer_id.to_base58() == ids[0]

    path = tmp_path / "dht.key"
    peer = keygen(path)
    with pytest.raises(SystemExit, match="already exists"):  # a key is never overwritten
        main(["keygen", str(path)])
    with pytest.raises(SystemExit) as refused:
        main(["dht", "--identity", str(tmp_path / "nope.key")])
    assert refused.value.code == 2 and "meadow keygen" in capsys.readouterr().err
    # server0's identity, in use: refused in one line, no traceback (a process of its own: one that joined the swarm
    # as a second server0 would stay, and confuse the other tests' lookups)
    taken = Process(["dht", "--identity", str(keys / "server0.key"), "--initial-peers", *local_swarm.initial_peers],
                    "dht-with-taken-identity")  # fmt: skip
    daemons = set()  # its p2pd processes, the short-lived one that looks for the identity's peer included
    try:
        deadline = time.monotonic() + 60
        while taken.popen.poll() is None and time.monotonic() < deadline:
            daemons |= {tuple(daemon) for daemon in p2p_daemons({taken.popen.pid})}
            time.sleep(0.01)
        refused = taken.wait_for(lambda line: "error:" in line, timeout=1)
        assert taken.popen.wait(15) == 1
    finally:
        taken.stop()
    assert refused == (f"meadow dht: error: could not start the p2p daemon: Identity from `{keys / 'server0.key'}` is "
                       "already taken by another peer")  # fmt: skip
    assert not any("Traceback" in line for line in taken.lines), "\n".join(taken.lines)
    assert daemons
    for daemon in daemons:
        assert_on_loopback_with_upnp_off(list(daemon))
    seen = []
    for _ in range(2):  # a restart keeps the peer id
        node = Process(["dht", "--identity", str(path)], "dht-with-identity")
        try:
            seen.append(node.wait_for(lambda line: line.startswith("/ip4/"), timeout=60).rsplit("/p2p/", 1)[1])
        finally:
            node.stop()
    assert seen == [peer, peer]


# run_coroutine pickles its function into the DHT's process, so these live at module level.
async def _plant(_dht, node, *, key: str, subkey, value, expiration: float) -> None:
    """What a stranger's own node answers is up to it: put a record straight into its storage."""
    node.protocol.storage.store_subkey(DHTID.generate(source=key), subkey, MSGPackSerializer.dumps(value), expiration)


async def _raw_records(_dht, node, *, peer: PeerID | None, keys: list[str]) -> dict[str, dict]:
    """What a node (None: this one) holds under `keys`, as it answers (this node validates nothing): subkey -> value
    bytes."""
    ids = [DHTID.generate(source=key) for key in keys]
    if peer is None:
        entries = [node.protocol.storage.get(key_id) for key_id in ids]
    else:
        found = await node.protocol.call_find(peer, ids)
        entries = [found[key_id][0] for key_id in ids]
    return {key: {} if entry is None else {subkey: item.value for subkey, item in entry.value.items()}
            for key, entry in zip(keys, entries)}  # fmt: skip


def _value(signed: bytes) -> dict:
    return MSGPackSerializer.loads(re.sub(rb"\[signature:.+?\]", b"", signed))


def test_forged_records_are_refused_and_clients_still_generate(swarm):
    local_swarm, path_a, _, ids, _ = swarm
    prefix, keys = dht_prefix_for(path_a), [block_key(dht_prefix_for(path_a), i) for i in range(NUM_BLOCKS)]
    options = dict(initial_peers=local_swarm.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False)
    stranger_key = RSAPrivateKey()
    plain = hivemind.DHT(start=True, **options)  # validates and signs nothing
    signer = hivemind.DHT(start=True, record_validators=[RSASignatureValidator(stranger_key)], **options)
    try:
        honest = {key: signer.get(key, latest=True).value for key in keys}  # subkey -> the server's record
        fingerprint = next(iter(honest[keys[0]].values())).value["fingerprint"]
        online = dict(state=int(ServerState.ONLINE), start=0, end=NUM_BLOCKS, fingerprint=fingerprint)
        expiration = get_dht_time() + HOUR
        forged = []  # (node, key, subkey, value)
        mine = RSASignatureValidator(stranger_key).local_public_key
        for block, key in enumerate(keys):
            for subkey, record in honest[key].items():
                forged.append((plain, key, subkey, {**record.value, "state": int(ServerState.OFFLINE)}))
                forged.append((plain, key, subkey, "garbage"))
            other = next(s for k in keys for s in honest[k] if s not in honest[key])  # another server's subkey
            forged.append((plain, key, other, {**online, "inference_rps": 1e6}))
            forged.append((plain, key, plain.peer_id.to_base58(), {**online, "end": 80, "inference_rps": 1e6}))
            # signed with the stranger's own key: a valid signature, but no honest server announces these
            forged.append((signer, key, mine, {**online, "end": 80}))
            forged.append((signer, key, mine, {**online, "inference_rps": math.inf}))
            forged.append((signer, key, mine, {**online, "state": 7}))
            forged.append((signer, key, mine, {**online, "start": block + 1, "end": block + 2}))
        # the list of models: every server's entry rewritten, an unowned entry, and a lie signed by the stranger
        lie = {"dht_prefix": prefix, "num_blocks": 80, "name": "forged"}
        forged += [(plain, MODELS_KEY, subkey, lie) for subkey in signer.get(MODELS_KEY, latest=True).value]
        forged += [(plain, MODELS_KEY, prefix, lie), (signer, MODELS_KEY, mine, lie)]
        for i, (node, key, subkey, value) in enumerate(forged):
            # expirations differ: hivemind's storage compares the subkeys of records that expire at the same moment
            node.store(key, value, expiration + i, subkey=subkey)
            if node is plain:  # and the stranger's own node answers with them
                plain.run_coroutine(partial(_plant, key=key, subkey=subkey, value=value, expiration=expiration + i))

        # the servers, which know the swarm, hold each server's own record only, as it wrote it
        kept = 0
        for server in local_swarm.servers:
            held = plain.run_coroutine(partial(_raw_records, peer=PeerID.from_base58(peer_of(server)), keys=keys))
            for key in keys:
                assert set(held[key]) <= set(honest[key]), (key, server.name)
                assert all(_value(value) == honest[key][subkey].value for subkey, value in held[key].items())
                kept += len(held[key])
        assert kept >= sum(len(records) for records in honest.values())
        # the bootstrap node, which serves any swarm, refused every change to an honest server's record as well
        bootstrap = PeerID.from_base58(local_swarm.initial_peers[0].rsplit("/p2p/", 1)[1])
        held = plain.run_coroutine(partial(_raw_records, peer=bootstrap, keys=keys))
        intact = [_value(held[key][subkey]) == honest[key][subkey].value for key in keys for subkey in honest[key]
                  if subkey in held[key]]  # fmt: skip
        assert intact and all(intact)
        # ... while the stranger's own node answers with its forgeries
        own = plain.run_coroutine(partial(_raw_records, peer=None, keys=keys))
        assert all(_value(own[key][subkey]) != honest[key][subkey].value for key in keys for subkey in honest[key])

        # a client sees exactly the honest announcements: its DHT node drops the rest as it reads...
        client = start_dht(local_swarm.initial_peers, client_mode=True, swarms={prefix: NUM_BLOCKS})
        # ...and a node told of no swarm checks only signatures, so fetch_servers drops the rest
        unaware = start_dht(local_swarm.initial_peers, client_mode=True)
        try:
            assert {key: set(client.get(key, latest=True).value) for key in keys} == {k: set(honest[k]) for k in keys}
            views = [fetch_servers(client, prefix, NUM_BLOCKS), fetch_servers(unaware, prefix, NUM_BLOCKS)]
            listed = [fetch_models(client), fetch_models(unaware)]
        finally:
            client.shutdown()
            unaware.shutdown()
        a0, a1, b = (PeerID.from_base58(peer_of(server)) for server in local_swarm.servers)
        for per_block in views:
            assert [set(servers) for servers in per_block] == [{a0, b}, {a0, b}, {a1, b}, {a1, b}]
            assert all(info.state == ServerState.ONLINE and info.end <= NUM_BLOCKS
                       and info.inference_rps == 1000 * (info.end - info.start)  # --throughput 1000, not forged
                       for servers in per_block for info in servers.values())  # fmt: skip
        assert listed == [{prefix: ModelInfo(dht_prefix=prefix, num_blocks=NUM_BLOCKS, name=path_a.name)}] * 2

        # and computes what the model computes locally, through A's servers only (B's would take one hop, not two)
        assert_serves_like_local(path_a, local_swarm.initial_peers, {a0, a1})

    finally:
        plain.shutdown()
        signer.shutdown()


def assert_serves_like_local(path, initial_peers: list[str], servers: set[PeerID], **kwargs) -> PeerID:
    """Logits within 1e-4 and greedy tokens equal to transformers' run of `path`, through `servers` only. Returns the
    client's peer id."""
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers, **kwargs)
    try:
        local, input_ids = load_reference_model(path), torch.tensor([[1, 5, 9, 2, 7]])
        with torch.no_grad():
            assert (model(input_ids).logits - local(input_ids).logits).abs().max().item() <= 1e-4
        assert {hop.peer for hop in model.sequence.last_hops} <= servers
        expected = local.generate(input_ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(model.generate(input_ids, max_new_tokens=8, do_sample=False), expected)
        return model.sequence.p2p.peer_id
    finally:
        model.sequence.close()


def test_servers_of_another_checkpoint_under_the_same_name_are_ignored(swarm, tmp_path):
    local_swarm, path_a, path_b, _, _ = swarm
    assert dht_prefix_for(path_a) == dht_prefix_for(path_b)  # the same swarm name...
    b = PeerID.from_base58(peer_of(local_swarm.servers[2]))
    identity = generate_identity(tmp_path / "client.key")  # clients may keep a peer id too
    config = ClientConfig(identity=str(identity.path))
    client = assert_serves_like_local(path_b, local_swarm.initial_peers, {b}, client_config=config)  # B's server only
    assert client == identity.peer_id

    path_c = make_tiny_checkpoint(tmp_path / path_a.name, num_layers=NUM_BLOCKS, seed=2)  # nobody serves this one
    config = ClientConfig(wait_for_servers=0.5)
    model = AutoDistributedModelForCausalLM.from_pretrained(path_c, local_swarm.initial_peers, client_config=config)
    try:
        message = r"3 servers announce blocks 0:4 of this swarm but serve a different checkpoint \(fingerprint "
        with pytest.raises(MissingBlocksError, match=message):
            model.generate(torch.tensor([[1, 2]]), max_new_tokens=1)
    finally:
        model.sequence.close()


def test_fingerprint_names_the_weights_not_the_files(checkpoints, tmp_path):
    path = checkpoints("llama", num_layers=NUM_BLOCKS)
    sharded = make_tiny_checkpoint(tmp_path / "sharded", num_layers=NUM_BLOCKS, max_shard_size="20KB")
    other = make_tiny_checkpoint(tmp_path / "other", num_layers=NUM_BLOCKS, seed=1)
    as_gguf = make_tiny_gguf(path, tmp_path / "tiny.gguf")
    fingerprints = [checkpoint_fingerprint(resolve_model_path(p)) for p in (path, sharded, other, as_gguf)]
    assert fingerprints[0] == fingerprints[1]  # the same weights, split otherwise
    assert len(set(fingerprints[1:])) == 3  # other weights of the same shapes; the same weights as another file
