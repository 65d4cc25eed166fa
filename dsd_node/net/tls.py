"""Authenticated node-to-node links: TLS whose certificates are bound to the nodes' libp2p Ed25519 identities.

grpc's TLS (BoringSSL) refuses Ed25519 certificates (NO_COMMON_SIGNATURE_ALGORITHMS), so each node makes a
fresh ECDSA P-256 TLS key at start-up and a self-signed certificate for it that carries, in an extension
(the OID libp2p's TLS handshake uses), the node's libp2p public key and its Ed25519 signature over the
certificate's SubjectPublicKeyInfo. Whoever holds the certificate's key is therefore the peer id the
extension names; with a swarm key the extension also carries an HMAC over the same bytes, so only members
can make a certificate other members accept.

Calling side: the caller reads the peer's certificate (a TLS handshake of its own), checks the binding
(and the peer id it expected from discovery, the swarm HMAC, the allowlist), then opens the gRPC channel
with exactly that certificate as its only root: the channel talks to that key or to no one.

Called side: grpc's Python server cannot accept self-signed client certificates it does not know in
advance, so callers authenticate in call metadata instead (``dsd-peer``): their libp2p key, an expiry and
an Ed25519 signature over the SHA-256 of the server's own certificate (channel binding: the token is
useless against any other server, and only travels inside the TLS session the caller pinned), plus the
swarm HMAC. :class:`AccessPolicy`, a server interceptor, checks it (and the client API key on Generate)
before any handler runs; services ask it who the caller is.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from dsd_node.p2p.identity import Identity

log = logging.getLogger("dsd.tls")

EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")  # libp2p's TLS handshake extension
CERT_DOMAIN = b"dsd-tls-cert-v1\x00"
TOKEN_DOMAIN = b"dsd-peer-token-v1\x00"
SWARM_DOMAIN = b"dsd-swarm-v1\x00"
SERVER_NAME = "dsd-node"  # every node's certificate names this host: the pinned certificate is what counts
PEER_METADATA = "dsd-peer"
API_KEY_METADATA = "dsd-api-key"
TOKEN_TTL_S = 600.0
OPEN_METHODS = ("/grpc.health.v1.Health/", "/dsd.v1.Node/Info")  # anyone may ask
CLIENT_METHODS = ("/dsd.v1.Gateway/Generate",)  # clients (API key when the gateway has one)


class TlsIdentityError(ConnectionError):
    """A peer whose TLS certificate does not prove the identity it must have (or that is not a member)."""


class AuthError(Exception):
    """A call refused by the access policy, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def read_swarm_key(path: str | Path) -> bytes:
    """The shared secret of a private swarm: a file of at least 32 bytes (e.g. `head -c 32 /dev/urandom | xxd -p`)."""
    try:
        raw = Path(path).expanduser().read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read swarm key {path}: {e}") from e
    if len(raw) < 32:
        raise ValueError(f"swarm key {path} is too short ({len(raw)} bytes; at least 32)")
    return hashlib.sha256(b"dsd-swarm-key\x00" + raw).digest()


def read_allow_peers(path: str | Path) -> frozenset[str]:
    """An allowlist of peer ids, one a line (# comments and blank lines ignored)."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read allowlist {path}: {e}") from e
    ids = frozenset(s for line in lines if (s := line.split("#", 1)[0].strip()))
    if not ids:
        raise ValueError(f"allowlist {path} names no peer id")
    return ids


def swarm_mac(swarm_key: bytes, data: bytes) -> bytes:
    return hmac.new(swarm_key, SWARM_DOMAIN + data, hashlib.sha256).digest()


@dataclass(frozen=True)
class Membership:
    """Who may take part: anyone (open swarm), holders of the swarm key, and/or the peers of an allowlist."""

    swarm_key: bytes | None = None
    allow: frozenset[str] | None = None

    @property
    def private(self) -> bool:
        return self.swarm_key is not None or self.allow is not None

    def check_peer(self, peer_id: str) -> None:
        if self.allow is not None and peer_id not in self.allow:
            raise TlsIdentityError(f"peer {peer_id} is not on the allowlist")

    def describe(self) -> str:
        parts = (["swarm key"] if self.swarm_key else []) + ([f"allowlist of {len(self.allow)}"] if self.allow else [])
        return "private swarm (" + ", ".join(parts) + ")" if parts else "open swarm (any peer may join)"


@dataclass
class NodeTls:
    """This node's TLS key and identity-bound certificate, and the membership rules it applies."""

    identity: Identity
    membership: Membership = field(default_factory=Membership)
    key_pem: bytes = b""
    cert_pem: bytes = b""
    cert_sha256: bytes = b""

    @classmethod
    def create(cls, identity: Identity, membership: Membership | None = None) -> NodeTls:
        membership = membership or Membership()
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ext = {"pk": identity.public_key_bytes, "sig": identity.sign(CERT_DOMAIN + spki)}
        if membership.swarm_key:
            ext["swarm"] = swarm_mac(membership.swarm_key, CERT_DOMAIN + spki)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
                .add_extension(x509.UnrecognizedExtension(EXTENSION_OID, msgpack.packb(ext)), critical=False)
                .sign(key, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(identity, membership,
                   key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
                   cert.public_bytes(serialization.Encoding.PEM), hashlib.sha256(der).digest())

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])

    def token(self, server_cert_sha256: bytes, now: float | None = None) -> str:
        """The call-metadata proof of this node's identity for one server (see the module doc)."""
        expires = int((time.time() if now is None else now) + TOKEN_TTL_S)
        body = TOKEN_DOMAIN + server_cert_sha256 + expires.to_bytes(8, "big")
        tok = {"pk": self.identity.public_key_bytes, "exp": expires, "sig": self.identity.sign(body)}
        if self.membership.swarm_key:
            tok["swarm"] = swarm_mac(self.membership.swarm_key, body)
        return base64.b64encode(msgpack.packb(tok)).decode()


def peer_of_certificate(der: bytes, membership: Membership) -> str:
    """The peer id a certificate proves (binding signature, swarm HMAC, allowlist); TlsIdentityError if none."""
    from dsd_node.p2p.identity import peer_id_from_public_key, verify_signature  # lazy: libp2p is slow to import

    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ext = msgpack.unpackb(cert.extensions.get_extension_for_oid(EXTENSION_OID).value.value)
        pk, sig = ext["pk"], ext["sig"]
    except Exception as e:
        raise TlsIdentityError(f"TLS certificate carries no dsd identity ({type(e).__name__}: {e})") from None
    if not (isinstance(pk, bytes) and isinstance(sig, bytes) and verify_signature(pk, CERT_DOMAIN + spki, sig)):
        raise TlsIdentityError("TLS certificate's identity signature is invalid (forged identity)")
    try:
        peer = peer_id_from_public_key(pk)
    except ValueError as e:
        raise TlsIdentityError(str(e)) from None
    if membership.swarm_key is not None:
        mac = ext.get("swarm")
        if not (isinstance(mac, bytes) and hmac.compare_digest(mac, swarm_mac(membership.swarm_key, CERT_DOMAIN + spki))):
            raise TlsIdentityError(f"peer {peer} is not a member of this swarm (no proof of the swarm key)")
    membership.check_peer(peer)
    return peer


def fetch_certificate(address: str, timeout: float = 3.0) -> bytes:
    """The DER certificate the TLS server at HOST:PORT presents (unverified: the caller checks it).
    OSError when nothing answers there, ssl.SSLError when it does not speak TLS."""
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock, \
            ctx.wrap_socket(sock, server_hostname=SERVER_NAME) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"{address} presented no certificate")
    return der


class _TokenPlugin(grpc.AuthMetadataPlugin):
    """Adds this node's identity token for one server to every call on a channel."""

    def __init__(self, tls: NodeTls, server_cert_sha256: bytes):
        self.tls, self.fp = tls, server_cert_sha256
        self._tok, self._until = "", 0.0

    def __call__(self, context, callback):
        now = time.time()
        if now > self._until:
            self._tok, self._until = self.tls.token(self.fp, now), now + TOKEN_TTL_S / 2
        callback(((PEER_METADATA, self._tok),), None)


def pinned_credentials(der: bytes, tls: NodeTls | None) -> grpc.ChannelCredentials:
    """Channel credentials that trust exactly this certificate (and, as a node, prove our identity)."""
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    creds = grpc.ssl_channel_credentials(root_certificates=pem)
    if tls is None:
        return creds
    return grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(
        _TokenPlugin(tls, hashlib.sha256(der).digest()), name="dsd-peer"))


def channel_options(base: list) -> list:
    return [*base, ("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.default_authority", SERVER_NAME)]


async def pinned_channel(address: str, tls: NodeTls | None, membership: Membership, options: list,
                         expect_peer: str | None = None, timeout: float = 3.0) -> tuple[grpc.aio.Channel, str]:
    """Read, check and pin the certificate at `address`: (channel, the peer id it proved)."""
    der = await asyncio.to_thread(fetch_certificate, address, timeout)
    peer = peer_of_certificate(der, membership)
    if expect_peer and peer != expect_peer:
        raise TlsIdentityError(f"{address} proved peer id {peer}, not {expect_peer} (forged or stale identity)")
    return grpc.aio.secure_channel(address, pinned_credentials(der, tls), options=channel_options(options)), peer


class AccessPolicy(grpc.aio.ServerInterceptor):
    """Who may call what: health and Info are open, Generate needs the API key (when set), everything else
    (Forward, Verdicts, Draft, EndSession) a node identity proven in call metadata (when TLS is on), a member
    of the swarm and, with an allowlist, a listed peer. Refusals: UNAUTHENTICATED / PERMISSION_DENIED."""

    def __init__(self, tls: NodeTls | None, api_key: str | None):
        self.tls, self.api_key = tls, api_key or None
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (peer id, expiry)

    def peer_of(self, metadata) -> str:
        """The peer id a call's metadata proves; AuthError if it proves none (or a non-member)."""
        from dsd_node.p2p.identity import peer_id_from_public_key, verify_signature

        assert self.tls is not None
        tok = next((v for k, v in metadata or () if k == PEER_METADATA), None)
        if not tok:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "node-to-node call without a peer identity "
                            "(dsd-peer metadata): only dsd nodes may call this")
        now = time.time()
        hit = self._verified.get(tok)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            t = msgpack.unpackb(base64.b64decode(tok, validate=True))
            pk, exp, sig = t["pk"], int(t["exp"]), t["sig"]
        except Exception:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "malformed peer identity token") from None
        if not now < exp <= now + 2 * TOKEN_TTL_S:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "peer identity token expired or too long-lived")
        body = TOKEN_DOMAIN + self.tls.cert_sha256 + exp.to_bytes(8, "big")
        if not (isinstance(pk, bytes) and isinstance(sig, bytes) and verify_signature(pk, body, sig)):
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "peer identity token has a bad signature "
                            "(forged, or made for another node's certificate)")
        peer = peer_id_from_public_key(pk)
        m = self.tls.membership
        if m.swarm_key is not None:
            mac = t.get("swarm")
            if not (isinstance(mac, bytes) and hmac.compare_digest(mac, swarm_mac(m.swarm_key, body))):
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"peer {peer} is not a member of this swarm "
                                "(no proof of the swarm key)")
        if m.allow is not None and peer not in m.allow:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"peer {peer} is not on this node's allowlist")
        if len(self._verified) > 4096:
            self._verified = {k: v for k, v in self._verified.items() if v[1] > now}
        self._verified[tok] = (peer, float(exp))
        return peer

    def caller(self, context) -> str | None:
        """The authenticated peer id of a call that passed the policy (None when links are --insecure)."""
        return None if self.tls is None else self.peer_of(context.invocation_metadata())

    def check(self, method: str, metadata) -> None:
        if method.startswith(OPEN_METHODS):
            return
        if method in CLIENT_METHODS:
            if self.api_key is not None:
                got = next((v for k, v in metadata or () if k == API_KEY_METADATA), "")
                if not hmac.compare_digest(str(got).encode(), self.api_key.encode()):
                    raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "this gateway needs an API key: "
                                    "pass --api-key or set DSD_API_KEY" if not got else "wrong API key")
            return
        if self.tls is not None:
            self.peer_of(metadata)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        try:
            self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        except AuthError as e:
            log.warning("refused %s: %s %s", handler_call_details.method, e.code.name, e.details)
            return _refusal(handler, e)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, e: AuthError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with `e`'s status."""

    async def unary(request, context):
        await context.abort(e.code, e.details)

    async def streaming(request, context):
        await context.abort(e.code, e.details)
        yield  # pragma: no cover (makes this an async generator)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


def is_loopback(host: str) -> bool:
    return host.strip("[]") in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
