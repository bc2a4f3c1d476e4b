"""Peer identities: the RSA key that is both a node's libp2p identity (its peer id) and the key that signs its DHT
records, so that a record's signer and the peer a client connects to are one and the same."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey


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
