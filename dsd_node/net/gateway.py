"""The Gateway service of a head node: Generate (client-facing, with failover) and Verdicts (from last stages).

A generation runs one pipeline session at a time. When a session fails with a code that another route
could cure (a stage down or stuck), the gateway excludes the culprit for a while (exponential backoff,
dsd_node.net.exclusion), asks for a new route and replays the committed text there, so the output is
unchanged; errors that another route cannot cure end the call with their code. The culprit is the deepest
stage an error names; when none is named, the stages that do not answer an Info probe now. Overload
(RESOURCE_EXHAUSTED) is back-pressure: another route may be tried, nobody is excluded. When no verdict
comes within a multiple of recent round times (dsd_node.net.deadline), the route's stages are probed: one
that does not answer fails the round at once (a hung stage costs seconds); a slow one is waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc

from dsd_node.engine.config import ErrorCode, GenerationConfig, GenerationError, Stats
from dsd_node.engine.head import DraftSource, Head
from dsd_node.engine.messages import Hop
from dsd_node.engine.models import check_context
from dsd_node.net.deadline import AdaptiveDeadline
from dsd_node.net.exclusion import Exclusions
from dsd_node.net.grpc_util import Channels, query_info
from dsd_node.net.pipeline_client import GrpcPipeline
from dsd_node.net.wire import ExcludedPeer, generation_config_from_pb, stats_to_pb, verdict_from_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.gateway")

MAX_FAILOVERS = 3
RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED}  # another route may succeed
PROBE_TIMEOUT_S = 1.0  # after a failed round: a stage that does not answer Info within this is excluded
OVERLOAD = "RESOURCE_EXHAUSTED"


@dataclass
class GatewayConfig:
    route: list[Hop]
    tokenizer: object
    drafter: DraftSource | None
    default_max_inflight: int = 0  # 0: one round in flight per stage of the route
    round_timeout_s: float = 60.0
    reroute: Callable[[list[Hop]], Awaitable[list[Hop]]] | None = None  # failover (with discovery)
    max_positions: int | None = None  # the target's context: prompt + max_new_tokens must fit
    exclusions: Exclusions = field(default_factory=Exclusions)  # shared with the route finder and drafters
    round_floor_s: float = 3.0  # the shortest round deadline (round_timeout_s is the longest)
    deadline: AdaptiveDeadline | None = None  # made from the two above; shared by all sessions

    def __post_init__(self):
        if self.deadline is None:
            self.deadline = AdaptiveDeadline(cap_s=self.round_timeout_s,
                                             floor_s=min(self.round_floor_s, self.round_timeout_s))


class GatewayService(rpc.GatewayServicer):
    """`cfg` is None until the node has built its route; Generate says so meanwhile."""

    def __init__(self, address: str, channels: Channels, cfg: GatewayConfig | None = None):
        self.address, self.channels, self.cfg = address, channels, cfg
        self.sessions: dict[str, asyncio.Queue] = {}

    @property
    def route(self) -> list[Hop]:
        return list(self.cfg.route) if self.cfg is not None else []

    def excluded(self) -> list[ExcludedPeer]:
        if self.cfg is None:
            return []
        ex = self.cfg.exclusions
        return [ExcludedPeer(e.peer, e.reason, ex.remaining_s(e.peer), e.failures) for e in ex.active()]

    async def Generate(self, request, context):
        if self.cfg is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is still building its route; retry shortly")
        try:
            gcfg = generation_config_from_pb(request, self.cfg.default_max_inflight)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        tok = self.cfg.tokenizer
        ids = list(request.prompt_tokens) or tok(request.prompt)["input_ids"]
        if not ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
        if any(not 0 <= t < len(tok) for t in ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt token outside the vocabulary")
        try:
            check_context(len(ids), gcfg.max_new_tokens, self.cfg.max_positions)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if gcfg.mode != "ar" and self.cfg.drafter is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"mode {gcfg.mode} needs a drafter; this gateway has none")
        t0 = time.perf_counter()
        prior: list[int] = []  # tokens committed before a failover
        stats = Stats(gcfg.mode)
        sent = 0  # characters of text streamed so far

        async def emit(new: list[int], head: Head) -> None:
            """Stream newly committed tokens with the text they add (decoded in context, so merges stay right)."""
            nonlocal sent
            text = tok.decode(prior + head.trimmed())
            await context.write(pb.GenerateEvent(tokens=new, text=text[sent:]))
            sent = len(text)

        while True:
            left = replace(gcfg, max_new_tokens=gcfg.max_new_tokens - len(prior))
            head, failure, route = await self._run_session(ids + prior, left, emit)
            stats.add(head.stats)
            prior += head.trimmed()
            if failure is None or len(prior) >= gcfg.max_new_tokens or (head.eos is not None and head.eos in prior):
                break
            if failure.code not in RETRYABLE or self.cfg.reroute is None or stats.failovers >= MAX_FAILOVERS:
                await context.abort(grpc.StatusCode[failure.code.name], str(failure))
            await self._blame(failure, route)
            try:
                ex = self.cfg.exclusions
                if self.cfg.route == route or any(ex.is_excluded(h.address) for h in self.cfg.route):
                    self.cfg.route = await self.cfg.reroute(route)
            except Exception as e:  # noqa: BLE001 - RouteError, a failed DHT lookup: never an UNKNOWN to the client
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{failure}; no route left: {e}")
            stats.failovers += 1
            log.warning("failover %d: %s; replaying %d committed tokens on %s", stats.failovers, failure,
                        len(ids) + len(prior), " -> ".join(h.address for h in self.cfg.route))
        stats.new_tokens, stats.wall_ms = len(prior), (time.perf_counter() - t0) * 1e3
        await context.write(pb.GenerateEvent(stats=stats_to_pb(stats)))

    async def _blame(self, failure: GenerationError, route: list[Hop]) -> list[str]:
        """Exclude the stages that caused `failure` (with backoff); returns their addresses."""
        text = str(failure)
        if OVERLOAD in text:  # back-pressure relayed by a stage: try again elsewhere, exclude nobody
            return []
        named = [(text.rfind(h.address), h.address) for h in route if h.address in text]
        if named:  # each stage relays the error of the next one: the last address named is the deepest
            culprits = [max(named)[1]]
        else:
            culprits = await self._silent(route)
            if not culprits and failure.code == ErrorCode.UNAVAILABLE:
                culprits = [route[0].address]  # the first stage ended the stream itself: it fails rounds
        for a in culprits:
            self.cfg.exclusions.exclude(a, text)
            log.warning("excluding %s for %.0f s: %s", a, self.cfg.exclusions.remaining_s(a), text)
        return culprits

    async def _silent(self, route: list[Hop]) -> list[str]:
        """The stages of `route` that do not answer an Info probe now."""
        answers = await asyncio.gather(*(self._answers(h.address) for h in route))
        return [h.address for h, ok in zip(route, answers, strict=True) if not ok]

    async def _answers(self, address: str) -> bool:
        try:
            await query_info(self.channels.get(address), timeout=PROBE_TIMEOUT_S)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def _run_session(self, prompt: list[int], gcfg: GenerationConfig,
                           emit) -> tuple[Head, GenerationError | None, list[Hop]]:
        """One pipeline session; returns the head, the failure (if any) and the route it took."""
        sid = uuid.uuid4().hex
        verdicts: asyncio.Queue = asyncio.Queue()
        self.sessions[sid] = verdicts
        route = self.cfg.route
        pipe = GrpcPipeline(sid, route, self.address, self.channels.get(route[0].address), verdicts,
                            self.cfg.round_timeout_s, self.cfg.deadline, silent=lambda: self._silent(route))
        head = Head(sid, pipe, self.cfg.drafter, gcfg, self.cfg.tokenizer.eos_token_id, None, pipeline_depth=len(route))
        head.on_tokens = lambda new: emit(new, head)
        failure = None
        try:
            await head.run(prompt)
        except GenerationError as e:
            failure = e
        finally:
            self.sessions.pop(sid, None)
            await pipe.close(cancel=failure is not None)
            end = getattr(self.cfg.drafter, "end_session", None)
            if end is not None:
                await end(sid)
        if failure is None:
            for h in route:
                self.cfg.exclusions.forgive(h.address)
        return head, failure, route

    async def Verdicts(self, request_iterator, context):
        async for m in request_iterator:
            q = self.sessions.get(m.session_id)
            if q is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {m.session_id!r}")
            q.put_nowait(verdict_from_pb(m))
        return pb.VerdictAck()
