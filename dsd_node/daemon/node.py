"""Assembling and running one node: load what its roles need, serve gRPC, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch
from grpc_health.v1 import health_pb2

from dsd_node.engine.drafter import Drafter
from dsd_node.engine.messages import Hop
from dsd_node.engine.models import (
    ModelError,
    check_same_tokenizer,
    load_shard,
    load_tokenizer,
    parse_layers,
    weights_hash,
)
from dsd_node.engine.shard_runner import ShardRunner
from dsd_node.engine.stage import StageHandler
from dsd_node.engine.tree import TokenTree
from dsd_node.engine.verify import low_importance_mask
from dsd_node.net.node_server import (
    Channels,
    DrafterService,
    GatewayConfig,
    GatewayService,
    NodeService,
    NodeState,
    StageService,
    make_server,
    query_info,
)
from dsd_node.net.pipeline_client import RemoteDraftSource
from dsd_node.node_cli import install_signal_handlers
from dsd_node.p2p.discovery import DiscoveryError
from dsd_node.p2p.identity import IdentityError
from dsd_node.proto import dsd_pb2_grpc as rpc
from netem.link_emulator import LinkConfig, LinkEmulator, emulator_requested

log = logging.getLogger("dsd.node")


class RouteIncomplete(RuntimeError):
    pass


def check_route(hops: list[Hop], num_layers: int, model: str) -> None:
    """A route must cover [0, num_layers) contiguously; name the layers without a host otherwise."""
    pos = 0
    for h in hops:
        if h.layer_start != pos:
            raise RouteIncomplete(f"no stage hosts layers {pos}:{h.layer_start} of {model}" if h.layer_start > pos
                                  else f"stages overlap at layer {h.layer_start} ({h.address})")
        pos = h.layer_end
    if pos != num_layers:
        raise RouteIncomplete(f"no stage hosts layers {pos}:{num_layers} of {model}")


async def route_from_addresses(addresses: list[str], channels: Channels, model: str, wait_s: float) -> list[Hop]:
    """Ask each stage for its layers (waiting, with a message, for stages that are not up yet)."""
    deadline = time.monotonic() + wait_s
    hops: list[Hop] = []
    for addr in addresses:
        while True:
            try:
                info = await query_info(channels.get(addr), timeout=2)
                break
            except grpc.aio.AioRpcError as e:
                if time.monotonic() > deadline:
                    raise RouteIncomplete(f"stage {addr} does not answer ({e.code().name})") from e
                log.info("waiting for stage %s ...", addr)
                await asyncio.sleep(1.0)
        hops.append(Hop(addr, info.layer_start, info.layer_end))
        num_layers = info.num_layers
    check_route(hops, num_layers, model)
    return hops


async def run_node(cfg: dict) -> None:
    roles = cfg["roles"]
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    stop = asyncio.Event()
    install_signal_handlers(stop)
    server, health_servicer = make_server(int(cfg["max_message_mb"]))
    host, _, want_port = cfg["listen"].rpartition(":")
    emulator = None
    if emulator_requested():  # userspace link emulation in front of our port (no kernel netem here)
        internal = server.add_insecure_port("127.0.0.1:0")
        emulator = LinkEmulator(host, int(want_port), "127.0.0.1", internal, LinkConfig.from_env())
        await emulator.start()
        port = emulator.port
        log.info("link emulator on %s:%d -> 127.0.0.1:%d (%s)", host, port, internal, emulator.config.describe())
        self_address = f"127.0.0.1:{internal}"
    else:
        port = server.add_insecure_port(cfg["listen"])
        self_address = None
    if port == 0:
        raise SystemExit(f"dsd-node: cannot listen on {cfg['listen']}")
    address = cfg["advertise"] or f"{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{port}"
    self_address = self_address or address
    model = cfg["model"]
    state = NodeState(role="+".join(roles), address=address, model_id=model, max_sessions=int(cfg["max_sessions"]),
                      session_ttl_s=float(cfg["session_ttl"]), channels=Channels())
    stage_handler = drafter = None
    try:
        if "stage" in roles:
            from dsd_node.engine.models import model_num_layers

            n = model_num_layers(model)
            a, b = parse_layers(cfg["layers"]) if cfg["layers"] else (0, n)
            shard = load_shard(model, a, b, cfg["dtype"])
            tok = load_tokenizer(model) if shard.is_last else None
            kv_cap = int(cfg["max_kv_mb"]) << 20 or None
            stage_handler = StageHandler(ShardRunner(shard, max_sessions=state.max_sessions, max_kv_bytes=kv_cap),
                                         low_importance=(lambda: low_importance_mask(tok)) if tok else None)
            state.num_layers = shard.num_layers
            rpc.add_StageServicer_to_server(StageService(state, stage_handler), server)
        drafter_model = cfg["drafter"] if "head" in roles else model
        if "drafter" in roles or ("head" in roles and cfg["drafter"]):
            drafter = Drafter(model if drafter_model == "self" else (drafter_model or "embedded:drafter"), cfg["dtype"],
                              max_sessions=state.max_sessions)
            rpc.add_DrafterServicer_to_server(DrafterService(drafter), server)
        if stage_handler or "head" in roles:
            state.model_hash = weights_hash(model)
    except (ModelError, ValueError) as e:
        raise SystemExit(f"dsd-node: {e}") from e
    if stage_handler is not None:
        state.tokens_per_s = measure_tokens_per_s(stage_handler.runner)
    rpc.add_NodeServicer_to_server(NodeService(state, stage_handler, drafter), server)
    gateway = None
    if "head" in roles:
        gateway = GatewayService(state, None)
        rpc.add_GatewayServicer_to_server(gateway, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    discovery = None
    tasks: list[asyncio.Task] = []
    try:
        if "bootstrap" in roles or cfg["bootstrap"] or cfg["listen_p2p"]:
            from dsd_node.p2p.peers import start_discovery

            discovery = await start_discovery(cfg["identity"], state.role, cfg["listen_p2p"] or
                                              ("/ip4/0.0.0.0/tcp/4001" if "bootstrap" in roles else None), cfg["bootstrap"])
            state.peer_id = discovery.peer_id
            print(f"dsd-node p2p: peer id {discovery.peer_id} listening on {' '.join(discovery.listen_addrs)}", flush=True)
            for role, kind in (("stage", stage_handler), ("drafter", drafter)):
                if kind is not None:
                    tasks.append(asyncio.create_task(discovery.run_announcer(
                        _record_fn(state, role, stage_handler, drafter, float(cfg["announce_ttl"])),
                        float(cfg["announce_ttl"]) / 3)))
        if gateway is not None:  # may wait for stages to appear: SIGTERM must still stop us meanwhile
            building = asyncio.create_task(_gateway_config(cfg, state, drafter, self_address, discovery))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({building, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not building.done():
                building.cancel()
                return
            gateway.cfg = building.result()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        layers = f" layers={stage_handler.runner.shard.start}:{stage_handler.runner.shard.end}" if stage_handler else ""
        print(f"dsd-node ready: role={state.role} model={model}{layers} listen={address}", flush=True)
        await stop.wait()
    except (RouteIncomplete, DiscoveryError, IdentityError) as e:
        print(f"dsd-node: {e}", flush=True)
        raise SystemExit(2) from e
    finally:
        for t in tasks:
            t.cancel()
        if discovery is not None:
            try:
                await asyncio.wait_for(discovery.withdraw(), 3)
            except Exception as e:  # leaving anyway: the record expires on its own
                log.info("withdraw failed: %s", e)
            await discovery.stop()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2)
        await state.channels.close()
        if emulator is not None:
            await emulator.close()
        log.info("stopped")


def measure_tokens_per_s(runner: ShardRunner, n: int = 32) -> float:
    """Throughput of this shard on a prefill of n tokens (announced; routes prefer fast nodes)."""
    sh = runner.shard
    tree = TokenTree.chain([0] * n, n_given=n)
    hidden = None if sh.is_first else torch.zeros(1, n, sh.hidden_size, dtype=sh.dtype)
    t0 = time.perf_counter()
    runner.forward("__probe__", 0, [], tree, hidden)
    runner.end_session("__probe__")
    return n / max(1e-6, time.perf_counter() - t0)


def _record_fn(state: NodeState, role: str, stage: StageHandler | None, drafter: Drafter | None, ttl_s: float):
    from dsd_node.p2p.peers import make_record

    def record():
        sh = stage.runner.shard if role == "stage" else None
        sessions = len(stage.runner.sessions) if role == "stage" else len(drafter.sessions)
        return make_record(state.peer_id, role, state.model_id if sh else drafter.model_id, state.model_hash if sh else "",
                           sh.start if sh else 0, sh.end if sh else 0, state.num_layers if sh else 0, state.address,
                           state.tokens_per_s, sessions, state.max_sessions, ttl_s)

    return record


async def _gateway_config(cfg: dict, state: NodeState, local_drafter: Drafter | None, self_address: str,
                          discovery=None) -> GatewayConfig:
    model = cfg["model"]
    tok = load_tokenizer(model)
    if cfg["drafter_addr"]:
        drafter_src = RemoteDraftSource(state.channels.get(cfg["drafter_addr"]), cfg["drafter_addr"])
    elif local_drafter is not None:
        from dsd_node.engine.local import LocalDraftSource

        if cfg["drafter"] not in (None, "self", model):
            check_same_tokenizer(tok, load_tokenizer(cfg["drafter"]), model, cfg["drafter"])
        drafter_src = LocalDraftSource(local_drafter)
    else:
        drafter_src = None
    reroute = None
    if cfg["route"]:
        addrs = [a.strip() for a in str(cfg["route"]).split(",") if a.strip()]
        addrs = [self_address if a == "self" else a for a in addrs]  # our own stage: no emulated link
        route = await route_from_addresses(addrs, state.channels, model, wait_s=float(cfg["round_timeout"]))
    elif discovery is not None:
        from dsd_node.engine.models import model_num_layers
        from dsd_node.p2p.peers import RouteFinder
        from dsd_node.p2p.routing import RouteError

        finder = RouteFinder(discovery, state.channels, model, state.model_hash, model_num_layers(model),
                             say=lambda m: print(f"dsd-node: {m}", flush=True))
        try:
            route = await finder.route(wait_s=float(cfg["route_wait"]))
        except RouteError as e:
            raise RouteIncomplete(str(e)) from e
        reroute = finder.reroute
    else:
        raise RouteIncomplete("head needs --route ADDR,ADDR,... (stage addresses, first stage first) or --bootstrap")
    print("dsd-node route: " + " -> ".join(f"{h.address}[{h.layer_start}:{h.layer_end}]" for h in route), flush=True)
    return GatewayConfig(route, tok, drafter_src, int(cfg["max_inflight"]), float(cfg["round_timeout"]), reroute)
