"""Which DHT records a Meadow node accepts: every server's record is signed by it, and is a sane ServerInfo for the
block its key names (or a sane ModelInfo in the list of models). Installed on every Meadow DHT node (start_dht), so
honest nodes refuse to store a forged record and drop one a stranger's node returns; fetch_servers and fetch_models
check every record again before anything reads it.

A block record's subkey is its owner's marker, b"[owner:<RSA public key>]" (hivemind's RSASignatureValidator): only
the holder of that key can sign a value under it. The server's peer id is not written anywhere: it is derived from
that key (the key is also the server's libp2p identity, see identity.py), and libp2p checks on connect that the peer
holds it. So a forger can announce only its own peer id, never another server's, and cannot change another's record.
"""

from __future__ import annotations

import logging
import re

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID

from meadow.swarm.identity import Identity, peer_id_from_public_key
from meadow.swarm.records import LEDGERS_KEY, MODELS_KEY, LedgerHead, ModelInfo, ServerInfo, block_key

logger = logging.getLogger(__name__)
_OWNER = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class InvalidRecord(ValueError):
    """A DHT record that no honest server writes."""


def owner_subkey(identity: Identity) -> bytes:
    """The subkey under which `identity` writes its records: its owner marker, which its validator signs for."""
    return RSASignatureValidator(identity.private_key).local_public_key


def record_owner(subkey: object) -> PeerID:
    """The peer id whose key signed the record with this subkey (signatures are checked by RSASignatureValidator)."""
    match = _OWNER.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        raise InvalidRecord(f"subkey {subkey!r:.60} is not an owner marker: the record is unsigned")
    try:
        return peer_id_from_public_key(match.group(1))
    except Exception as e:
        raise InvalidRecord(f"the owner marker holds no RSA public key ({e})") from None


def check_record(block: int, num_blocks: int | None, subkey: object, value: object) -> tuple[PeerID, ServerInfo]:
    """The owner and announcement of a record under block `block`'s key, or InvalidRecord: a valid ServerInfo (known
    state, finite and bounded numbers) whose span holds `block` and ends within the model (when num_blocks is known)."""
    peer = record_owner(subkey)
    try:
        info = ServerInfo.model_validate(value)
    except Exception as e:
        raise InvalidRecord(f"not a ServerInfo: {e}") from None
    if not info.start <= block < info.end:
        raise InvalidRecord(f"a record of blocks {info.start}:{info.end} under block {block}'s key")
    if num_blocks is not None and info.end > num_blocks:
        raise InvalidRecord(f"blocks {info.start}:{info.end} of a model with {num_blocks} blocks")
    return peer, info


def check_model_record(subkey: object, value: object) -> tuple[PeerID, ModelInfo]:
    """The owner and content of a record in the list of models (MODELS_KEY), or InvalidRecord."""
    peer = record_owner(subkey)
    try:
        return peer, ModelInfo.model_validate(value)
    except Exception as e:
        raise InvalidRecord(f"not a ModelInfo: {e}") from None


def check_ledger_record(subkey: object, value: object) -> tuple[PeerID, LedgerHead]:
    """The owner and ledger head of a record under LEDGERS_KEY, or InvalidRecord."""
    peer = record_owner(subkey)
    try:
        return peer, LedgerHead.model_validate(value)
    except Exception as e:
        raise InvalidRecord(f"not a LedgerHead: {e}") from None


def _key_id(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()  # what validators see of a key: its hash


_MODELS_KEY_ID = _key_id(MODELS_KEY)
_LEDGERS_KEY_ID = _key_id(LEDGERS_KEY)


class MeadowRecordValidator(RecordValidatorBase):
    """Refuses any record in the list of models that check_model_record refuses, and any record under the block keys
    of the swarms it is told of (dht_prefix -> number of blocks) that check_record refuses. Other keys pass: a
    bootstrap node serves any swarm, and signatures are checked on every key by RSASignatureValidator, which runs
    first (and strips the signature before this one sees it)."""

    def __init__(self, swarms: dict[str, int], allowed: frozenset[PeerID] | None = None):
        self.allowed = allowed  # a private swarm's peers (allow_list.py): every record must be signed by one of them
        self._blocks: dict[bytes, tuple[int, int]] = {}  # DHT key id -> (block, number of blocks)
        for dht_prefix, num_blocks in swarms.items():
            for block in range(num_blocks):
                self._blocks[_key_id(block_key(dht_prefix, block))] = (block, num_blocks)

    def validate(self, record: DHTRecord) -> bool:
        block = self._blocks.get(record.key)
        if block is None and record.key not in (_MODELS_KEY_ID, _LEDGERS_KEY_ID) and self.allowed is None:
            return True
        try:
            if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
                raise InvalidRecord("a record without a subkey")
            subkey = DHTProtocol.serializer.loads(record.subkey)
            if self.allowed is not None and record_owner(subkey) not in self.allowed:
                raise InvalidRecord(f"signed by {record_owner(subkey)}, who is not on the allow-list")
            if block is not None:
                check_record(*block, subkey, DHTProtocol.serializer.loads(record.value))
            elif record.key == _LEDGERS_KEY_ID:
                check_ledger_record(subkey, DHTProtocol.serializer.loads(record.value))
            elif record.key == _MODELS_KEY_ID:
                check_model_record(subkey, DHTProtocol.serializer.loads(record.value))
        except Exception as e:
            where = f"block {block[0]}" if block is not None else "the list of models or ledgers, or another key"
            logger.debug(f"refused a record under {where}: {e}")
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, MeadowRecordValidator):
            return False
        self._blocks.update(other._blocks)
        return True


def meadow_validators(
    identity: Identity, swarms: dict[str, int], allowed: frozenset[PeerID] | None = None
) -> list[RecordValidatorBase]:
    """What every Meadow DHT node runs: signatures of owned records (signing its own with `identity`'s key), the list
    of models, and the block records of `swarms` checked in full; in a private swarm, only records that `allowed`
    peers signed."""
    return [RSASignatureValidator(identity.private_key), MeadowRecordValidator(swarms, allowed)]
