"""The node daemon's gRPC services: Stage (Forward streams), Drafter, Gateway (Generate + Verdicts), Node (Info), health.

One Forward stream per session per link: the head opens one to the first stage; each stage opens
one to the next stage of the route the round names; the last stage opens a Verdicts stream to the
gateway in `reply_to`. A session lives as long as its stream: when the head finishes or cancels,
the close cascades down the chain and every stage frees the session. A failing stage aborts its
upstream stream with the error, so the head hears of it within one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dsd_node import __version__
from dsd_node.engine.drafter import Drafter, DraftRequest
from dsd_node.engine.head import GenerationConfig, GenerationError, Head, Stats
from dsd_node.engine.messages import Hop, RoundMsg, VerdictMsg
from dsd_node.engine.shard_runner import SessionLimitError
from dsd_node.engine.stage import BadRound, StageHandler
from dsd_node.engine.verify import Rule, SamplingParams
from dsd_node.net.pipeline_client import GRPC_OPTIONS, GrpcPipeline, StreamLink, rpc_error_text
from dsd_node.net.wire import (
    WireError,
    round_from_pb,
    round_to_pb,
    sampling_from_pb,
    tree_to_pb,
    verdict_from_pb,
    verdict_to_pb,
)
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.node")


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


@dataclass
class NodeState:
    """What every service of one node shares."""

    role: str
    address: str
    model_id: str = ""
    model_hash: str = ""
    num_layers: int = 0
    max_sessions: int = 64
    session_ttl_s: float = 300.0
    peer_id: str = ""
    tokens_per_s: float = 0.0
    channels: Channels = field(default_factory=Channels)


class StageService(rpc.StageServicer):
    def __init__(self, state: NodeState, handler: StageHandler):
        self.state, self.handler = state, handler
        self.runner = handler.runner

    async def Forward(self, request_iterator, context):
        queue: asyncio.Queue[RoundMsg | None] = asyncio.Queue()
        sid: str | None = None
        problem: list[tuple[grpc.StatusCode, str]] = []

        async def read() -> None:
            nonlocal sid
            try:
                async for m in request_iterator:
                    msg = round_from_pb(m)
                    if sid is None:
                        sid = msg.session_id
                        if not sid:
                            raise WireError("round without a session id")
                        self.runner.session(sid)  # may raise SessionLimitError
                    elif msg.session_id != sid:
                        raise WireError(f"round for session {msg.session_id!r} on the stream of session {sid!r}")
                    sess = self.runner.sessions.get(sid)
                    if sess is not None:  # a newer epoch makes the older rounds still queued commit-only
                        sess.epoch = max(sess.epoch, msg.epoch)
                    queue.put_nowait(msg)
            except WireError as e:
                problem.append((grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            except SessionLimitError as e:
                problem.append((grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)))
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        down: StreamLink | None = None
        verdicts = None
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                waits = {get, down.failed} if down is not None else {get}
                done, _ = await asyncio.wait(waits, timeout=self.state.session_ttl_s, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if down is not None and down.failed.done():
                        code, details = down.failed.result()
                        problem.append((grpc.StatusCode.UNAVAILABLE, f"next stage {down.address} failed: {code.name}: {details}"))
                    else:
                        problem.append((grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"session {sid} idle for {self.state.session_ttl_s:.0f} s: expired"))
                    break
                msg = get.result()
                if msg is None:
                    break
                try:
                    out = await asyncio.to_thread(self.handler.handle, msg, False)
                except BadRound as e:
                    problem.append((grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                    break
                except SessionLimitError as e:
                    problem.append((grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)))
                    break
                if isinstance(out, RoundMsg):
                    if down is None:
                        if out.hop >= len(out.route):
                            problem.append((grpc.StatusCode.INVALID_ARGUMENT, "route ends before the last layer"))
                            break
                        nxt = out.route[out.hop].address
                        down = StreamLink(nxt, self.state.channels.get(nxt))
                    try:
                        await down.write(round_to_pb(out))
                    except GenerationError as e:
                        problem.append((grpc.StatusCode.UNAVAILABLE, str(e)))
                        break
                elif isinstance(out, VerdictMsg):
                    try:
                        if verdicts is None:
                            verdicts = rpc.GatewayStub(self.state.channels.get(msg.reply_to)).Verdicts()
                        await verdicts.write(verdict_to_pb(out))
                    except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
                        problem.append((grpc.StatusCode.UNAVAILABLE, f"gateway {msg.reply_to} unreachable: {e}"))
                        break
        finally:
            if sid is not None:  # first, before any await: a cancelled handler must still free the session
                self.runner.end_session(sid)
            reader.cancel()
            if down is not None:
                await down.close(cancel=bool(problem))
            if verdicts is not None:
                with contextlib.suppress(Exception):
                    await verdicts.done_writing()
        if problem:
            code, details = problem[0]
            log.warning("session %s: %s %s", sid, code.name, details)
            await context.abort(code, details)

    async def EndSession(self, request, context):
        if not self.runner.end_session(request.session_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {request.session_id!r}")
        return pb.EndSessionReply()


class DrafterService(rpc.DrafterServicer):
    def __init__(self, drafter: Drafter):
        self.drafter = drafter

    async def Draft(self, request, context):
        if not request.context:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "draft request with an empty context")
        if not 1 <= request.depth <= 64:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "draft depth must be between 1 and 64")
        if any(not 0 <= t < self.drafter.vocab_size for t in request.context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context token outside the vocabulary")
        req = DraftRequest(list(request.context), request.depth, request.branch, request.branch_depth,
                           sampling_from_pb(request.sampling), request.max_nodes)
        d = await asyncio.to_thread(self.drafter.draft, request.session_id or "anonymous", req)
        return pb.DraftReply(tree=tree_to_pb(d.tree), main_path=d.main_path, draft_ms=d.draft_ms)

    async def EndSession(self, request, context):
        if not self.drafter.end_session(request.session_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {request.session_id!r}")
        return pb.EndSessionReply()


@dataclass
class GatewayConfig:
    route: list[Hop]
    tokenizer: object
    drafter: object | None  # a DraftSource
    default_max_inflight: int = 0  # 0: one round in flight per stage of the route
    round_timeout_s: float = 60.0
    reroute: Callable[[list[Hop]], Awaitable[list[Hop]]] | None = None  # failover (with discovery)


def _status_of(failure: str) -> grpc.StatusCode:
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
        if code.name in failure:
            return code
    return grpc.StatusCode.UNAVAILABLE


class GatewayService(rpc.GatewayServicer):
    def __init__(self, state: NodeState, cfg: GatewayConfig | None):
        self.state, self.cfg = state, cfg
        self.sessions: dict[str, asyncio.Queue] = {}

    def _config(self, req: pb.GenerateRequest) -> GenerationConfig:
        s = sampling_from_pb(req.sampling)  # WireError (a ValueError) for an unknown rule
        sampling = SamplingParams.create(s.temperature if s.rule == Rule.SAMPLE else 0.0, s.top_p, s.seed,
                                         s.rule == Rule.ADAPTIVE, s.adaptive_margin, s.adaptive_tie_margin)
        return GenerationConfig(mode=req.mode or "si", max_new_tokens=req.max_new_tokens or 64,
                                draft_k=req.draft_k or 4, max_inflight=req.max_inflight or self.cfg.default_max_inflight,
                                sampling=sampling, ignore_eos=req.ignore_eos, branch=req.branch,
                                branch_depth=req.branch_depth, max_nodes=req.max_nodes)

    async def Generate(self, request, context):
        if self.cfg is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is still building its route; retry shortly")
        try:
            gcfg = self._config(request)
            gcfg.validate()
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        tok = self.cfg.tokenizer
        ids = list(request.prompt_tokens) or tok(request.prompt)["input_ids"]
        if not ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
        if any(not 0 <= t < len(tok) for t in ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt token outside the vocabulary")
        if gcfg.mode != "ar" and self.cfg.drafter is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"mode {gcfg.mode} needs a drafter; this gateway has none")
        t0 = time.perf_counter()
        prior: list[int] = []  # tokens committed before a failover
        stats = Stats(gcfg.mode)
        failovers = 0
        sent = 0  # characters of text streamed so far

        async def emit(new: list[int], head: Head) -> None:
            """Stream newly committed tokens with the text they add (decoded in context, so merges stay right)."""
            nonlocal sent
            text = tok.decode(prior + head.trimmed())
            await context.write(pb.GenerateEvent(tokens=new, text=text[sent:]))
            sent = len(text)

        while True:
            head, failure = await self._run_session(ids + prior, replace(gcfg, max_new_tokens=gcfg.max_new_tokens - len(prior)),
                                                    emit)
            stats.add(head.stats)
            prior += head.trimmed()
            if failure is None or len(prior) >= gcfg.max_new_tokens or (head.eos is not None and head.eos in prior):
                break
            if self.cfg.reroute is None or failovers >= 3:
                await context.abort(_status_of(failure), failure)
            try:
                self.cfg.route = await self.cfg.reroute(self.cfg.route)
            except ValueError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{failure}; no route left: {e}")
            failovers += 1
            log.warning("failover %d: %s; replaying %d committed tokens on %s", failovers, failure, len(ids) + len(prior),
                        " -> ".join(h.address for h in self.cfg.route))
        stats.new_tokens, stats.wall_ms = len(prior), (time.perf_counter() - t0) * 1e3
        await context.write(pb.GenerateEvent(stats=pb.Stats(
            rounds=stats.rounds, rounds_wasted=stats.rounds_wasted, accepted_per_round=stats.accepted_per_round,
            tokens_per_s=stats.tokens_per_s, ms_per_token=stats.ms_per_token, new_tokens=stats.new_tokens,
            inflight=stats.inflight, mode=stats.mode, draft_ms=stats.draft_ms, wall_ms=stats.wall_ms,
            failovers=failovers)))

    async def _run_session(self, prompt: list[int], gcfg: GenerationConfig, emit) -> tuple[Head, str | None]:
        """One pipeline session; returns the head and the failure, if any."""
        sid = uuid.uuid4().hex
        verdicts: asyncio.Queue = asyncio.Queue()
        self.sessions[sid] = verdicts
        route = self.cfg.route
        pipe = GrpcPipeline(sid, route, self.state.address, self.state.channels.get(route[0].address), verdicts,
                            self.cfg.round_timeout_s)
        head = Head(sid, pipe, self.cfg.drafter, gcfg, self.cfg.tokenizer.eos_token_id, None, pipeline_depth=len(route))
        head.on_tokens = lambda new: emit(new, head)
        failure = None
        try:
            await head.run(prompt)
        except GenerationError as e:
            failure = str(e)
        finally:
            self.sessions.pop(sid, None)
            await pipe.close(cancel=failure is not None)
            end = getattr(self.cfg.drafter, "end_session", None)
            if end is not None:
                await end(sid)
        return head, failure

    async def Verdicts(self, request_iterator, context):
        async for m in request_iterator:
            q = self.sessions.get(m.session_id)
            if q is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {m.session_id!r}")
            q.put_nowait(verdict_from_pb(m))
        return pb.VerdictAck()


class NodeService(rpc.NodeServicer):
    def __init__(self, state: NodeState, stage: StageHandler | None, drafter: Drafter | None):
        self.state, self.stage, self.drafter = state, stage, drafter

    async def Info(self, request, context):
        st = self.state
        sh = self.stage.runner.shard if self.stage else None
        sessions = len(self.stage.runner.sessions) if self.stage else len(self.drafter.sessions) if self.drafter else 0
        return pb.NodeInfo(role=st.role, model=st.model_id, model_hash=st.model_hash,
                           layer_start=sh.start if sh else 0, layer_end=sh.end if sh else 0,
                           num_layers=st.num_layers, version=__version__, sessions=sessions,
                           max_sessions=st.max_sessions, peer_id=st.peer_id, address=st.address,
                           tokens_per_s=st.tokens_per_s, dtype=str(sh.dtype).removeprefix("torch.") if sh else "")


async def query_info(channel: grpc.aio.Channel, timeout: float = 5.0) -> pb.NodeInfo:
    return await rpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=timeout)


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


def make_server(max_message_mb: int) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    opts = [("grpc.max_receive_message_length", max_message_mb << 20), ("grpc.max_send_message_length", 256 << 20),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]
    server = grpc.aio.server(options=opts)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    return server, hs
