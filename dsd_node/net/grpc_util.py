"""gRPC plumbing shared by every service and client: channel options, the channel pool, the server
factory, the health wait and the Info call."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsd_node.engine.config import ErrorCode
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
    """One gRPC channel per peer address, shared by all sessions."""

    def __init__(self):
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        return self._channels[address]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def make_server(max_message_mb: int) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    opts = [("grpc.max_receive_message_length", max_message_mb << 20), ("grpc.max_send_message_length", 256 << 20),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
            ("grpc.http2.max_ping_strikes", 0)]
    server = grpc.aio.server(options=opts, interceptors=[DecodeGuard()])
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


async def wait_healthy(address: str, timeout: float = 60.0) -> None:
    """Wait until the node at `address` reports SERVING on the standard health service."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as e:
                last = rpc_error_text(e)
            else:
                last = "not serving yet"
            if time.monotonic() > deadline:
                raise TimeoutError(f"node at {address} not healthy after {timeout:.0f} s ({last})")
            await asyncio.sleep(0.2)
