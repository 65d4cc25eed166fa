"""Persistent libp2p identity: an Ed25519 key pair kept in a 0600 file.

The file holds the libp2p protobuf serialization of the private key (the same
format go-libp2p / kubo use), so the peer id is stable across restarts.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey
from libp2p.crypto.serialization import deserialize_private_key, deserialize_public_key
from libp2p.peer.id import ID

log = logging.getLogger(__name__)


class IdentityError(ValueError):
    """The identity file exists but cannot be used (unreadable, corrupt, wrong key type)."""


@dataclass(frozen=True)
class Identity:
    """A node's libp2p key pair and the peer id derived from its public key."""

    key_pair: KeyPair
    peer_id: str

    @classmethod
    def from_private_key(cls, key: PrivateKey) -> Identity:
        """Wrap a libp2p private key."""
        pub = key.get_public_key()
        return cls(KeyPair(key, pub), ID.from_pubkey(pub).to_base58())

    @classmethod
    def generate(cls) -> Identity:
        """A fresh, unsaved Ed25519 identity (tests, throwaway peers)."""
        return cls.from_private_key(Ed25519PrivateKey.new())

    @property
    def public_key_bytes(self) -> bytes:
        """The libp2p protobuf serialization of the public key."""
        return self.key_pair.public_key.serialize()

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the private key."""
        return self.key_pair.private_key.sign(data)


def _decode_private_key(raw: bytes, path: Path) -> PrivateKey:
    try:
        key = deserialize_private_key(raw)
    except Exception as exc:
        raise IdentityError(f"identity file {path} is corrupt (not a libp2p private key): {exc}") from exc
    if key.get_type() != KeyType.Ed25519:
        raise IdentityError(f"identity file {path} holds a {key.get_type().name} key, expected Ed25519")
    return key


def load_or_create_identity(path: Path | str) -> Identity:
    """Load the Ed25519 identity at ``path``, creating it (mode 0600, parents too) if absent.

    A file with permissions looser than 0600 is tightened to 0600 with a warning.
    Raises :class:`IdentityError` if the file exists but is unreadable or corrupt; it is
    never overwritten, since that would silently change the node's peer id.
    """
    path = Path(path)
    if path.exists():
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                log.warning("identity file %s has mode %o; tightening to 0600", path, mode)
                os.chmod(path, 0o600)
            raw = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"identity file {path} is unreadable: {exc}") from exc
        return Identity.from_private_key(_decode_private_key(raw, path))

    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.new()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.serialize())
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # in case the umask or filesystem widened it
    ident = Identity.from_private_key(key)
    log.info("created identity %s at %s", ident.peer_id, path)
    return ident


def verify_signature(public_key_bytes: bytes, data: bytes, sig: bytes) -> bool:
    """True if ``sig`` is a valid signature of ``data`` by the serialized libp2p public key."""
    try:
        return bool(deserialize_public_key(public_key_bytes).verify(data, sig))
    except Exception:
        return False


def peer_id_from_public_key(public_key_bytes: bytes) -> str:
    """The base58 peer id of a serialized libp2p public key (ValueError if it is not one)."""
    try:
        return ID.from_pubkey(deserialize_public_key(public_key_bytes)).to_base58()
    except Exception as exc:
        raise ValueError(f"not a libp2p public key: {exc}") from exc
