"""Receipts and memberships: statements a client signs with its owner's identity. A receipt says "server S ran these
blocks over these tokens for my client C"; a membership says "client C belongs to me" (so that C's requests are
served with my points' priority). Both are signed by the owner's RSA key, which is also its server's identity."""

from __future__ import annotations

import time

import msgpack
from hivemind.utils.crypto import RSAPublicKey
from pydantic import Field

from meadow.swarm.identity import Identity, peer_id_from_public_key
from meadow.wire.schemas import Schema

KINDS = ("inference", "forward", "backward")
MAX_TOKENS = 2**40
MAX_PARAMS = 2**40
MAX_KEY = 2048  # an RSA-2048 key in OpenSSH form is ~380 characters, its signature ~344


class InvalidReceipt(ValueError):
    """A receipt or membership that an honest client did not sign as it stands."""


class Signed(Schema):
    """A statement and its owner's signature (base64) over every other field."""

    signer: str = Field(max_length=MAX_KEY)  # the owner's RSA public key, OpenSSH form
    signature: str = Field(default="", max_length=MAX_KEY)

    def payload(self) -> bytes:
        """What the signature covers: every field but the signature, in a canonical encoding."""
        fields = self.model_dump(mode="json", exclude={"signature"})
        return msgpack.packb([type(self).__name__, sorted(fields.items())], use_bin_type=True)

    @property
    def signer_id(self) -> str:
        """The owner's peer id (base58), derived from its key."""
        try:
            return peer_id_from_public_key(self.signer.encode()).to_base58()
        except Exception as e:
            raise InvalidReceipt(f"the signer is not an RSA public key ({e})") from None

    def signed_by(self, identity: Identity):
        """This statement, signed with `identity` (whose public key becomes the signer)."""
        signer = identity.private_key.get_public_key().to_bytes().decode()
        unsigned = self.model_copy(update={"signer": signer, "signature": ""})
        return unsigned.model_copy(update={"signature": identity.private_key.sign(unsigned.payload()).decode()})

    def check_signature(self) -> None:
        """InvalidReceipt unless the signer's key signed exactly these fields."""
        try:
            key = RSAPublicKey.from_bytes(self.signer.encode())
        except Exception as e:
            raise InvalidReceipt(f"the signer is not an RSA public key ({e})") from None
        if not key.verify(self.payload(), self.signature.encode()):
            raise InvalidReceipt(f"{type(self).__name__} signature does not match its fields (forged or altered)")


class Receipt(Signed):
    """Work a server did for a client: `tokens` (batch x length) through blocks [start, end) of the model with this
    fingerprint, whose blocks hold `params_per_block` parameters each. (signer, seq) names it: counted once."""

    server: str = Field(max_length=128)  # peer id (base58) of the server that did the work
    client: str = Field(max_length=128)  # peer id of the client connection it was done for
    fingerprint: str = Field(max_length=256)
    start: int = Field(ge=0, lt=2**16)
    end: int = Field(gt=0, le=2**16)
    tokens: int = Field(gt=0, le=MAX_TOKENS)
    params_per_block: int = Field(gt=0, le=MAX_PARAMS)
    kind: str = Field(pattern="^(" + "|".join(KINDS) + ")$")
    timestamp: float = Field(allow_inf_nan=False)
    seq: int = Field(ge=0, lt=2**63)

    @property
    def key(self) -> tuple[str, int]:
        """What makes a receipt unique: a second one with the same key is a replay or a double count."""
        return self.signer_id, self.seq

    @property
    def work(self) -> int:
        """Parameter-tokens: each token went through (end - start) x params_per_block parameters."""
        return self.tokens * (self.end - self.start) * self.params_per_block


class Membership(Signed):
    """The owner (signer) vouches that `client` is its client, until `expires` (unix time)."""

    client: str = Field(max_length=128)
    expires: float = Field(allow_inf_nan=False)


def membership_for(owner: Identity, client: str, lifetime: float = 24 * 3600.0) -> Membership:
    """A membership statement naming `client` (a peer id, base58), signed by `owner`."""
    return Membership(signer="", client=client, expires=time.time() + lifetime).signed_by(owner)


def check_membership(membership: Membership, connection: str, now: float | None = None) -> str:
    """The owner's peer id if `membership` is validly signed, names the peer on the other end of the connection
    and has not expired; InvalidReceipt otherwise."""
    membership.check_signature()
    if membership.client != connection:
        raise InvalidReceipt(f"the membership names client {membership.client}, not this connection's {connection}")
    if membership.expires < (time.time() if now is None else now):
        raise InvalidReceipt("the membership has expired")
    return membership.signer_id


def check_receipt(receipt: Receipt, server: str, connection: str | None = None) -> None:
    """InvalidReceipt unless `receipt` is validly signed, for work done by `server`, and (when a connection is given)
    for the client on its other end: a receipt copied from another connection or server is refused."""
    receipt.check_signature()
    if receipt.server != server:
        raise InvalidReceipt(f"the receipt is for server {receipt.server}, not {server}")
    if connection is not None and receipt.client != connection:
        raise InvalidReceipt(f"the receipt names client {receipt.client}, not this connection's {connection}")
    if receipt.end <= receipt.start:
        raise InvalidReceipt(f"empty block range {receipt.start}:{receipt.end}")
