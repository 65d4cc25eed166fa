"""A node's life on the libp2p network: announce its record, find a route, probe links, fail over.

gRPC stays the data path; libp2p (dsd_node.p2p) carries identities and the signed records that say
who hosts which layers of which model at which gRPC address.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from dsd_node import __version__
from dsd_node.engine.messages import Hop
from dsd_node.net.grpc_util import Channels, query_info
from dsd_node.net.tls import TlsIdentityError
from dsd_node.p2p.discovery import Discovery, parse_listen_multiaddr
from dsd_node.p2p.identity import load_or_create_identity
from dsd_node.p2p.records import NodeRecord
from dsd_node.p2p.routing import RouteError, build_route

log = logging.getLogger("dsd.peers")


def default_identity_path(role: str) -> Path:
    return Path("~/.dsd").expanduser() / f"{role.replace('+', '-')}.key"


async def start_discovery(identity_path: str | None, role: str, listen_p2p: str | None,
                          bootstrap: list[str], swarm_key: bytes | None = None) -> Discovery:
    identity = load_or_create_identity(Path(identity_path).expanduser() if identity_path else default_identity_path(role))
    host, port = parse_listen_multiaddr(listen_p2p) if listen_p2p else ("127.0.0.1", 0)
    d = Discovery(identity, host, port, bootstrap, swarm_key=swarm_key)
    await d.start()
    return d


def make_record(peer_id: str, role: str, model_id: str, model_hash: str, start: int, end: int, num_layers: int,
                address: str, tokens_per_s: float, sessions: int, max_sessions: int, ttl_s: float, *,
                device: str = "", dtype: str = "", mem_free_mb: int = 0) -> NodeRecord:
    """device / dtype: where and in what the shard computes; mem_free_mb: memory measured free at start-up."""
    return NodeRecord(peer_id=peer_id, role=role, model_id=model_id, model_hash=model_hash, layer_start=start,
                      layer_end=end, num_layers=num_layers, grpc_address=address, version=__version__,
                      tokens_per_s=tokens_per_s, sessions=sessions, max_sessions=max_sessions,
                      expires_at=time.time() + ttl_s, device=device, dtype=dtype, mem_free_mb=int(mem_free_mb))


async def probe_rtt(channels: Channels, address: str, timeout: float = 2.0, peer_id: str = "") -> float | None:
    """Round trip of an Info call in ms, or None when the node does not answer (or, with TLS, does not prove
    the peer id its record names: a forged or stale identity is never routed through)."""
    t0 = time.perf_counter()
    try:
        await query_info(await channels.get(address, peer_id or None), timeout=timeout)
    except (grpc.aio.AioRpcError, OSError) as e:  # TlsIdentityError is an OSError (ConnectionError)
        if isinstance(e, TlsIdentityError):
            log.warning("not routing through %s: %s", address, e)
        if not isinstance(e, grpc.aio.AioRpcError) or e.code() == grpc.StatusCode.UNAVAILABLE:
            channels.forget(address)  # a node back at this address presents a new certificate
        return None
    return (time.perf_counter() - t0) * 1e3


async def stage_records(discovery: Discovery, model_id: str, model_hash: str | None) -> list[NodeRecord]:
    return [r for r in await discovery.find(model_id, expected_model_hash=model_hash) if r.role == "stage"]


async def probe_all(channels: Channels, records: list[NodeRecord]) -> dict[str, float]:
    """Peer id -> RTT in ms of every record's node that answers now."""
    rtts = await asyncio.gather(*(probe_rtt(channels, r.grpc_address, peer_id=r.peer_id) for r in records))
    return {r.peer_id: rtt for r, rtt in zip(records, rtts, strict=True) if rtt is not None}


def route_of(records: list[NodeRecord], rtt_ms: dict[str, float], num_layers: int,
             model_id: str | None = None) -> list[NodeRecord]:
    """The cheapest complete route among the stages that answered; RouteError names missing layers."""
    return build_route([r for r in records if r.role == "stage" and r.peer_id in rtt_ms], num_layers, rtt_ms=rtt_ms,
                       model_id=model_id)


async def discover_route(discovery: Discovery, channels: Channels, model_id: str, model_hash: str | None,
                         num_layers: int, exclude: set[str] = frozenset()) -> tuple[list[Hop], list[NodeRecord]]:
    """Find the stages of a model, measure their RTT now, and choose the route."""
    records = [r for r in await stage_records(discovery, model_id, model_hash) if r.peer_id not in exclude]
    chosen = route_of(records, await probe_all(channels, records), num_layers, model_id)
    return [Hop(r.grpc_address, r.layer_start, r.layer_end, r.peer_id) for r in chosen], chosen


class RouteFinder:
    """The head's routes: waits (with a visible message) until the network covers every layer; re-routes on failure."""

    def __init__(self, discovery: Discovery, channels: Channels, model_id: str, model_hash: str | None,
                 num_layers: int, say: Callable[[str], None] = print):
        self.discovery, self.channels = discovery, channels
        self.model_id, self.model_hash, self.num_layers = model_id, model_hash, num_layers
        self.say = say
        self.dead: set[str] = set()  # peer ids that failed a generation
        self.by_address: dict[str, str] = {}

    async def route(self, wait_s: float = 0.0) -> list[Hop]:
        deadline = time.monotonic() + wait_s
        last = ""
        while True:
            try:
                hops, recs = await discover_route(self.discovery, self.channels, self.model_id, self.model_hash,
                                                  self.num_layers, self.dead)
                self.by_address.update({r.grpc_address: r.peer_id for r in recs})
                return hops
            except RouteError as e:
                if time.monotonic() >= deadline:
                    raise
                if str(e) != last:
                    self.say(f"waiting for stages: {e}")
                    last = str(e)
                await asyncio.sleep(1.0)

    async def reroute(self, failed: list[Hop]) -> list[Hop]:
        """Mark the hops that no longer answer as dead and find a route around them."""
        for hop in failed:
            if await probe_rtt(self.channels, hop.address, 1.0, hop.peer_id) is None and hop.address in self.by_address:
                self.dead.add(self.by_address[hop.address])
        return await self.route(wait_s=0.0)
