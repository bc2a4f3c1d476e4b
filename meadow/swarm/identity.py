"""Peer identities: the RSA key that is both a node's libp2p identity (its peer id) and the key that signs its DHT
records, so that a record's signer and the peer a client connects to are one and the same."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """A node's private key, the file p2pd reads it from, and the peer id it gives."""

    path: Path
    private_key: RSAPrivateKey
    peer_id: PeerID


def generate_identity(path: str | Path) -> Identity:
    """Write a new identity file (hivemind's format: a libp2p protobuf holding an RSA-2048 key, mode 0400)."""
    path = Path(path).expanduser()
    if path.exists():
        raise FileExistsError(f"{path} already exists: Meadow never overwrites an identity (its peer id would be lost)")
    P2P.generate_identity(str(path))
    return load_identity(path)


def load_identity(path: str | Path) -> Identity:
    """The identity in `path`, as `meadow keygen` or hivemind writes it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"identity file {path} does not exist: create one with `meadow keygen {path}`")
    try:
        key = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        if key.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError(f"a {crypto_pb2.KeyType.Name(key.key_type)} key")
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        private_key.__setstate__({"_private_key": key.data})  # hivemind's own unpickling: DER bytes -> key
    except Exception as e:
        raise ValueError(f"{path} is not an RSA identity file as `meadow keygen` writes ({e})") from None
    return Identity(path, private_key, peer_id_of(private_key.get_public_key()))


def peer_id_of(public_key: RSAPublicKey) -> PeerID:
    return peer_id_from_public_key(public_key.to_bytes())


@lru_cache(maxsize=4096)
def peer_id_from_public_key(ssh_public_key: bytes) -> PeerID:
    """libp2p's peer id of an RSA public key given in OpenSSH form (as a record's owner marker carries it): the
    sha2-256 multihash of its protobuf-wrapped DER form, as hivemind's PeerID.from_identity computes it."""
    key = serialization.load_ssh_public_key(ssh_public_key)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"expected an RSA public key, got {type(key).__name__}")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


class IdentityCheckingP2P(P2P):
    """hivemind's P2P, with a check that a kept identity is not in use that gives a reliable answer and stays on
    loopback. hivemind's own check asks the swarm for the identity's peer through a short-lived anonymous node: that
    node mapped ports by UPnP (multicast on the local network), and it asked as soon as it was up, when its routing
    table could still be empty ("failed to find any peer in table"), which it took for "nobody uses it": on a loaded
    machine 2-3 lookups in 40 went so, and a second server with the same identity joined the swarm."""

    CHECK_TIMEOUT = 10.0  # s to wait for the anonymous node to know a peer it can ask

    @classmethod
    async def is_identity_taken(cls, identity_path: str, *, initial_peers, **options) -> bool:
        peer_id = load_identity(identity_path).peer_id
        anonymous = await P2P.create(initial_peers=initial_peers, dht_mode="client", nat_port_map=False, **options)
        try:
            deadline = time.monotonic() + cls.CHECK_TIMEOUT
            while True:
                try:
                    # found and reached: another peer has this identity (P2P has no public connect; hivemind's own
                    # check calls its daemon client so too)
                    await anonymous._client.connect(peer_id, [])
                    return True
                except ControlFailure as e:
                    if "failed to find any peer in table" not in str(e):  # asked: "routing: not found"
                        return False
                    if time.monotonic() > deadline:
                        logger.warning(f"could not check that no other peer uses the identity in {identity_path}: "
                                       f"no initial peer answered a lookup within {cls.CHECK_TIMEOUT:.0f} s")
                        return False
                    await asyncio.sleep(0.1)
        finally:
            await anonymous.shutdown()
