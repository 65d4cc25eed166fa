"""One node's life: load what its roles need, serve gRPC, join the network, find a route, stop cleanly on SIGTERM/SIGINT.

`run_node(cfg)` runs these steps in order; each is a method of `Node`:
  compute_on      the device (a one-line error, before anything starts, when it is not there) and CPU threads
  secure          TLS bound to the libp2p identity, swarm membership, API key (or --insecure, said loudly)
  listen          bind the gRPC port
  join            libp2p discovery (with --bootstrap / --listen-p2p)
  load            the stage's shard (--layers auto: sized by free memory, placed where the network covers least),
                  the drafter, the model hash (a one-line error for a bad model)
  add_services    Stage, Drafter, Gateway, Node (Info); the server starts, NOT_SERVING
  announce        this node's records in the DHT
  build_gateway   a head's route: from --route addresses or from discovery (may wait; SIGTERM still stops it)
  serve           SERVING until a signal
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

import grpc
import torch
from aiohttp import web
from grpc_health.v1 import health_pb2

from dsd_node import __version__
from dsd_node.daemon.config import NodeConfig
from dsd_node.engine.config import DrafterSpec
from dsd_node.engine.device import (
    DeviceError,
    checkpoint_dtype,
    default_threads,
    free_memory_bytes,
    resolve_device,
    resolve_dtype,
    synchronize,
)
from dsd_node.engine.drafter import Drafter
from dsd_node.engine.local import LocalDraftSource
from dsd_node.engine.messages import Hop
from dsd_node.engine.models import (
    ModelError,
    check_same_tokenizer,
    load_config,
    load_shard,
    load_tokenizer,
    max_positions,
    model_num_layers,
    parse_layers,
    weights_hash,
)
from dsd_node.engine.shard_runner import ShardRunner
from dsd_node.engine.stage import StageHandler
from dsd_node.engine.tree import TokenTree
from dsd_node.engine.verify import low_importance_mask
from dsd_node.net.audit import Auditor
from dsd_node.net.dialable import EXPIRY_GRACE_S, Dialable
from dsd_node.net.drafter_pool import DrafterPool
from dsd_node.net.exclusion import Exclusions
from dsd_node.net.gateway import GatewayConfig, GatewayService
from dsd_node.net.grpc_util import Channels, make_server, query_info
from dsd_node.net.http_api import HttpApi
from dsd_node.net.metrics import NodeMetrics, parse_host_port, serve_metrics
from dsd_node.net.node_services import DrafterService, NodeService
from dsd_node.net.stage_service import ColocatedStage, StageService
from dsd_node.net.tls import (
    AccessPolicy,
    Membership,
    NodeTls,
    TlsIdentityError,
    is_loopback,
    read_allow_peers,
    read_swarm_key,
)
from dsd_node.net.wire import NodeInfo
from dsd_node.p2p.discovery import Discovery, DiscoveryError
from dsd_node.p2p.identity import IdentityError, load_or_create_identity
from dsd_node.p2p.peers import (
    RouteFinder,
    default_identity_path,
    make_record,
    probe_rtt,
    stage_records,
    start_discovery,
)
from dsd_node.p2p.placement import MIB, PlacementError, dtype_bytes, plan_span
from dsd_node.p2p.records import NodeRecord, RecordError, verify_record
from dsd_node.p2p.routing import RouteError, build_route
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.node")


# bootstrap/identity.key: committed so that the compose file can name its peer id; anyone can read it
COMPOSE_TESTNET_BOOTSTRAP_PEER_ID = "12D3KooWBKsYXnuV42qpuq1enoJVXKc3KGMuCNizgzjQjks29XsK"


class NodeStartError(RuntimeError):
    """The node cannot start or go on: printed as one line, exit code 2."""


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_node(cfg: NodeConfig) -> None:
    await Node(cfg).run()


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.roles = cfg.roles
        self.role = "+".join(self.roles)
        self.stop = asyncio.Event()
        self.channels = Channels()
        self.tls: NodeTls | None = None
        self.policy = AccessPolicy(None, cfg.api_key)  # the TLS half is set by secure()
        self.dialable = Dialable()
        self.server, self.health = make_server(cfg.max_message_mb, [self.policy])
        self.address = self.self_address = ""
        self.model_hash = ""
        self.num_layers = 0
        self.tokens_per_s = 0.0
        self.mem_free_mb = 0
        self.device = torch.device("cpu")
        self.stage: StageHandler | None = None
        self.drafter: Drafter | None = None
        self.gateway: GatewayService | None = None
        self.discovery: Discovery | None = None
        self.tasks: list[asyncio.Task] = []
        self.metrics = NodeMetrics()  # this node's own registry
        self.web: list[web.AppRunner] = []  # the HTTP API and the metrics page

    async def run(self) -> None:
        self.compute_on()
        install_signal_handlers(self.stop)
        try:
            self.secure()
        except (IdentityError, ValueError) as e:
            print(f"dsd-node: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        self.listen()
        try:
            await self.join()
            await self.load()
            self.add_services()
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.start()
            await self.serve_http()
            self.announce()
            if self.gateway is not None and not await self.build_gateway():
                return  # stopped while waiting for a route
            await self.serve()
        except (RouteError, DiscoveryError, IdentityError, NodeStartError, PlacementError) as e:
            print(f"dsd-node: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from e
        finally:
            await self.shutdown()

    def compute_on(self) -> None:
        try:
            self.device = resolve_device(self.cfg.device)
        except DeviceError as e:
            print(f"dsd-node: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        threads = self.cfg.threads
        if not threads:  # the host's cores shared among its nodes, capped by the model's width
            threads = default_threads(nodes_on_this_host(), None if self.roles == ["bootstrap"] else model_width(self.cfg.model))
        torch.set_num_threads(threads)
        log.info("computing on %s with %d CPU threads", self.device, threads)

    def secure(self) -> None:
        cfg = self.cfg
        self.membership = Membership(read_swarm_key(cfg.swarm_key) if cfg.swarm_key else None,
                                     read_allow_peers(cfg.allow_peers) if cfg.allow_peers else None)
        if cfg.insecure:
            print("dsd-node: WARNING: --insecure: plain-text gRPC links, callers not authenticated; "
                  "use only on a trusted local network", file=sys.stderr, flush=True)
        else:
            identity = load_or_create_identity(self.identity_path)
            if identity.peer_id == COMPOSE_TESTNET_BOOTSTRAP_PEER_ID:
                raise ValueError(f"{self.identity_path} is the compose testnet's committed bootstrap key, public in the "
                                 "repository: a real deployment makes its own (point --identity at a new file), "
                                 "only an --insecure testnet may use it")
            self.tls = NodeTls.create(identity, self.membership)
            self.policy.tls = self.tls
            self.channels = Channels(self.tls)
            print(f"dsd-node links: TLS bound to peer id {identity.peer_id}, mutually authenticated; "
                  f"{self.membership.describe()}", flush=True)
        host = cfg.listen.rpartition(":")[0]
        if "head" in self.roles and not cfg.api_key and not is_loopback(host):
            print(f"dsd-node: WARNING: the gateway listens on {cfg.listen} without --api-key: anyone who reaches "
                  "it can generate", file=sys.stderr, flush=True)

    @property
    def identity_path(self) -> Path:
        return Path(self.cfg.identity).expanduser() if self.cfg.identity else default_identity_path(self.role)

    @property
    def peer_id(self) -> str:
        return self.tls.peer_id if self.tls else self.discovery.peer_id if self.discovery else ""

    def listen(self) -> None:
        host, _, _ = self.cfg.listen.rpartition(":")
        port = (self.server.add_secure_port(self.cfg.listen, self.tls.server_credentials()) if self.tls
                else self.server.add_insecure_port(self.cfg.listen))
        if port == 0:
            raise SystemExit(f"dsd-node: cannot listen on {self.cfg.listen}")
        local_host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "") else host
        self.self_address = f"{local_host}:{port}"  # where this process reaches itself ("self" in a route)
        self.address = self.cfg.advertise or self.self_address

    async def load(self) -> None:
        cfg = self.cfg
        try:
            if self.stage_role or "head" in self.roles:
                self.model_hash = weights_hash(cfg.model)
            if self.stage_role:
                self.num_layers = model_num_layers(cfg.model)
                a, b = await self.choose_layers()
                shard = load_shard(cfg.model, a, b, cfg.dtype, self.device)
                tok = load_tokenizer(cfg.model) if shard.is_last else None
                runner = ShardRunner(shard, max_sessions=cfg.max_sessions, max_kv_bytes=(cfg.max_kv_mb << 20) or None)
                self.stage = StageHandler(runner, low_importance=(lambda: low_importance_mask(tok)) if tok else None,
                                          limits=cfg.limits())
            if "drafter" in self.roles or ("head" in self.roles and cfg.drafter):
                spec = self.drafter_spec()
                self.drafter = Drafter(spec.source, cfg.dtype, max_sessions=cfg.max_sessions, device=self.device,
                                       oracle_alpha=spec.oracle_alpha)
        except PlacementError:
            raise
        except (ModelError, ValueError) as e:
            raise NodeStartError(str(e)) from e
        if self.stage is not None:
            self.tokens_per_s = measure_tokens_per_s(self.stage.runner)
        self.mem_free_mb = free_memory_bytes(self.device) // MIB

    @property
    def stage_role(self) -> bool:
        return "stage" in self.roles

    async def choose_layers(self) -> tuple[int, int]:
        """--layers A:B as given; --layers auto: as many layers as fit, where the announced stages cover least."""
        cfg = self.cfg
        if cfg.layers != "auto":
            return parse_layers(cfg.layers) if cfg.layers else (0, self.num_layers)
        config = load_config(cfg.model)
        dtype = resolve_dtype(cfg.dtype, self.device, checkpoint_dtype(config))
        budget = cfg.max_mem_mb * MIB if cfg.max_mem_mb else int(free_memory_bytes(self.device) * 0.9)
        kv_reserve = cfg.max_kv_mb * MIB if cfg.max_kv_mb else budget // 10
        records = []
        if self.discovery is not None:
            records = [r for r in await stage_records(self.discovery, cfg.model, self.model_hash)
                       if r.peer_id != self.discovery.peer_id]
        a, b = plan_span(records, config, dtype_bytes(dtype), budget, kv_reserve_bytes=kv_reserve,
                         salt=self.discovery.peer_id if self.discovery else "")
        print(f"dsd-node: --layers auto: {budget // MIB} MB on {self.device} ({kv_reserve // MIB} MB for KV caches), "
              f"{len(records)} stages announced: hosting layers {a}:{b}", flush=True)
        return a, b

    def add_services(self) -> None:
        stage = None
        if self.stage is not None:
            stage = StageService(self.stage, self.channels, self.cfg.session_ttl, self.metrics, policy=self.policy,
                                 dialable=self.dialable_peers(), peer_id=self.peer_id)
            rpc.add_StageServicer_to_server(stage, self.server)
        if self.drafter is not None:
            rpc.add_DrafterServicer_to_server(DrafterService(self.drafter, self.cfg.limits()), self.server)
        if "head" in self.roles:
            self.gateway = GatewayService(self.address, self.channels, metrics=self.metrics,  # reply_to: last stages
                                          policy=self.policy)
            if self.discovery is not None:  # the record proving reply_to, sent with each session's first round
                role = "head" if self.stage is None else "stage"
                self.gateway.reply_record = lambda: self.discovery.sign(self.record(role))
            if stage is not None:  # a route that starts here: the head enters its own stage in-process
                self.gateway.colocated = ColocatedStage(stage, frozenset({self.address, self.self_address}))
            rpc.add_GatewayServicer_to_server(self.gateway, self.server)
        rpc.add_NodeServicer_to_server(NodeService(self.describe), self.server)

    async def serve_http(self) -> None:
        """The head's OpenAI-compatible API (--http) and the metrics page (--metrics), on this loop."""
        try:
            if self.cfg.http:
                api = HttpApi(self.gateway, self.cfg.model, self.metrics, self.cfg.api_key)
                host, port = parse_host_port(self.cfg.http, "--http")
                port = await api.start(host, port)
                self.web.append(api.runner)
                print(f"dsd-node http: OpenAI-compatible API at http://{host}:{port}/v1 (metrics at /metrics)", flush=True)
            if self.cfg.metrics:
                host, port = parse_host_port(self.cfg.metrics, "--metrics")
                runner, port = await serve_metrics(self.metrics, host, port)
                self.web.append(runner)
                print(f"dsd-node metrics: http://{host}:{port}/metrics", flush=True)
        except (OSError, ValueError) as e:
            raise NodeStartError(f"cannot serve HTTP: {e}") from e
        if self.gateway is not None:
            self.tasks.append(asyncio.create_task(self.probe_links()))

    async def probe_links(self, every_s: float = 10.0) -> None:
        """Head: measure the RTT to each stage of the route now and then (dsd_link_rtt_seconds)."""
        while True:
            route = self.gateway.route
            for hop in route:
                rtt = await probe_rtt(self.channels, hop.address, peer_id=hop.peer_id)
                if rtt is not None:
                    self.metrics.link_rtt.labels(hop.address).set(rtt / 1e3)
            await asyncio.sleep(every_s if route else 1.0)  # first: soon after the route is known

    def dialable_peers(self) -> Dialable:
        """Where rounds may send this stage: announced peers (discovery), else --dial-allow, else anywhere."""
        if self.discovery is not None:
            async def announced() -> list[tuple[str, str, float]]:
                return [(r.grpc_address, r.peer_id, r.expires_at)
                        for r in await self.discovery.find(self.cfg.model, expected_model_hash=self.model_hash)]
            def in_band(blob: bytes) -> tuple[str, str, float]:  # a record a round carries: checked as find() does
                rec = verify_record(blob, now=time.time() - EXPIRY_GRACE_S, expected_model_hash=self.model_hash,
                                    swarm_key=self.membership.swarm_key)
                if rec.model_id != self.cfg.model:
                    raise RecordError(f"record for model {rec.model_id!r}, not {self.cfg.model!r}")
                return rec.grpc_address, rec.peer_id, rec.expires_at

            dialable = Dialable(announced, verify=in_band)
            self.tasks.append(asyncio.create_task(dialable.keep_fresh()))  # known before the first round needs it
            return dialable
        if not self.cfg.dial_allow:
            print("dsd-node: note: no discovery and no --dial-allow: this stage dials the next hop and reply_to "
                  "that rounds name", flush=True)
        return Dialable(static=self.cfg.dial_allow)

    def describe(self) -> NodeInfo:
        """What Info answers: roles, model, layers, load, and a head's route."""
        sh = self.stage.runner.shard if self.stage else None
        sessions = len(self.stage.runner.sessions) if self.stage else len(self.drafter.sessions) if self.drafter else 0
        return NodeInfo(role=self.role, model=self.cfg.model, model_hash=self.model_hash,
                        layer_start=sh.start if sh else 0, layer_end=sh.end if sh else 0, num_layers=self.num_layers,
                        version=__version__, sessions=sessions, max_sessions=self.cfg.max_sessions,
                        peer_id=self.peer_id, address=self.address,
                        tokens_per_s=self.tokens_per_s, dtype=str(sh.dtype).removeprefix("torch.") if sh else "",
                        route=self.gateway.route if self.gateway else [],
                        excluded=self.gateway.excluded() if self.gateway else [],
                        banned=[f"{p}: {why}" for p, why in auditor.banned.items()] if (auditor := self.auditor) else [])

    @property
    def auditor(self) -> Auditor | None:
        return self.gateway.cfg.auditor if self.gateway is not None and self.gateway.cfg is not None else None

    async def join(self) -> None:
        cfg = self.cfg
        if not ("bootstrap" in self.roles or cfg.bootstrap or cfg.listen_p2p):
            return
        listen_p2p = cfg.listen_p2p or ("/ip4/0.0.0.0/tcp/4001" if "bootstrap" in self.roles else None)
        # py-libp2p logs every failed re-dial of a peer that left (e.g. after `dsd route`) several times a minute
        logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
        self.discovery = await start_discovery(str(self.identity_path), self.role, listen_p2p, cfg.bootstrap,
                                               swarm_key=self.membership.swarm_key)
        print(f"dsd-node p2p: peer id {self.discovery.peer_id} listening on {' '.join(self.discovery.listen_addrs)}",
              flush=True)

    def announce(self) -> None:
        if self.discovery is None:
            return
        # a head announces its gateway (the reply_to last stages may dial) unless its stage record says it already
        head = self.gateway if self.stage is None else None
        for role, present in (("stage", self.stage), ("drafter", self.drafter), ("head", head)):
            if present is not None:
                self.tasks.append(asyncio.create_task(
                    self.discovery.run_announcer(lambda role=role: self.record(role), self.cfg.announce_ttl / 3)))

    def record(self, role: str) -> NodeRecord:
        if role == "head":
            return make_record(self.discovery.peer_id, "head", self.cfg.model, self.model_hash, 0, 0,
                               model_num_layers(self.cfg.model), self.address, 0.0, len(self.gateway.sessions),
                               self.cfg.max_sessions, self.cfg.announce_ttl)
        sh = self.stage.runner.shard if role == "stage" else None
        sessions = len(self.stage.runner.sessions) if sh else len(self.drafter.sessions)
        on = sh or self.drafter.shard
        return make_record(self.discovery.peer_id, role, self.cfg.model if sh else self.drafter.model_id,
                           self.model_hash if sh else "", sh.start if sh else 0, sh.end if sh else 0,
                           self.num_layers if sh else 0, self.address, self.tokens_per_s, sessions,
                           self.cfg.max_sessions, self.cfg.announce_ttl, device=str(on.device),
                           dtype=str(on.dtype).removeprefix("torch."), mem_free_mb=self.mem_free_mb)

    async def build_gateway(self) -> bool:
        """Give the gateway its route and drafter; False if a signal came first."""
        building = asyncio.create_task(self.gateway_config())
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({building, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not building.done():
            building.cancel()
            return False
        self.gateway.cfg = building.result()
        route = self.gateway.cfg.route
        print("dsd-node route: " + " -> ".join(f"{h.address}[{h.layer_start}:{h.layer_end}]" for h in route), flush=True)
        return True

    def drafter_spec(self) -> DrafterSpec:
        """The head's --drafter (default embedded:drafter); a drafter node drafts with --drafter, else --model."""
        if "head" in self.roles:
            return DrafterSpec.parse(self.cfg.drafter or "embedded:drafter", self.cfg.model)
        return DrafterSpec.parse(self.cfg.drafter or self.cfg.model, self.cfg.model)

    async def gateway_config(self) -> GatewayConfig:
        cfg = self.cfg
        tok = load_tokenizer(cfg.model)
        exclusions = Exclusions(base_s=cfg.exclude_backoff, max_s=max(120.0, cfg.exclude_backoff))
        self.metrics.set_source(self.metrics.excluded_peers, lambda: len(exclusions.active()))
        finder = None
        if self.discovery is not None and not cfg.route:
            finder = RouteFinder(self.discovery, self.channels, cfg.model, self.model_hash, model_num_layers(cfg.model),
                                 say=lambda m: print(f"dsd-node: {m}", flush=True), exclusions=exclusions)
        drafter_addrs = [a.strip() for a in (cfg.drafter_addr or "").split(",") if a.strip()]
        if drafter_addrs or (cfg.drafter_model and finder is not None):
            find = (lambda: finder.drafters(cfg.drafter_model)) if cfg.drafter_model and finder else None
            drafter = DrafterPool(self.channels, drafter_addrs, exclusions, find)
        elif self.drafter is not None:
            if not (spec := self.drafter_spec()).is_target:
                check_same_tokenizer(tok, load_tokenizer(spec.source), cfg.model, spec.source)
            drafter = LocalDraftSource(self.drafter)
        else:
            drafter = None
        reroute = auditor = None
        if cfg.route:
            addrs = [self.self_address if a == "self" else a for a in cfg.route_addresses]
            route = await route_from_addresses(addrs, self.channels, cfg.model, wait_s=cfg.round_timeout)
        elif finder is not None:
            route = await finder.route(wait_s=cfg.route_wait)
            reroute = finder.reroute
            self.tasks.append(asyncio.create_task(finder.keep_fresh(cfg.announce_ttl / 3)))
            auditor = self.make_auditor(finder)
        else:
            raise NodeStartError("head needs --route ADDR,ADDR,... (stage addresses, first stage first) or --bootstrap")
        if isinstance(drafter, DrafterPool):
            await drafter.refresh()
        return GatewayConfig(route, tok, drafter, cfg.max_inflight, cfg.round_timeout, reroute,
                             max_positions(load_config(cfg.model)), limits=cfg.limits(), exclusions=exclusions,
                             round_floor_s=cfg.round_floor, auditor=auditor)

    def make_auditor(self, finder: RouteFinder) -> Auditor:
        """Output verification against the announced replicas (the route finder's records, kept fresh)."""
        async def replicas(fresh: bool) -> list[NodeRecord]:
            return await finder.records() if fresh or not finder.known else list(finder.known)

        self.metrics.set_source(self.metrics.banned_peers, lambda: len(finder.banned))
        return Auditor(replicas, self.gateway.replay, self.cfg.verify_fraction, on_ban=finder.banned.add,
                       on_result=lambda result: self.metrics.verification.labels(result).inc(),
                       record_of=lambda peer: self.discovery.signed.get((self.cfg.model, peer), b""),
                       excluded=finder.exclusions.excluded)

    async def serve(self) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        layers = f" layers={self.stage.runner.shard.start}:{self.stage.runner.shard.end}" if self.stage else ""
        print(f"dsd-node ready: role={self.role} model={self.cfg.model}{layers} listen={self.address}", flush=True)
        await self.stop.wait()

    async def shutdown(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.discovery is not None:
            try:
                await asyncio.wait_for(self.discovery.withdraw(), 3)
            except Exception as e:  # leaving anyway: the record expires on its own
                log.info("withdraw failed: %s", e)
            await self.discovery.stop()
        for runner in self.web:
            await runner.cleanup()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=2)
        await self.channels.close()
        log.info("stopped")


async def connect_waiting(channels: Channels, address: str, what: str, wait_s: float) -> grpc.aio.Channel:
    """The channel to a node configured by address, waiting (with a message) while it is not up yet."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await channels.get(address)
        except TlsIdentityError as e:
            raise NodeStartError(f"{what} {address}: {e}") from e
        except OSError as e:
            if time.monotonic() > deadline:
                raise NodeStartError(f"{what} {address} does not answer ({e})") from e
            log.info("waiting for %s %s ...", what, address)
            await asyncio.sleep(1.0)


async def route_from_addresses(addresses: list[str], channels: Channels, model: str, wait_s: float) -> list[Hop]:
    """Ask each stage for its layers (waiting, with a message, for stages not up yet); the route through them."""
    deadline = time.monotonic() + wait_s
    records: list[NodeRecord] = []
    for addr in addresses:
        while True:
            try:
                info = await query_info(await connect_waiting(channels, addr, "stage", wait_s), timeout=2)
                break
            except TlsIdentityError as e:
                raise NodeStartError(f"stage {addr}: {e}") from e
            except (grpc.aio.AioRpcError, OSError) as e:
                if time.monotonic() > deadline:
                    why = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
                    raise NodeStartError(f"stage {addr} does not answer ({why})") from e
                log.info("waiting for stage %s ...", addr)
                await asyncio.sleep(1.0)
        records.append(make_record(addr, "stage", model, info.model_hash, info.layer_start, info.layer_end,
                                   info.num_layers, addr, info.tokens_per_s, info.sessions, info.max_sessions, wait_s))
    chain = build_route(records, max(r.num_layers for r in records), model_id=model)  # RouteError names the gaps
    return [Hop(r.grpc_address, r.layer_start, r.layer_end, channels.peer_of(r.grpc_address)) for r in chain]


def measure_tokens_per_s(runner: ShardRunner, n: int = 32) -> float:
    """Throughput of this shard on a prefill of n tokens after a warm-up (announced; routes prefer fast nodes)."""
    sh = runner.shard
    tree = TokenTree.chain([0] * n, n_given=n)
    hidden = None if sh.is_first else torch.zeros(1, n, sh.hidden_size, dtype=sh.dtype, device=sh.device)
    for _ in range(2):  # the first pass pays for kernel selection and allocation
        t0 = time.perf_counter()
        runner.forward("__probe__", 0, [], tree, hidden)
        synchronize(sh.device)
        runner.end_session("__probe__")
    return n / max(1e-6, time.perf_counter() - t0)


def model_width(model: str) -> int | None:
    """The model's hidden size, or None when its config cannot be read (loading it later says why)."""
    try:
        return getattr(load_config(model), "hidden_size", None)
    except (OSError, ValueError):
        return None


def nodes_on_this_host() -> int:
    """dsd-node processes running on this host now, this one included (Linux: /proc; elsewhere 1)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith((b"dsd-node", b"dsd-bootstrap", b"dsd_node.node_cli", b"netem.emulated_node")) for a in argv[:3]):
            count += 1
    return max(1, count)
