"""The Gateway service of a head node: Generate (client-facing, with failover) and Verdicts (from last stages).

A generation runs one pipeline session at a time. When a session fails with a code that another route
could cure (a stage down or stuck), the gateway excludes the culprit for a while (exponential backoff,
dsd_node.net.exclusion), asks for a new route and replays the committed text there, so the output is
unchanged; errors that another route cannot cure end the call with their code. The culprit is the deepest
stage an error names; when none is named, the stages that do not answer an Info probe now. Overload
(RESOURCE_EXHAUSTED) is back-pressure: another route may be tried, nobody is excluded. When no verdict
comes within a multiple of recent round times (dsd_node.net.deadline), the route's stages are probed: one
that does not answer fails the round at once (a hung stage costs seconds); a slow one is waited for.

With an auditor (dsd_node.net.audit) a sample of rounds is re-run on independent replicas before its tokens
are sent: a round the replicas disagree with is never streamed, its peers are banned, and the generation
resumes from the last text sent on a route around them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import astuple, dataclass, field, replace

import grpc

from dsd_node.engine.config import ErrorCode, GenerationConfig, GenerationError, Stats
from dsd_node.engine.head import DraftSource, Head
from dsd_node.engine.hop_trace import HopTrace
from dsd_node.engine.limits import Limits
from dsd_node.engine.messages import Hop, RoundMsg
from dsd_node.engine.speculation import PolicyMemory
from dsd_node.engine.tree import TokenTree
from dsd_node.net.admission import Admission, Busy
from dsd_node.net.audit import Auditor, IntegrityError
from dsd_node.net.deadline import AdaptiveDeadline
from dsd_node.net.exclusion import Exclusions
from dsd_node.net.grpc_util import Channels, query_info
from dsd_node.net.mailbox import Mailbox
from dsd_node.net.metrics import NodeMetrics
from dsd_node.net.pipeline_client import GrpcPipeline
from dsd_node.net.stage_service import ColocatedStage
from dsd_node.net.tls import AccessPolicy, AuthError
from dsd_node.net.wire import ExcludedPeer, WireError, generation_config_from_pb, stats_to_pb, verdict_from_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.gateway")

MAX_FAILOVERS = 3
RETRYABLE = {ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED}  # another route may succeed
Emit = Callable[[list[int], str], Awaitable[None]]  # new tokens and the text they add


class StopGeneration(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an `emit` callback to end its generation early (a stop sequence was seen): not a failure."""
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
    limits: Limits = field(default_factory=Limits)  # per-request caps, session slots and the queue
    exclusions: Exclusions = field(default_factory=Exclusions)  # shared with the route finder and drafters
    round_floor_s: float = 3.0  # the shortest round deadline (round_timeout_s is the longest)
    deadline: AdaptiveDeadline | None = None  # made from the two above; shared by all sessions
    auditor: Auditor | None = None  # verified outputs: re-runs a sample of rounds on independent replicas

    def __post_init__(self):
        if self.deadline is None:
            self.deadline = AdaptiveDeadline(cap_s=self.round_timeout_s,
                                             floor_s=min(self.round_floor_s, self.round_timeout_s))


class GatewayService(rpc.GatewayServicer):
    """`cfg` is None until the node has built its route; Generate says so meanwhile."""

    def __init__(self, address: str, channels: Channels, cfg: GatewayConfig | None = None,
                 metrics: NodeMetrics | None = None, policy: AccessPolicy | None = None):
        self.address, self.channels, self.cfg, self.policy = address, channels, cfg, policy
        self.sessions: dict[str, Mailbox] = {}
        self.last_stage: dict[str, str] = {}  # session -> peer id of its route's last stage (who may send verdicts)
        self.reply_record: Callable[[], bytes] = bytes  # this head's signed record for reply_to (with discovery)
        self.metrics = metrics or NodeMetrics()
        self.heads: set[Head] = set()  # sessions running now (their rounds in flight are a gauge)
        self.active = 0  # generations running now
        self.metrics.set_source(self.metrics.rounds_in_flight, lambda: sum(len(h.inflight) for h in self.heads))
        self.metrics.set_source(self.metrics.active_sessions.labels("head"), lambda: self.active)
        self._admission: Admission | None = None
        self.trace = HopTrace.from_env("head")  # per-round timestamps (DSD_HOP_TRACE; hop_profile)
        self.dsi_memory = PolicyMemory()  # dsi: what each route's sessions measured, for the next one on it
        self.colocated: ColocatedStage | None = None  # this node's own stage: entered in-process when first in a route

    @property
    def route(self) -> list[Hop]:
        return list(self.cfg.route) if self.cfg is not None else []

    @property
    def admission(self) -> Admission:
        if self._admission is None:
            lim = self.cfg.limits
            self._admission = Admission(lim.max_sessions, lim.queue_size, lim.queue_timeout_s, lim.max_client_sessions)
        return self._admission
    def excluded(self) -> list[ExcludedPeer]:
        if self.cfg is None:
            return []
        ex = self.cfg.exclusions
        return [ExcludedPeer(e.peer, e.reason, ex.remaining_s(e.peer), e.failures) for e in ex.active()]

    async def Generate(self, request, context):
        try:
            gcfg = generation_config_from_pb(request, self.cfg.default_max_inflight if self.cfg else 0)
        except ValueError as e:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

        async def emit(tokens: list[int], text: str) -> None:
            await context.write(pb.GenerateEvent(tokens=tokens, text=text))

        try:
            ids = list(request.prompt_tokens) or self.encode(request.prompt)
            stats = await self.generate(ids, gcfg, emit, client_identity(context))
        except GenerationError as e:
            await refuse(context, grpc.StatusCode[e.code.name], str(e))
        await context.write(pb.GenerateEvent(stats=stats_to_pb(stats)))

    def encode(self, prompt: str) -> list[int]:
        if self.cfg is None:
            raise GenerationError("gateway is still building its route; retry shortly")
        return self.cfg.tokenizer(prompt)["input_ids"]

    async def generate(self, ids: list[int], gcfg: GenerationConfig, emit: Emit, client: str = "") -> Stats:
        """Generate from prompt token ids, calling `emit(new_tokens, new_text)` as rounds commit; the generation's
        Stats. The in-process entry point of the gRPC Generate call and the HTTP API; GenerationError (with the
        code to answer) when the request is bad or the network cannot serve it. `client` counts against the
        per-client session quota; a request waits in the admission queue while every slot is taken."""
        if self.cfg is None:
            raise GenerationError("gateway is still building its route; retry shortly")
        tok = self.cfg.tokenizer
        if not ids:
            raise GenerationError("empty prompt", ErrorCode.INVALID_ARGUMENT)
        if any(not 0 <= t < len(tok) for t in ids):
            raise GenerationError("prompt token outside the vocabulary", ErrorCode.INVALID_ARGUMENT)
        try:
            self.cfg.limits.check_generation(len(ids), gcfg, self.cfg.max_positions)
        except ValueError as e:
            raise GenerationError(str(e), ErrorCode.INVALID_ARGUMENT) from None
        if gcfg.mode != "ar" and self.cfg.drafter is None:
            raise GenerationError(f"mode {gcfg.mode} needs a drafter; this gateway has none", ErrorCode.FAILED_PRECONDITION)
        try:
            async with self.admission.slot(client):
                return await self._generate(ids, gcfg, emit)
        except Busy as e:
            raise GenerationError(str(e), ErrorCode.RESOURCE_EXHAUSTED) from None

    async def _generate(self, ids: list[int], gcfg: GenerationConfig, emit: Emit) -> Stats:
        tok = self.cfg.tokenizer
        t0 = time.perf_counter()
        prior: list[int] = []  # tokens committed before a failover
        streamed: list[int] = []  # tokens sent to the caller (where a round caught by verification resumes)
        stats = Stats(gcfg.mode)
        sent = 0  # characters of text streamed so far
        last: list[float] = []  # when the last tokens were emitted
        stopped = False  # emit asked to stop
        backoff = 0.1  # seconds before retrying a session that a full stage refused
        self.metrics.generation_started(len(ids))
        self.active += 1

        async def on_tokens(new: list[int], head: Head) -> None:
            """Stream newly committed tokens with the text they add (decoded in context, so merges stay right);
            with an auditor, a sampled round is verified first (IntegrityError: its tokens are never sent)."""
            nonlocal sent, stopped
            out = head.trimmed()
            auditor = self.cfg.auditor
            if auditor is not None and auditor.should_check(self.cfg.route, len(out) == len(new), gcfg.sampling):
                await auditor.check(self.cfg.route, ids + prior + out[: len(out) - len(new)], new, gcfg.sampling)
            now = time.perf_counter()
            self.metrics.tokens_emitted(gcfg.mode, len(new), now - t0, now - last[0] if last else None)
            last[:] = [now]
            streamed.extend(new)
            text = tok.decode(prior + out)
            try:
                await emit(new, text[sent:])
            except StopGeneration:
                stopped = True
                raise
            sent = len(text)

        outcome = "ok"
        try:
            while True:
                left = replace(gcfg, max_new_tokens=gcfg.max_new_tokens - len(prior))
                head, failure, route = await self._run_session(ids + prior, left, on_tokens)
                if head is not None:
                    stats.add(head.stats)
                    prior += head.trimmed()
                if isinstance(failure, IntegrityError):
                    prior = list(streamed)  # regenerate from the last verified text
                eos = head.eos if head is not None else None
                if failure is None or stopped or len(prior) >= gcfg.max_new_tokens or (eos is not None and eos in prior):
                    break
                if failure.code == ErrorCode.RESOURCE_EXHAUSTED:  # a stage is full: back-pressure, not a fault
                    waited = time.perf_counter() - t0
                    if waited >= self.cfg.limits.queue_timeout_s:
                        raise GenerationError(f"{failure} (retried for {waited:.0f} s, the queue deadline)",
                                              ErrorCode.RESOURCE_EXHAUSTED) from None
                    await asyncio.sleep(min(backoff, self.cfg.limits.queue_timeout_s - waited))
                    backoff = min(2 * backoff, 2.0)
                    continue
                if failure.code not in RETRYABLE or self.cfg.reroute is None or stats.failovers >= MAX_FAILOVERS:
                    raise failure
                await self._blame(failure, route)
                try:
                    ex = self.cfg.exclusions
                    if self.cfg.route == route or any(ex.is_excluded(h.address) for h in self.cfg.route):
                        self.cfg.route = await self.cfg.reroute(route)
                except Exception as e:  # noqa: BLE001 - RouteError, a failed DHT lookup: never an UNKNOWN to the client
                    raise GenerationError(f"{failure}; no route left: {e}", ErrorCode.UNAVAILABLE) from None
                stats.failovers += 1
                log.warning("failover %d: %s; replaying %d committed tokens on %s", stats.failovers, failure,
                            len(ids) + len(prior), " -> ".join(h.address for h in self.cfg.route))
        except GenerationError as e:
            outcome = e.code.name
            raise
        except BaseException:  # the caller went away (cancelled, or its emit failed)
            outcome = "cancelled"
            raise
        finally:
            self.active -= 1
            stats.new_tokens, stats.wall_ms = len(prior), (time.perf_counter() - t0) * 1e3
            self.metrics.generation_finished(stats, outcome)
        return stats

    async def _blame(self, failure: GenerationError, route: list[Hop]) -> list[str]:
        """Exclude the stages that caused `failure` (with backoff); returns their addresses."""
        text = str(failure)
        if OVERLOAD in text or isinstance(failure, IntegrityError):  # back-pressure; or the auditor banned them
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
        answers = await asyncio.gather(*(self._answers(h) for h in route))
        return [h.address for h, ok in zip(route, answers, strict=True) if not ok]

    async def _answers(self, hop: Hop) -> bool:
        try:
            await query_info(await self.channels.get(hop.address, hop.peer_id or None), timeout=PROBE_TIMEOUT_S)
            return True
        except (grpc.aio.AioRpcError, OSError):  # OSError: unreachable, or not the peer the route names
            return False

    async def _run_session(self, prompt: list[int], gcfg: GenerationConfig,
                           emit) -> tuple[Head | None, GenerationError | None, list[Hop]]:
        """One pipeline session; returns the head (None when the first stage could not be reached), the failure
        (if any) and the route it took."""
        sid = uuid.uuid4().hex
        route = self.cfg.route
        try:
            pipe = await self._open_pipeline(sid, route, on_round_trip=self.metrics.round_trip.observe,
                                             trace=self.trace)
        except OSError as e:  # unreachable, or not the peer the route names (TlsIdentityError): another route
            return None, GenerationError(f"first stage {route[0].address}: {e}", ErrorCode.UNAVAILABLE), route
        key = (tuple(h.address for h in route), gcfg.draft_k, astuple(gcfg.tree))
        policy = self.dsi_memory.policy(key, gcfg.min_valid_prob, len(route))
        head = Head(sid, pipe, self.cfg.drafter, gcfg, self.cfg.tokenizer.eos_token_id, None, pipeline_depth=len(route),
                    policy=policy)
        head.on_tokens = lambda new: emit(new, head)
        failure = None
        finished = False
        self.heads.add(head)
        try:
            await head.run(prompt)
            finished = True
        except GenerationError as e:
            failure = e
        except StopGeneration:
            pass  # the caller has what it wants; the pipeline is cancelled below
        finally:
            self.heads.discard(head)
            if gcfg.mode == "dsi":
                self.dsi_memory.keep(key, policy)
            self._forget(sid)
            self.trace.flush()
            await pipe.close(cancel=not finished)
            end = getattr(self.cfg.drafter, "end_session", None)
            if end is not None:
                await end(sid)
        if failure is None:
            for h in route:
                self.cfg.exclusions.forgive(h.address)
        return head, failure, route

    async def replay(self, route: list[Hop], context: list[int], tokens: list[int], sampling) -> list[int]:
        """The tokens `route` commits when `tokens` are drafted after `context` (one round, a prefill): the
        auditor's independent opinion on a round ([] when that route gives none)."""
        sid = uuid.uuid4().hex
        pipe = None
        try:
            pipe = await self._open_pipeline(sid, route)
            tree = TokenTree.chain(context + tokens[:-1], n_given=len(context))
            await pipe.send(RoundMsg(sid, 0, 0, tree=tree, sampling=sampling))
            return (await pipe.recv()).tokens
        except (OSError, GenerationError) as e:  # an unreachable replica gives no opinion
            log.warning("verification replay on %s failed: %s", route[0].address, e)
            return []
        finally:
            self._forget(sid)
            if pipe is not None:
                await pipe.close()

    async def _open_pipeline(self, sid: str, route: list[Hop], **kw) -> GrpcPipeline:
        """A pipeline session on `route` whose verdicts this gateway takes only from the route's last stage
        (`_forget` ends that). OSError: the first stage is unreachable, or not the peer the route names."""
        local = self.colocated.link(route[0]) if self.colocated and self.colocated.serves(route[0]) else None
        channel = None if local else await self.channels.get(route[0].address, route[0].peer_id or None)
        verdicts = Mailbox()
        self.sessions[sid], self.last_stage[sid] = verdicts, route[-1].peer_id
        return GrpcPipeline(sid, route, self.address, channel, verdicts, self.cfg.round_timeout_s, self.cfg.deadline,
                            silent=lambda: self._silent(route), reply_record=self.reply_record(), local_link=local, **kw)

    def _forget(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self.last_stage.pop(sid, None)

    async def Verdicts(self, request_iterator, context):
        try:
            caller = self.policy.caller(context) if self.policy is not None else None
        except AuthError as e:
            await refuse(context, e.code, e.details)
        try:
            async for m in request_iterator:
                self.trace.mark(m.session_id, m.round_id, "verdict_in")
                q = self.sessions.get(m.session_id)
                if q is None:
                    await refuse(context, grpc.StatusCode.NOT_FOUND, f"unknown session id {m.session_id!r}")
                want = self.last_stage.get(m.session_id, "")
                if caller is not None and caller != want:
                    await refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                                 f"verdict from peer {caller}, not from the session's last stage {want or '(unnamed)'}")
                q.put_nowait(verdict_from_pb(m))
        except WireError as e:
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.VerdictAck()


async def refuse(context, code: grpc.StatusCode, details: str) -> None:
    """End a call with `code`, after one log line (no traceback)."""
    log.warning("refused a call from %s: %s %s", context.peer(), code.name, details)
    await context.abort(code, details)


def client_identity(context) -> str:
    """Who a request counts against for the per-client quota: the `dsd-client` metadata, else the peer's host."""
    for key, value in context.invocation_metadata() or ():
        if key == "dsd-client" and value:
            return str(value)[:128]
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
