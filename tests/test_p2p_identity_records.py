"""Identity persistence and signed node records."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from dsd_node.p2p.identity import (
    Identity,
    IdentityError,
    load_or_create_identity,
    peer_id_from_public_key,
    verify_signature,
)
from dsd_node.p2p.records import DOMAIN, NodeRecord, RecordError, sign_record, verify_record

ROOT = Path(__file__).resolve().parent.parent


def make_record(ident: Identity, **kw: object) -> NodeRecord:
    fields: dict[str, object] = dict(
        peer_id=ident.peer_id, role="stage", model_id="org/model", model_hash="abc123", layer_start=0,
        layer_end=4, num_layers=12, grpc_address="127.0.0.1:50051", version="0.1.0", tokens_per_s=12.5,
        sessions=1, max_sessions=8, expires_at=time.time() + 60,
    )  # fmt: skip
    fields.update(kw)
    return NodeRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.slow
def test_identity_persists_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "identity.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.peer_id.startswith("12D3KooW")  # Ed25519 peer ids
    again = load_or_create_identity(path)
    assert again.peer_id == first.peer_id
    # a fresh interpreter ("restart") sees the same peer id
    code = "import sys; from dsd_node.p2p.identity import load_or_create_identity as f; print(f(sys.argv[1]).peer_id)"
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == first.peer_id


def test_identity_loose_permissions_fixed_and_corrupt_refused(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    ident = load_or_create_identity(path)
    os.chmod(path, 0o644)
    assert load_or_create_identity(path).peer_id == ident.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"definitely not a key")
    with pytest.raises(IdentityError, match="corrupt"):
        load_or_create_identity(bad)
    assert bad.read_bytes() == b"definitely not a key"  # never overwritten


def test_sign_verify_helpers() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify_signature(ident.public_key_bytes, b"hello", sig)
    assert not verify_signature(ident.public_key_bytes, b"hellO", sig)
    assert not verify_signature(b"junk", b"hello", sig)
    assert peer_id_from_public_key(ident.public_key_bytes) == ident.peer_id


def test_record_roundtrip() -> None:
    ident = Identity.generate()
    rec = make_record(ident)
    assert verify_record(sign_record(rec, ident), expected_model_hash="abc123") == rec


def test_forged_record_rejected() -> None:
    owner, attacker = Identity.generate(), Identity.generate()
    rec = make_record(owner)
    with pytest.raises(ValueError):  # the API refuses to sign for another peer id
        sign_record(rec, attacker)
    # hand-rolled forgery: attacker's valid signature over a record claiming the owner's peer id
    payload = msgpack.packb({**dataclasses.asdict(rec), "signed_at": time.time()})
    blob = msgpack.packb(
        {"v": 1, "payload": payload, "pk": attacker.public_key_bytes, "sig": attacker.sign(DOMAIN + payload)}
    )
    with pytest.raises(RecordError, match="signed by another key"):
        verify_record(blob)
    # tampered payload under the owner's key: bad signature
    good = msgpack.unpackb(sign_record(rec, owner))
    good["payload"] = good["payload"].replace(b"127.0.0.1:50051", b"6.6.6.6:50051")
    with pytest.raises(RecordError, match="signature"):
        verify_record(msgpack.packb(good))


def test_expired_and_wrong_hash_rejected() -> None:
    ident = Identity.generate()
    blob = sign_record(make_record(ident, expires_at=time.time() - 1), ident)
    with pytest.raises(RecordError, match="expired"):
        verify_record(blob)
    blob = sign_record(make_record(ident, expires_at=1000.0), ident)
    assert verify_record(blob, now=999.0).expires_at == 1000.0
    with pytest.raises(RecordError, match="model_hash"):
        verify_record(sign_record(make_record(ident), ident), expected_model_hash="other")


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00\x01garbage",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1, "payload": "str", "pk": b"", "sig": b""}),
        msgpack.packb({"v": 2}),
        b"x" * 100_000,
    ],
)
def test_garbage_rejected(blob: bytes) -> None:
    with pytest.raises(RecordError):
        verify_record(blob)


def test_wrong_types_and_missing_fields_rejected() -> None:
    ident = Identity.generate()

    def forge(fields: dict[str, object]) -> bytes:
        payload = msgpack.packb(fields)
        return msgpack.packb(
            {"v": 1, "payload": payload, "pk": ident.public_key_bytes, "sig": ident.sign(DOMAIN + payload)}
        )

    base = {**dataclasses.asdict(make_record(ident)), "signed_at": time.time()}
    with pytest.raises(RecordError, match="missing field 'grpc_address'"):
        verify_record(forge({k: v for k, v in base.items() if k != "grpc_address"}))
    with pytest.raises(RecordError, match="'layer_start' has type str"):
        verify_record(forge({**base, "layer_start": "0"}))
    with pytest.raises(RecordError, match="role"):
        verify_record(forge({**base, "role": "king"}))
    with pytest.raises(RecordError, match="layers"):
        verify_record(forge({**base, "layer_end": 99}))
    assert verify_record(forge({**base, "tokens_per_s": 7})).tokens_per_s == 7.0  # int is fine for a float
