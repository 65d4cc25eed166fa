"""The Gateway service of a head node: Generate (client-facing, with failover) and Verdicts (from last stages).

A generation runs one pipeline session at a time. When a session fails with a code that another route
could cure (a stage down or stuck), the gateway asks for a new route and replays the committed text
there, so the output is unchanged; errors that another route cannot cure end the call with their code.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import grpc

from dsd_node.engine.config import ErrorCode, GenerationConfig, GenerationError, Stats
from dsd_node.engine.head import DraftSource, Head
from dsd_node.engine.messages import Hop, RoundMsg
from dsd_node.engine.models import check_context
from dsd_node.engine.tree import TokenTree
from dsd_node.net.audit import Auditor, IntegrityError
from dsd_node.net.grpc_util import Channels
from dsd_node.net.pipeline_client import GrpcPipeline
from dsd_node.net.tls import AccessPolicy, AuthError, TlsIdentityError
from dsd_node.net.wire import generation_config_from_pb, stats_to_pb, verdict_from_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.gateway")

MAX_FAILOVERS = 3
RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED}  # another route may succeed


@dataclass
class GatewayConfig:
    route: list[Hop]
    tokenizer: object
    drafter: DraftSource | None
    default_max_inflight: int = 0  # 0: one round in flight per stage of the route
    round_timeout_s: float = 60.0
    reroute: Callable[[list[Hop]], Awaitable[list[Hop]]] | None = None  # failover (with discovery)
    max_positions: int | None = None  # the target's context: prompt + max_new_tokens must fit
    auditor: Auditor | None = None  # verified outputs: re-runs a sample of rounds on independent replicas


class GatewayService(rpc.GatewayServicer):
    """`cfg` is None until the node has built its route; Generate says so meanwhile."""

    def __init__(self, address: str, channels: Channels, cfg: GatewayConfig | None = None,
                 policy: AccessPolicy | None = None):
        self.address, self.channels, self.cfg, self.policy = address, channels, cfg, policy
        self.sessions: dict[str, asyncio.Queue] = {}
        self.last_stage: dict[str, str] = {}  # session -> peer id of its route's last stage (who may send verdicts)

    @property
    def route(self) -> list[Hop]:
        return list(self.cfg.route) if self.cfg is not None else []

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

        streamed: list[int] = []  # tokens sent to the client (what a session cut short by verification resumes from)

        async def emit(new: list[int], head: Head) -> None:
            """Stream newly committed tokens with the text they add (decoded in context, so merges stay right);
            with an auditor, a sampled round is verified first (IntegrityError: its tokens are never sent)."""
            nonlocal sent
            out = head.trimmed()
            auditor = self.cfg.auditor
            if auditor is not None and auditor.should_check(self.cfg.route, len(out) == len(new), gcfg.sampling):
                await auditor.check(self.cfg.route, ids + prior + out[: len(out) - len(new)], new, gcfg.sampling)
            streamed.extend(new)
            text = tok.decode(prior + out)
            await context.write(pb.GenerateEvent(tokens=new, text=text[sent:]))
            sent = len(text)

        while True:
            left = replace(gcfg, max_new_tokens=gcfg.max_new_tokens - len(prior))
            head, failure = await self._run_session(ids + prior, left, emit)
            if head is not None:
                stats.add(head.stats)
                prior += head.trimmed()
            if isinstance(failure, IntegrityError):
                prior = list(streamed)  # regenerate from the last verified text
            if failure is None or len(prior) >= gcfg.max_new_tokens or (
                    head is not None and head.eos is not None and head.eos in prior):
                break
            if failure.code not in RETRYABLE or self.cfg.reroute is None or stats.failovers >= MAX_FAILOVERS:
                await context.abort(grpc.StatusCode[failure.code.name], str(failure))
            try:
                self.cfg.route = await self.cfg.reroute(self.cfg.route)
            except ValueError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{failure}; no route left: {e}")
            stats.failovers += 1
            log.warning("failover %d: %s; replaying %d committed tokens on %s", stats.failovers, failure,
                        len(ids) + len(prior), " -> ".join(h.address for h in self.cfg.route))
        stats.new_tokens, stats.wall_ms = len(prior), (time.perf_counter() - t0) * 1e3
        await context.write(pb.GenerateEvent(stats=stats_to_pb(stats)))

    async def _run_session(self, prompt: list[int], gcfg: GenerationConfig, emit
                           ) -> tuple[Head | None, GenerationError | None]:
        """One pipeline session; returns the head (None if the first stage could not be reached) and the failure."""
        sid = uuid.uuid4().hex
        route = self.cfg.route
        try:
            channel = await self.channels.get(route[0].address, route[0].peer_id or None)
        except (OSError, TlsIdentityError) as e:  # unreachable, or not the peer the route names: try another route
            return None, GenerationError(f"first stage {route[0].address}: {e}", ErrorCode.UNAVAILABLE)
        verdicts: asyncio.Queue = asyncio.Queue()
        self.sessions[sid] = verdicts
        self.last_stage[sid] = route[-1].peer_id
        pipe = GrpcPipeline(sid, route, self.address, channel, verdicts, self.cfg.round_timeout_s)
        head = Head(sid, pipe, self.cfg.drafter, gcfg, self.cfg.tokenizer.eos_token_id, None, pipeline_depth=len(route))
        head.on_tokens = lambda new: emit(new, head)
        failure = None
        try:
            await head.run(prompt)
        except GenerationError as e:
            failure = e
        finally:
            self.sessions.pop(sid, None)
            self.last_stage.pop(sid, None)
            await pipe.close(cancel=failure is not None)
            end = getattr(self.cfg.drafter, "end_session", None)
            if end is not None:
                await end(sid)
        return head, failure

    async def replay(self, route: list[Hop], context: list[int], tokens: list[int], sampling) -> list[int]:
        """The tokens `route` commits when `tokens` are drafted after `context` (one round, a prefill): the
        auditor's independent opinion on a round."""
        sid = uuid.uuid4().hex
        verdicts: asyncio.Queue = asyncio.Queue()
        self.sessions[sid], self.last_stage[sid] = verdicts, route[-1].peer_id
        pipe = None
        try:
            channel = await self.channels.get(route[0].address, route[0].peer_id or None)
            pipe = GrpcPipeline(sid, route, self.address, channel, verdicts, self.cfg.round_timeout_s)
            tree = TokenTree.chain(context + tokens[:-1], n_given=len(context))
            await pipe.send(RoundMsg(sid, 0, 0, tree=tree, sampling=sampling))
            return (await pipe.recv()).tokens
        except (OSError, GenerationError) as e:  # an unreachable replica gives no opinion
            log.warning("verification replay on %s failed: %s", route[0].address, e)
            return []
        finally:
            self.sessions.pop(sid, None)
            self.last_stage.pop(sid, None)
            if pipe is not None:
                await pipe.close()

    async def Verdicts(self, request_iterator, context):
        try:
            caller = self.policy.caller(context) if self.policy is not None else None
        except AuthError as e:
            await context.abort(e.code, e.details)
        async for m in request_iterator:
            q = self.sessions.get(m.session_id)
            if q is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {m.session_id!r}")
            want = self.last_stage.get(m.session_id, "")
            if caller is not None and caller != want:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"verdict from peer {caller}, not from the session's last stage {want or '(unnamed)'}")
            q.put_nowait(verdict_from_pb(m))
        return pb.VerdictAck()
