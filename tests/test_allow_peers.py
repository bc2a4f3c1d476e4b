"""A private swarm (`--allow-peers FILE`) serves and answers its own peers only: an allowed client generates the
reference tokens; an outsider's client, server and DHT node are told they are not allowed in this swarm; a record an
outsider signed is not stored. Real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from functools import partial

import hivemind
import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from meadow import AutoDistributedModelForCausalLM
from meadow.client.config import ClientConfig
from meadow.local_swarm import LocalSwarm, Process
from meadow.models import load_reference_model
from meadow.swarm import ServerState, block_key, dht_prefix_for, generate_identity, start_dht
from meadow.swarm.allow_list import NotAllowed, load_allow_list
from meadow.wire import RPC_FORWARD, RPC_INFO, ForwardRequest, Reply, pack, unpack

NUM_BLOCKS = 4
REFUSED = "not allowed in this swarm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def private(checkpoints, tmp_path_factory):
    """A DHT node and two servers (0:2, 2:4), each with its own identity and the same allow-list, which also names
    one client; plus an outsider's identity, on no list."""
    path = checkpoints("llama", num_layers=NUM_BLOCKS)
    keys = tmp_path_factory.mktemp("keys")
    ids = {name: generate_identity(keys / f"{name}.key").peer_id for name in ("dht", "server0", "server1", "client", "outsider")}
    allow = keys / "allow.txt"
    allow.write_text("# the labs of this swarm\n" + "".join(f"{ids[n]}  # {n}\n" for n in ("dht", "server0", "server1", "client")))
    private = ("--allow-peers", str(allow))
    swarm = LocalSwarm()
    try:
        swarm.dht = Process(["dht", "--identity", str(keys / "dht.key"), *private], "dht")
        swarm.initial_peers = [swarm.dht.wait_for(lambda line: line.startswith("/ip4/"), 60).strip()]
        ports = [free_port(), free_port()]
        servers = [swarm.start_server(path, "--blocks", span, "--identity", str(keys / f"server{i}.key"), *private,
                                      "--port", str(port), "--throughput", "1000", wait=False)
                   for i, (span, port) in enumerate(zip(["0:2", "2:4"], ports))]  # fmt: skip
        for server in servers:
            server.wait_for(lambda line: "ready" in line, timeout=180)
        server_addrs = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{ids[f'server{i}']}" for i, port in enumerate(ports)]
        yield swarm, path, keys, allow, ids, server_addrs
    finally:
        swarm.stop()


def test_allow_list_file_is_read_with_comments_and_checked(tmp_path, private):
    _, _, _, allow, ids, _ = private
    assert load_allow_list(allow) == {ids[n] for n in ("dht", "server0", "server1", "client")}
    (tmp_path / "bad.txt").write_text(f"{ids['client']}\nnot-a-peer-id\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: 'not-a-peer-id' is not a peer id"):
        load_allow_list(tmp_path / "bad.txt")


def test_allowed_client_generates_the_reference_tokens(private):
    swarm, path, keys, allow, ids, _ = private
    config = ClientConfig(identity=str(keys / "client.key"), allow_peers=str(allow))
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, client_config=config)
    try:
        local, input_ids = load_reference_model(path), torch.tensor([[1, 5, 9, 2, 7]])
        with torch.no_grad():
            assert (model(input_ids).logits - local(input_ids).logits).abs().max().item() <= 1e-4
        assert {hop.peer for hop in model.sequence.last_hops} == {ids["server0"], ids["server1"]}
        expected = local.generate(input_ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(model.generate(input_ids, max_new_tokens=8, do_sample=False), expected)
    finally:
        model.sequence.close()


def test_outsider_client_is_told_it_is_not_allowed(private):
    swarm, path, keys, allow, _, _ = private
    config = ClientConfig(identity=str(keys / "outsider.key"), allow_peers=str(allow))  # whatever list it holds itself
    with pytest.raises(NotAllowed, match=REFUSED):
        AutoDistributedModelForCausalLM.from_pretrained(str(path), swarm.initial_peers, client_config=config)
    generate = Process(["generate", str(path), "--initial-peers", *swarm.initial_peers, "--prompt", "hi"], "outsider")
    generate.popen.wait(120)
    refused = any("meadow generate: error: " in line and REFUSED in line for line in generate.lines)
    assert generate.popen.returncode == 1 and refused
    assert not any("Traceback" in line for line in generate.lines)


def test_outsider_server_and_dht_node_are_refused(private):
    swarm, path, keys, _, _, _ = private
    server = swarm.start_server(path, "--blocks", "0:4", "--identity", str(keys / "outsider.key"), wait=False)
    server.popen.wait(180)
    assert server.popen.returncode == 1 and any(REFUSED in line for line in server.lines), "\n".join(server.lines)

    with pytest.raises(NotAllowed, match=REFUSED):
        start_dht(swarm.initial_peers, identity=keys / "outsider.key")
    with pytest.raises(RuntimeError, match="none of the initial_peers responded"):  # a plain hivemind node too
        hivemind.DHT(initial_peers=swarm.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, start=True)


def test_servers_refuse_an_outsiders_rpcs(private):
    _, _, keys, _, ids, server_addrs = private

    async def call_server() -> tuple[str, Reply]:
        p2p = await P2P.create(initial_peers=server_addrs[:1], identity_path=str(keys / "outsider.key"),
                               host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False)  # fmt: skip
        try:
            with pytest.raises(Exception) as info_error:
                await p2p.call_protobuf_handler(ids["server0"], RPC_INFO, runtime_pb2.ExpertUID(), runtime_pb2.ExpertInfo)
            request = ForwardRequest(blocks=dict(start=0, end=1)).to_wire()
            hidden = [torch.zeros(1, 2, 64), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)]

            async def messages():
                for message in pack(hidden, request, runtime_pb2.ExpertRequest):
                    yield message

            replies = await p2p.iterate_protobuf_handler(ids["server0"], RPC_FORWARD, messages(), runtime_pb2.ExpertResponse)
            tensors, meta = await unpack(replies, 1 << 20)
            return str(info_error.value), Reply.from_wire(meta)
        finally:
            await p2p.shutdown()

    info_error, forward_reply = asyncio.run(call_server())
    assert REFUSED in info_error
    assert forward_reply.error_kind == "NotAllowed" and f"peer {ids['outsider']} is {REFUSED}" in forward_reply.error


def test_records_an_outsider_signed_are_not_stored(private):
    swarm, path, keys, allow, ids, _ = private
    key = block_key(dht_prefix_for(path), 0)
    info = dict(state=int(ServerState.ONLINE), start=0, end=2)
    expiration = get_dht_time() + 600
    insider = start_dht(swarm.initial_peers, identity=keys / "client.key", allow_peers=allow)  # an allowed node relays
    try:
        outsider = _signed(RSASignatureValidator(RSAPrivateKey()), key, info, expiration)
        own = _signed(RSASignatureValidator(_private_key_of(keys / "client.key")), key, info, expiration)
        for (subkey, value), accepted in ((outsider, False), (own, True)):  # the same record, signed by each
            store = partial(_store_raw, peer=ids["dht"], key=key, subkey=subkey, value=value, expiration=expiration)
            assert insider.run_coroutine(store) == [accepted]
        held = insider.run_coroutine(partial(_held_subkeys, peer=ids["dht"], key=key))
        assert own[0] in held and outsider[0] not in held
    finally:
        insider.shutdown()


def _private_key_of(path) -> RSAPrivateKey:
    from meadow.swarm import load_identity

    return load_identity(path).private_key


def _signed(validator: RSASignatureValidator, key: str, value: dict, expiration: float) -> tuple[bytes, bytes]:
    """(subkey, value) of a record signed as `validator`'s owner signs it: the owner marker and the signed bytes."""
    subkey = validator.local_public_key
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration)
    return subkey, validator.sign_value(record)


# run_coroutine pickles its function into the DHT's process, so these live at module level.
async def _store_raw(_dht, node, *, peer: PeerID, key: str, subkey: bytes, value: bytes, expiration: float):
    """Ask `peer` to store a record as is (a node's store() would sign it with its own key, or not at all)."""
    stored = await node.protocol.call_store(peer, [DHTID.generate(source=key)], [value], [expiration], subkeys=[subkey])
    return None if stored is None else list(stored)  # a protobuf field does not pickle back to the caller


async def _held_subkeys(_dht, node, *, peer: PeerID, key: str) -> set:
    key_id = DHTID.generate(source=key)
    entry = (await node.protocol.call_find(peer, [key_id]))[key_id][0]
    return set() if entry is None else {subkey for subkey, _ in entry.value.items()}
