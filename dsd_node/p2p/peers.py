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
from dsd_node.net.exclusion import Exclusions
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
    d = Discovery(identity, host, port, bootstrap, require_bootstrap=False,  # a node keeps trying to join
                  swarm_key=swarm_key)
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


FORGET_S = 60.0  # a route finder forgets a stage record this long after it expired unrefreshed


class RouteFinder:
    """The head's routes: waits (with a visible message) until the network covers every layer; re-routes on failure.

    Peers in `exclusions` (by gRPC address) are left out until their backoff ends; the gateway decides who is
    excluded. Records found before are kept (a lookup that fails, times out or misses some falls back on them),
    so a slow DHT never stops a failover: the probes decide which stages are alive."""

    def __init__(self, discovery: Discovery, channels: Channels, model_id: str, model_hash: str | None,
                 num_layers: int, say: Callable[[str], None] = print, exclusions: Exclusions | None = None):
        self.discovery, self.channels = discovery, channels
        self.model_id, self.model_hash, self.num_layers = model_id, model_hash, num_layers
        self.say = say
        self.exclusions = exclusions or Exclusions()
        self.known: list[NodeRecord] = []  # every stage record found so far (see records())
        self.banned: set[str] = set()  # peer ids output verification caught (never routed to again)

    async def records(self) -> list[NodeRecord]:
        """The stage records found now, plus those found before (a lookup slowed by a dead or frozen peer may
        miss some); records not refreshed for FORGET_S after they expired are dropped."""
        try:
            found = await stage_records(self.discovery, self.model_id, self.model_hash)
        except Exception as e:  # noqa: BLE001 - DiscoveryError, a trio error group from a timed-out query...
            log.warning("stage lookup failed (%r); using the %d records found before", e, len(self.known))
            found = []
        now = time.time()
        merged = {r.peer_id: r for r in self.known if r.expires_at > now - FORGET_S}
        merged.update({r.peer_id: r for r in found})
        self.known = sorted(merged.values(), key=lambda r: (r.layer_start, r.peer_id))
        return list(self.known)

    async def route(self, wait_s: float = 0.0, lookup: bool = True) -> list[Hop]:
        """The cheapest route among the stages that answer now (lookup=False: among those found before)."""
        deadline = time.monotonic() + wait_s
        last = ""
        while True:
            excluded = self.exclusions.excluded()
            known = await self.records() if lookup or not self.known else list(self.known)
            records = [r for r in known if r.grpc_address not in excluded and r.peer_id not in self.banned]
            try:
                chosen = route_of(records, await probe_all(self.channels, records), self.num_layers, self.model_id)
                signed = self.discovery.signed  # each hop's record travels with the session's first round
                return [Hop(r.grpc_address, r.layer_start, r.layer_end, r.peer_id,
                            signed.get((self.model_id, r.peer_id), b"")) for r in chosen]
            except RouteError as e:
                if time.monotonic() >= deadline:
                    if excluded:
                        raise RouteError(f"{e} (excluded for now: {', '.join(sorted(excluded))})") from None
                    raise
                if str(e) != last:
                    self.say(f"waiting for stages: {e}")
                    last = str(e)
                await asyncio.sleep(1.0)

    async def reroute(self, failed: list[Hop]) -> list[Hop]:
        """A route around the peers excluded now (the gateway excluded the culprits of `failed`): first among the
        stages found before (no DHT lookup, which a dead or frozen peer slows down), else after a fresh lookup."""
        try:
            return await self.route(wait_s=0.0, lookup=False)
        except RouteError:
            return await self.route(wait_s=0.0)

    async def keep_fresh(self, interval_s: float) -> None:
        """Look the stages up every `interval_s` until cancelled, so a failover knows every replica at once."""
        while True:
            await asyncio.sleep(interval_s)
            await self.records()

    async def drafters(self, model_id: str) -> list[str]:
        """gRPC addresses of the drafter nodes announcing `model_id` now."""
        return [r.grpc_address for r in await self.discovery.find(model_id) if r.role == "drafter"]
