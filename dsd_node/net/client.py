"""The client: an async class for programs, used by `dsd generate --gateway`.

TLS: a gateway that speaks TLS is reached over TLS pinned to the certificate it presents, after that
certificate proved a dsd identity (and `peer_id`, when given: without it the first certificate is trusted);
one that answers plain text (a --insecure testnet) is reached in plain text, unless `peer_id` is given.
The API key travels as call metadata (dsd-api-key)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from dsd_node.engine.config import GenerationConfig, Stats
from dsd_node.net.grpc_util import GRPC_OPTIONS
from dsd_node.net.tls import API_KEY_METADATA, Membership, TlsIdentityError, pinned_channel
from dsd_node.net.wire import generate_request_to_pb, stats_from_pb
from dsd_node.proto import dsd_pb2_grpc as rpc


def parse_gateway_address(address: str) -> str:
    """Check that `address` is HOST:PORT (IPv6 as [::1]:PORT) and return it; ValueError with a one-line reason."""
    if "://" in address:
        raise ValueError(f"gateway address {address!r}: give HOST:PORT, without a scheme such as http://")
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if not sep or not host or (":" in host or "[" in host) and not bracketed:
        raise ValueError(f"gateway address {address!r}: give HOST:PORT, e.g. 127.0.0.1:6000 (the port is required)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"gateway address {address!r}: the port must be a number from 1 to 65535")
    return address


class ClientError(RuntimeError):
    """A generation the gateway refused or could not finish; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str):
        self.code, self.details = code, details
        if code == grpc.StatusCode.UNIMPLEMENTED:
            super().__init__(f"{address} is not a dsd gateway (it answers gRPC but has no Gateway service: "
                             "a stage's address?)")
            return
        hint = ""
        if code == grpc.StatusCode.UNAVAILABLE and (not details or "connect" in details.lower()):
            hint = " (is the gateway running at that address?)"  # gRPC's own words: nothing answered
        super().__init__(f"{code.name}: {details}{hint}" if details else f"{code.name} from {address}{hint}")


@dataclass
class Chunk:
    tokens: list[int]
    text: str


@dataclass
class ClientResult:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    stats: Stats | None = None  # the gateway's, once the generation has finished

    def as_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stats": self.stats.as_dict() if self.stats else {}}


class DsdClient:
    """`async with DsdClient("127.0.0.1:6000") as c: r = await c.generate("def f(", GenerationConfig(mode="si"))`
    (inside an `async def`; ValueError for an address that is not HOST:PORT)."""

    def __init__(self, gateway: str, timeout_s: float | None = None, api_key: str | None = None,
                 peer_id: str | None = None):
        self.gateway = parse_gateway_address(gateway)
        self.timeout_s = timeout_s
        self.api_key, self.peer_id = api_key or None, peer_id or None
        self.channel: grpc.aio.Channel | None = None
        self.tls = False  # whether the connection is TLS (known once connected)

    async def __aenter__(self) -> DsdClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def connect(self) -> grpc.aio.Channel:
        """The channel to the gateway: TLS when it speaks TLS (see the module doc). ClientError when it cannot be
        reached or fails the identity check."""
        if self.channel is None:
            try:
                self.channel, _ = await pinned_channel(self.gateway, None, Membership(), GRPC_OPTIONS, self.peer_id)
                self.tls = True
            except TlsIdentityError as e:
                raise ClientError(grpc.StatusCode.UNAUTHENTICATED, str(e), self.gateway) from None
            except ssl.SSLError as e:
                if self.peer_id:
                    raise ClientError(grpc.StatusCode.UNAUTHENTICATED, f"{self.gateway} does not speak TLS, so it "
                                      f"cannot prove peer id {self.peer_id} ({e})", self.gateway) from None
                self.channel = grpc.aio.insecure_channel(self.gateway, options=GRPC_OPTIONS)  # a --insecure node
            except OSError as e:
                raise ClientError(grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.gateway}: {e}",
                                  self.gateway) from None
        return self.channel

    async def stream(self, prompt: str | list[int], cfg: GenerationConfig, result: ClientResult | None = None
                     ) -> AsyncIterator[Chunk]:
        """Yield text as it is committed; fills `result` (text, tokens, stats) on the way."""
        result = result if result is not None else ClientResult()
        cfg.validate()
        stub = rpc.GatewayStub(await self.connect())
        metadata = ((API_KEY_METADATA, self.api_key),) if self.api_key else None
        call = stub.Generate(generate_request_to_pb(prompt, cfg), timeout=self.timeout_s, wait_for_ready=False,
                             metadata=metadata)
        try:
            async for ev in call:
                if ev.HasField("stats"):
                    result.stats = stats_from_pb(ev.stats)
                    continue
                result.tokens.extend(ev.tokens)
                result.text += ev.text
                yield Chunk(list(ev.tokens), ev.text)
        except grpc.aio.AioRpcError as e:
            raise ClientError(e.code(), e.details() or "", self.gateway) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | list[int], cfg: GenerationConfig) -> ClientResult:
        result = ClientResult()
        async for _ in self.stream(prompt, cfg, result):
            pass
        return result
