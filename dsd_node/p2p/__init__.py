"""libp2p identity, signed node records and DHT-based discovery."""

from dsd_node.p2p.identity import (
    Identity,
    IdentityError,
    load_or_create_identity,
    peer_id_from_public_key,
    verify_signature,
)
from dsd_node.p2p.records import NodeRecord, RecordError, sign_record, verify_record

__all__ = [
    "Identity",
    "IdentityError",
    "NodeRecord",
    "RecordError",
    "load_or_create_identity",
    "peer_id_from_public_key",
    "sign_record",
    "verify_record",
    "verify_signature",
]
