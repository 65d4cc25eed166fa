"""gRPC plumbing shared by every service and client: channel options, the channel pool, the server
factory, the health wait and the Info call."""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsd_node.engine.config import ErrorCode
from dsd_node.net.tls import Membership, NodeTls, TlsIdentityError, pinned_channel
from dsd_node.net.wire import NodeInfo, WireError, node_info_from_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.grpc")

# Keepalive: while a call is open, ping the peer every 2 s and give up on the connection when a ping is not
# answered within 2 s: a hung (e.g. SIGSTOPped) peer fails its streams in about 4 s, not at the round timeout.
# Servers accept pings that often (make_server); max_pings_without_data 0: keep pinging an idle stream.
KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS = 2_000, 2_000
GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.max_pings_without_data", 0)]


def rpc_error_text(e: grpc.aio.AioRpcError) -> str:
    return f"{e.code().name}: {e.details()}"


def error_code(status: grpc.StatusCode) -> ErrorCode:
    """The engine's code for a gRPC status (anything unexpected counts as the peer being unavailable)."""
    return ErrorCode.__members__.get(status.name, ErrorCode.UNAVAILABLE)


class Channels:
    """One gRPC channel per peer address, shared by all sessions.

    With `tls` (a node's NodeTls, or an ephemeral one for a tool) every channel is TLS pinned to the
    certificate the peer presented, after that certificate proved the peer id (the one expected, when the
    caller names it) and swarm membership; calls carry this node's identity token. Without: plain text
    (--insecure). `get` raises TlsIdentityError for a peer that fails the check, OSError for one that
    does not answer."""

    def __init__(self, tls: NodeTls | None = None, membership: Membership | None = None,
                 plaintext_fallback: bool = False):
        """plaintext_fallback (tools such as `dsd route`): a node that does not speak TLS is reached in plain text."""
        self.tls, self.plaintext_fallback = tls, plaintext_fallback
        self.membership = membership or (tls.membership if tls else Membership())
        self._channels: dict[str, tuple[grpc.aio.Channel, str]] = {}  # address -> (channel, proven peer id)
        self._closing: set[asyncio.Future] = set()

    async def get(self, address: str, peer_id: str | None = None) -> grpc.aio.Channel:
        hit = self._channels.get(address)
        if hit is not None and (not peer_id or not hit[1] or hit[1] == peer_id):
            return hit[0]
        if self.tls is None:
            ch, peer = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS), ""
        else:
            if hit is not None:  # another identity is expected there now: read the certificate again
                self.forget(address)
            try:
                ch, peer = await pinned_channel(address, self.tls, self.membership, GRPC_OPTIONS, peer_id)
            except ssl.SSLError:
                if not self.plaintext_fallback:
                    raise
                ch, peer = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS), ""
        self._channels[address] = (ch, peer)
        return ch

    def peer_of(self, address: str) -> str:
        """The peer id the node at `address` proved ("" for a plain-text channel or an unknown address)."""
        hit = self._channels.get(address)
        return hit[1] if hit else ""

    def forget(self, address: str) -> None:
        """Drop the channel to `address` (a node that restarted presents a new certificate)."""
        hit = self._channels.pop(address, None)
        if hit is not None:
            fut = asyncio.ensure_future(hit[0].close())
            self._closing.add(fut)
            fut.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for ch, _ in self._channels.values():
            await ch.close()
        self._channels.clear()


def make_server(max_message_mb: int, interceptors: list | None = None) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    opts = [("grpc.max_receive_message_length", max_message_mb << 20), ("grpc.max_send_message_length", 256 << 20),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
            ("grpc.http2.max_ping_strikes", 0)]
    # access control (authenticated caller, API key) first: a refused call is never decoded
    server = grpc.aio.server(options=opts, interceptors=[*(interceptors or []), DecodeGuard()])
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    return server, hs


class Malformed:
    """A request whose bytes did not decode (stands in for the message; DecodeGuard answers INVALID_ARGUMENT)."""

    def __init__(self, method: str, error: Exception):
        self.text = f"malformed {method} message: {type(error).__name__}: {error}".strip().rstrip(":")


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Bytes that do not decode as the method's request end the call with INVALID_ARGUMENT and one log line.

    Without it grpc answers UNKNOWN with a DecodeError traceback for a unary call, and a stream's reader dies
    silently. A streamed request yields WireError from its iterator instead (the services turn it into
    INVALID_ARGUMENT)."""

    async def intercept_service(self, continuation, handler_call_details):
        h = await continuation(handler_call_details)
        if h is None or h.request_deserializer is None:
            return h
        method = handler_call_details.method.rsplit("/", 1)[-1]
        decode = h.request_deserializer

        def tolerant(raw: bytes):
            try:
                return decode(raw)
            except Exception as e:  # protobuf raises DecodeError, and others for some byte strings
                return Malformed(method, e)

        if h.request_streaming:
            kind = "stream_stream" if h.response_streaming else "stream_unary"
            return h._replace(request_deserializer=tolerant, **{kind: _guard_stream(getattr(h, kind))})
        kind = "unary_stream" if h.response_streaming else "unary_unary"
        return h._replace(request_deserializer=tolerant, **{kind: _guard_unary(getattr(h, kind))})


async def _refuse(bad: Malformed, context) -> None:
    log.warning("%s from %s: INVALID_ARGUMENT", bad.text, context.peer())
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.text)


def _guard_unary(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def gen(request, context):
            if isinstance(request, Malformed):
                await _refuse(request, context)
            async for r in behavior(request, context):
                yield r
        return gen

    async def call(request, context):
        if isinstance(request, Malformed):
            await _refuse(request, context)
        return await behavior(request, context)
    return call


def _guard_stream(behavior):
    async def requests(iterator):
        async for m in iterator:
            if isinstance(m, Malformed):
                raise WireError(m.text)
            yield m

    if inspect.isasyncgenfunction(behavior):
        async def gen(request_iterator, context):
            async for r in behavior(requests(request_iterator), context):
                yield r
        return gen

    async def call(request_iterator, context):
        return await behavior(requests(request_iterator), context)
    return call


async def query_info(channel: grpc.aio.Channel, timeout: float = 5.0) -> NodeInfo:
    return node_info_from_pb(await rpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=timeout))


async def wait_healthy(address: str, timeout: float = 60.0, tls: bool = False) -> None:
    """Wait until the node at `address` reports SERVING on the standard health service (tls: over TLS,
    trusting whatever certificate it presents: a liveness check, not an identity check)."""
    deadline = time.monotonic() + timeout
    ch = None
    last = "no answer"
    try:
        while True:
            try:
                if ch is None:
                    ch = (await pinned_channel(address, None, Membership(), GRPC_OPTIONS, timeout=2))[0] if tls \
                        else grpc.aio.insecure_channel(address)
                r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = "not serving yet"
            except grpc.aio.AioRpcError as e:
                last = rpc_error_text(e)
            except (OSError, TlsIdentityError) as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"node at {address} not healthy after {timeout:.0f} s ({last})")
            await asyncio.sleep(0.2)
    finally:
        if ch is not None:
            await ch.close()
