"""Signed node records: what a node announces about itself on the discovery network.

Wire format (msgpack map): ``{"v": 1, "payload": bytes, "pk": bytes, "sig": bytes}`` where
``payload`` is a msgpack map of the :class:`NodeRecord` fields plus ``signed_at`` (fields with a
default, added after version 1 shipped, may be absent and take their default), ``pk`` is the
signer's libp2p-serialized public key and ``sig`` signs ``DOMAIN + payload``. In a private swarm the map
also holds ``"swarm"``: an HMAC-SHA256 of ``DOMAIN + payload`` under the swarm key, so members refuse
records (to store or to use) from anyone without the key. The exact payload
bytes are signed and verified, so no re-canonicalization is needed on the reading side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import time
from dataclasses import dataclass

import msgpack

from dsd_node.p2p.identity import Identity, peer_id_from_public_key, verify_signature

FORMAT_VERSION = 1
DOMAIN = b"dsd-node-record-v1\x00"
MAX_RECORD_BYTES = 8192
ROLES = ("stage", "drafter", "head")


class RecordError(ValueError):
    """A node record that must not be trusted: malformed, forged, expired or for another model."""


@dataclass(frozen=True)
class NodeRecord:
    """What a node serves: a block of layers [layer_start, layer_end) of a model, and where."""

    peer_id: str
    role: str
    model_id: str
    model_hash: str
    layer_start: int
    layer_end: int
    num_layers: int
    grpc_address: str
    version: str
    tokens_per_s: float
    sessions: int
    max_sessions: int
    expires_at: float
    # Added later, so optional on the wire: a record from a node that predates them decodes with these
    # defaults, and an older reader ignores them (it checks only the fields it knows).
    device: str = ""  # e.g. "cuda:0", "cpu" ("" = not announced)
    dtype: str = ""  # compute dtype, e.g. "bfloat16"
    mem_free_mb: int = 0  # memory the node measured free for its shard at start-up (0 = not announced)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    f.name: {"str": (str,), "int": (int,), "float": (float, int)}[f.type]  # type: ignore[index]
    for f in dataclasses.fields(NodeRecord)
}
# Fields a record may omit, with the value a missing one takes.
_OPTIONAL_FIELDS: dict[str, object] = {
    f.name: f.default for f in dataclasses.fields(NodeRecord) if f.default is not dataclasses.MISSING
}


def _check_fields(fields: dict[str, object]) -> NodeRecord:
    """Type- and sanity-check a field map, returning the record or raising RecordError."""
    values: dict[str, object] = {}
    for name, types in _FIELD_TYPES.items():
        if name not in fields:
            if name in _OPTIONAL_FIELDS:
                values[name] = _OPTIONAL_FIELDS[name]
                continue
            raise RecordError(f"record is missing field {name!r}")
        v = fields[name]
        if isinstance(v, bool) or not isinstance(v, types):
            raise RecordError(f"record field {name!r} has type {type(v).__name__}, expected {types[0].__name__}")
        values[name] = float(v) if types[0] is float else v  # type: ignore[arg-type]
    rec = NodeRecord(**values)  # type: ignore[arg-type]
    if rec.role not in ROLES:
        raise RecordError(f"record role {rec.role!r} is not one of {ROLES}")
    if not 0 <= rec.layer_start <= rec.layer_end <= rec.num_layers:
        raise RecordError(
            f"record layers [{rec.layer_start}, {rec.layer_end}) do not fit a {rec.num_layers}-layer model"
        )
    if rec.sessions < 0 or rec.max_sessions < 0:
        raise RecordError("record session counts must be non-negative")
    if rec.mem_free_mb < 0:
        raise RecordError("record mem_free_mb must be non-negative")
    if not (math.isfinite(rec.tokens_per_s) and rec.tokens_per_s >= 0 and math.isfinite(rec.expires_at)):
        raise RecordError("record tokens_per_s / expires_at must be finite and non-negative")
    return rec


def record_mac(swarm_key: bytes, payload: bytes) -> bytes:
    return hmac.new(swarm_key, b"dsd-swarm-record\x00" + DOMAIN + payload, hashlib.sha256).digest()


def sign_record(record: NodeRecord, identity: Identity, *, signed_at: float | None = None,
                swarm_key: bytes | None = None) -> bytes:
    """Serialize and sign ``record`` with ``identity`` (which must own ``record.peer_id``)."""
    if record.peer_id != identity.peer_id:
        raise ValueError(f"record peer_id {record.peer_id} is not the signer's peer id {identity.peer_id}")
    _check_fields(dataclasses.asdict(record))
    fields = dataclasses.asdict(record)
    fields["signed_at"] = float(time.time() if signed_at is None else signed_at)
    payload = msgpack.packb(fields, use_bin_type=True)
    sig = identity.sign(DOMAIN + payload)
    outer = {"v": FORMAT_VERSION, "payload": payload, "pk": identity.public_key_bytes, "sig": sig}
    if swarm_key is not None:
        outer["swarm"] = record_mac(swarm_key, payload)
    return msgpack.packb(outer)


def decode_signed(blob: bytes, swarm_key: bytes | None = None) -> tuple[NodeRecord, float]:
    """Check format, signature, signer (and, with ``swarm_key``, swarm membership) of ``blob``; return
    (record, signed_at). No expiry check."""
    if not isinstance(blob, bytes | bytearray) or len(blob) > MAX_RECORD_BYTES:
        raise RecordError("record is not bytes or is too large")
    try:
        outer = msgpack.unpackb(blob, raw=False)
    except Exception as exc:
        raise RecordError(f"record is not valid msgpack: {exc}") from exc
    if not isinstance(outer, dict) or outer.get("v") != FORMAT_VERSION:
        raise RecordError(f"record is not a version-{FORMAT_VERSION} record map")
    payload, pk, sig = outer.get("payload"), outer.get("pk"), outer.get("sig")
    if not (isinstance(payload, bytes) and isinstance(pk, bytes) and isinstance(sig, bytes)):
        raise RecordError("record lacks payload/pk/sig bytes")
    if not verify_signature(pk, DOMAIN + payload, sig):
        raise RecordError("record signature is invalid")
    if swarm_key is not None:
        mac = outer.get("swarm")
        if not (isinstance(mac, bytes) and hmac.compare_digest(mac, record_mac(swarm_key, payload))):
            raise RecordError("record lacks a valid proof of the swarm key (not a member of this swarm)")
    try:
        fields = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise RecordError(f"record payload is not valid msgpack: {exc}") from exc
    if not isinstance(fields, dict):
        raise RecordError("record payload is not a map")
    rec = _check_fields(fields)
    signed_at = fields.get("signed_at")
    if isinstance(signed_at, bool) or not isinstance(signed_at, float | int):
        raise RecordError("record lacks a numeric signed_at")
    try:
        signer = peer_id_from_public_key(pk)
    except ValueError as exc:
        raise RecordError(str(exc)) from exc
    if signer != rec.peer_id:
        raise RecordError(f"record for peer {rec.peer_id} is signed by another key (peer {signer})")
    return rec, float(signed_at)


def verify_record(blob: bytes, *, now: float | None = None, expected_model_hash: str | None = None,
                  swarm_key: bytes | None = None) -> NodeRecord:
    """Decode and fully check a signed record blob; raise :class:`RecordError` if it must not be used.

    Rejects garbage / wrong types / missing fields, a bad signature, a signer whose peer id is not
    ``record.peer_id``, an expired record (``expires_at <= now``) and a ``model_hash`` other than
    ``expected_model_hash`` (when given).
    """
    rec, _ = decode_signed(blob, swarm_key)
    now = time.time() if now is None else now
    if rec.expires_at <= now:
        raise RecordError(f"record from {rec.peer_id} expired {now - rec.expires_at:.1f} s ago")
    if expected_model_hash is not None and rec.model_hash != expected_model_hash:
        raise RecordError(
            f"record from {rec.peer_id} has model_hash {rec.model_hash!r}, expected {expected_model_hash!r}"
        )
    return rec
