"""The Stage service: one Forward stream per session per link.

The head opens one to the first stage; each stage opens one to the next stage of the route the round
names; the last stage opens a Verdicts stream to the gateway in `reply_to`. A session lives as long as
its stream: when the head finishes or cancels, the close cascades down the chain and every stage frees
the session. A failing stage aborts its upstream stream with the error, so the head hears of it within
one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc

from dsd_node.engine.config import ErrorCode, GenerationError
from dsd_node.engine.hop_trace import HopTrace
from dsd_node.engine.memory import MemoryReturner
from dsd_node.engine.messages import Hop, RoundMsg, VerdictMsg
from dsd_node.engine.shard_runner import SessionLimitError
from dsd_node.engine.stage import BadRound, SessionExists, StageHandler
from dsd_node.net.dialable import Dialable, NotAnnounced
from dsd_node.net.grpc_util import Channels, error_code
from dsd_node.net.mailbox import Mailbox
from dsd_node.net.metrics import NodeMetrics
from dsd_node.net.pipeline_client import StreamLink
from dsd_node.net.tls import AccessPolicy, AuthError, TlsIdentityError
from dsd_node.net.wire import NoSessionSetup, SessionSetup, WireError, round_from_pb, round_to_pb, verdict_to_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.stage")

# A round of at most INLINE_MAX_NODES tree nodes runs on the event loop itself while such rounds take under
# INLINE_MAX_MS here (a running mean): a worker thread's two hops cost more than a tiny model's forward. Longer
# rounds (a big model, a long prompt) run on a worker thread, so the loop stays free for other streams.
INLINE_MAX_NODES, INLINE_MAX_MS = 64, 20.0


class StreamAbort(Exception):
    """Ends a Forward stream with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class StageService(rpc.StageServicer):
    """session_ttl_s: a session whose stream brings no new work (a round with a tree) for this long expires;
    commit-only messages do not renew it, so a caller cannot hold a slot with them. policy / peer_id: with
    authenticated links, who may send this stage rounds (check_upstream); dialable: where rounds may send it."""

    def __init__(self, handler: StageHandler, channels: Channels, session_ttl_s: float = 30.0,
                 metrics: NodeMetrics | None = None, memory: MemoryReturner | None = None,
                 policy: AccessPolicy | None = None, dialable: Dialable | None = None, peer_id: str = ""):
        self.handler, self.channels, self.session_ttl_s = handler, channels, session_ttl_s
        self.policy, self.dialable, self.peer_id = policy, dialable or Dialable(), peer_id
        self.memory = memory or MemoryReturner()
        self.metrics = metrics or NodeMetrics()
        sh = handler.runner.shard
        self.layers = f"{sh.start}:{sh.end}"
        self.queues: set[Mailbox] = set()  # one per open Forward stream: rounds waiting for compute
        self.inline_ms = 0.0  # running mean of the time small rounds take (INLINE_MAX_MS)
        self.metrics.set_source(self.metrics.queue_length, lambda: sum(q.qsize() for q in self.queues))
        self.metrics.set_source(self.metrics.active_sessions.labels("stage"), lambda: len(handler.runner.sessions))

    def check_upstream(self, msg: RoundMsg, caller: str | None) -> None:
        """With authenticated links: the round is for this node, and comes from the head (hop 0) or from the
        peer the route names just before this one."""
        if caller is None:
            return
        if 0 <= msg.hop < len(msg.route) and msg.route[msg.hop].peer_id not in ("", self.peer_id):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"round for peer {msg.route[msg.hop].peer_id} sent to peer {self.peer_id}")
        if msg.hop > 0:
            up = msg.route[msg.hop - 1].peer_id if msg.hop - 1 < len(msg.route) else ""
            if up != caller:
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                                f"round at hop {msg.hop} from peer {caller}, not from the route's previous stage "
                                f"{up or '(unnamed)'}")

    def own_caller(self) -> str | None:
        """Who the colocated head is to check_upstream: this node itself (None when links are --insecure)."""
        return self.peer_id if self.policy is not None and self.policy.tls is not None else None

    async def Forward(self, request_iterator, context):
        stream = StageStream(self, self.policy.caller(context) if self.policy is not None else None)
        trace = self.handler.trace

        async def read() -> None:
            end: StreamAbort | None = None
            try:
                async for m in request_iterator:
                    t = time.perf_counter()
                    msg, stream.setup = round_from_pb(m, stream.setup)
                    trace.mark(msg.session_id, msg.round_id, "recv", t)
                    trace.mark(msg.session_id, msg.round_id, "decoded")
                    if not stream.admit(msg):
                        return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status (INTERNAL for the unexpected), never silent
                end = abort_for(e)
            stream.queue.put_nowait(end)  # None: the caller closed the stream

        stream.reader = asyncio.create_task(read())
        problem = await stream.serve(context.peer())
        if problem is not None:
            await context.abort(problem.code, problem.details)

    async def _handle(self, msg: RoundMsg) -> RoundMsg | VerdictMsg | None:
        t0 = time.perf_counter()
        small = len(msg.tree) <= INLINE_MAX_NODES
        try:
            if small and self.inline_ms < INLINE_MAX_MS:
                out = self.handler.handle(msg, False)
            else:
                out = await asyncio.to_thread(self.handler.handle, msg, False)
            self.handler.trace.mark(msg.session_id, msg.round_id, "handled")
            if msg.tree.tokens:
                dt = time.perf_counter() - t0
                self.metrics.stage_round(self.layers, dt)
                if small:
                    self.inline_ms = 0.8 * self.inline_ms + 0.2 * dt * 1e3
            return out
        except BadRound as e:
            raise StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        except SessionLimitError as e:
            raise StreamAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
        except Exception as e:  # a round that breaks the shard: the stream fails with a status, not silence
            raise StreamAbort(grpc.StatusCode.INTERNAL, f"round {msg.round_id} failed: {type(e).__name__}: {e}") from e

    async def _next(self, queue: Mailbox, down: StreamLink | None, expires: float) -> RoundMsg | StreamAbort | None:
        """The next message of the stream; an abort when the next stage failed or the session idled too long."""
        if await queue.wait(max(0.0, expires - time.monotonic()), down.failed if down is not None else None):
            return queue.get_nowait()
        if down is not None and down.failed.done():
            code, details = down.failed.result()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # back-pressure, not a fault of the next stage
                return StreamAbort(code, f"next stage {down.address} is full: {details}")
            return StreamAbort(grpc.StatusCode.UNAVAILABLE, f"next stage {down.address} failed: {code.name}: {details}")
        return StreamAbort(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"session expired: no new round for {self.session_ttl_s:g} s")

    async def EndSession(self, request, context):
        if not self.handler.end_session(request.session_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {request.session_id!r}")
        return pb.EndSessionReply()


def abort_for(e: Exception) -> StreamAbort:
    """The status that ends a stream whose round could not be admitted."""
    if isinstance(e, NoSessionSetup):
        return StreamAbort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    if isinstance(e, (WireError, BadRound)):
        return StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, SessionExists):
        return StreamAbort(grpc.StatusCode.ALREADY_EXISTS, str(e))
    if isinstance(e, SessionLimitError):
        return StreamAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, AuthError):
        return StreamAbort(e.code, e.details)
    return StreamAbort(grpc.StatusCode.INTERNAL, f"reading the stream failed: {type(e).__name__}: {e}")


class StageStream:
    """One session's stream into this stage, whatever carries it: a gRPC Forward call, or the in-process link of
    the head in this node (LocalStageLink). Its rounds are admitted (`admit`: the upstream check, the session,
    the epoch) and run in order (`serve`) by the same code; `setup` holds the settings the session's first round
    brought (route, hop, reply_to, sampling), which later rounds leave out."""

    def __init__(self, service: StageService, caller: str | None, transport: str = "grpc"):
        self.service, self.caller, self.transport = service, caller, transport
        self.queue: Mailbox[RoundMsg | StreamAbort | None] = Mailbox()
        self.sid: str | None = None  # the stream's session, once its first round names it
        self.closed = False  # set when serve ends: a session admitted after that is freed at once
        self.setup: SessionSetup | None = None
        self.reader: asyncio.Task | None = None  # what feeds the queue (cancelled when serve ends)

    def admit(self, msg: RoundMsg) -> bool:
        """Check a round and queue it; False when the stream ended as its first round arrived. Raises for a round
        that cannot be admitted (abort_for names the status)."""
        svc = self.service
        svc.check_upstream(msg, self.caller)
        if self.sid is None:
            if not msg.session_id:
                raise WireError("round without a session id")
            svc.handler.open_session(msg.session_id)
            self.sid = msg.session_id
            svc.metrics.stage_sessions.labels(self.transport).inc()
            if self.closed:  # the stream was cancelled as its first round arrived: nobody else frees it
                svc.handler.end_session(msg.session_id)
                log.info("session %s: its stream ended as it opened; freed", msg.session_id)
                return False
        elif msg.session_id != self.sid:
            raise WireError(f"round for session {msg.session_id!r} on the stream of session {self.sid!r}")
        svc.handler.see_epoch(self.sid, msg.epoch)  # older rounds still queued become commit-only
        self.queue.put_nowait(msg)
        return True

    async def serve(self, who: str) -> StreamAbort | None:
        """Run the stream's rounds until it ends; the problem that ended it (logged), None when the caller closed
        it. The session is freed and the next stage's stream closed on the way out, also when cancelled."""
        svc, queue, trace = self.service, self.queue, self.service.handler.trace
        out = _Outlets(svc.channels, svc.dialable, trace)
        problem: StreamAbort | None = None
        svc.queues.add(queue)
        idle_since = time.monotonic()  # the last new work: commit-only messages do not count
        cancelled = False
        try:
            while True:
                msg = await svc._next(queue, out.down, idle_since + svc.session_ttl_s)
                if msg is None:
                    break
                if isinstance(msg, StreamAbort):
                    problem = msg
                    break
                trace.mark(msg.session_id, msg.round_id, "dequeued")
                try:
                    await out.send(msg, await svc._handle(msg))
                except StreamAbort as e:
                    problem = e
                    break
                except Exception as e:  # never a silent end or a traceback to the caller: a status
                    problem = StreamAbort(grpc.StatusCode.INTERNAL, f"sending on failed: {type(e).__name__}: {e}")
                    break
                if msg.tree.tokens:
                    idle_since = time.monotonic()
        except asyncio.CancelledError:  # the caller cancelled: so does every stage after this one, at once
            cancelled = True
            raise
        finally:
            svc.queues.discard(queue)
            self.closed = True
            trace.flush()
            if self.sid is not None:  # first, before any await: a cancelled handler must still free the session
                svc.handler.end_session(self.sid)
                svc.memory.freed()
            if self.reader is not None:
                self.reader.cancel()
            await out.close(cancel=problem is not None or cancelled)
        if problem is not None:
            log.warning("session %s from %s: %s %s", self.sid, who, problem.code.name, problem.details)
        return problem


@dataclass(frozen=True)
class ColocatedStage:
    """The stage this node hosts, as its own head sees it: a route whose first hop is this node (one of its
    addresses, and its peer id where the route names one) is entered in-process (LocalStageLink)."""

    service: StageService
    addresses: frozenset[str]

    def serves(self, hop: Hop) -> bool:
        return hop.address in self.addresses and hop.peer_id in ("", self.service.peer_id)

    def link(self, hop: Hop) -> LocalStageLink:
        return LocalStageLink(self.service, hop.address)


class LocalStageLink:
    """The head's link to the first stage of its route when this node hosts that stage: rounds go to the
    StageService's stream handling as Python objects, not through protobuf and a loopback gRPC call. The same
    checks and session state as a Forward call (StageStream), from the caller this node is (own_caller); it
    fails as a StreamLink does (`failed` holds the status and details)."""

    def __init__(self, service: StageService, address: str):
        self.address = address
        self.failed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stream = StageStream(service, service.own_caller(), "in_process")
        self.trace = service.handler.trace
        self._stopped = False  # a round was refused: the stream takes no more
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        problem = await self.stream.serve("this node's head")
        if problem is not None and not self.failed.done():
            self.failed.set_result((problem.code, problem.details))

    async def write_round(self, msg: RoundMsg) -> None:
        """Admit `msg` as a Forward stream's reader would, with the settings the stream's first round brought."""
        if self.failed.done():
            code, details = self.failed.result()
            raise GenerationError(f"stage at {self.address} failed: {code.name}: {details}", error_code(code))
        if self._stopped or self.stream.closed:
            raise GenerationError(f"stage at {self.address} is closed", ErrorCode.UNAVAILABLE)
        t = time.perf_counter()
        st = self.stream
        if st.setup is None:
            st.setup = SessionSetup.of(msg)
        st.setup.apply(msg)
        self.trace.mark(msg.session_id, msg.round_id, "recv", t)
        self.trace.mark(msg.session_id, msg.round_id, "decoded")
        try:
            if not st.admit(msg):
                self._stopped = True
        except Exception as e:  # noqa: BLE001 - as the Forward reader: the stream ends with the status
            self._stopped = True
            st.queue.put_nowait(abort_for(e))
        await asyncio.sleep(0)  # the stage takes the round now, before the head's next work (a gRPC write yields too)

    async def close(self, cancel: bool = False) -> None:
        if cancel:
            self._task.cancel()
        elif not self._stopped:
            self._stopped = True
            self.stream.queue.put_nowait(None)  # as a caller's done_writing: the queued rounds still run


class _Outlets:
    """Where one stream's results go: the next stage's Forward stream, or the gateway's Verdicts stream."""

    def __init__(self, channels: Channels, dialable: Dialable, trace: HopTrace):
        self.channels, self.dialable, self.trace = channels, dialable, trace
        self.down: StreamLink | None = None
        self.setup_sent = False  # the stream to the next stage has had its first round (with the settings)
        self.verdicts = None

    async def send(self, msg: RoundMsg, out: RoundMsg | VerdictMsg | None) -> None:
        if isinstance(out, RoundMsg):
            if self.down is None:
                if out.hop >= len(out.route):
                    raise StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, "route ends before the last layer")
                nxt = out.route[out.hop]
                try:
                    await self.dialable.check(nxt.address, nxt.peer_id, "next stage", nxt.record)
                    self.down = StreamLink(nxt.address, await self.channels.get(nxt.address, nxt.peer_id or None))
                except NotAnnounced as e:
                    raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, str(e)) from e
                except TlsIdentityError as e:
                    raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, f"next stage {nxt.address}: {e}") from e
                except OSError as e:
                    raise StreamAbort(grpc.StatusCode.UNAVAILABLE, f"next stage {nxt.address} unreachable: {e}") from e
            try:
                m = round_to_pb(out, setup=not self.setup_sent)  # the next stage keeps the settings of the first
                self.setup_sent = True
                self.trace.mark(msg.session_id, msg.round_id, "encoded")
                await self.down.write(m)
            except GenerationError as e:
                raise StreamAbort(grpc.StatusCode[e.code.name], str(e)) from e
            self.trace.mark(msg.session_id, msg.round_id, "written")
        elif isinstance(out, VerdictMsg):
            try:
                if self.verdicts is None:
                    await self.dialable.check(msg.reply_to, "", "reply_to", msg.reply_record)
                    self.verdicts = rpc.GatewayStub(await self.channels.get(msg.reply_to)).Verdicts()
                m = verdict_to_pb(out)
                self.trace.mark(msg.session_id, msg.round_id, "encoded")
                await self.verdicts.write(m)
            except NotAnnounced as e:
                raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, str(e)) from e
            except TlsIdentityError as e:
                raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, f"gateway {msg.reply_to}: {e}") from e
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, OSError) as e:
                raise StreamAbort(grpc.StatusCode.UNAVAILABLE, f"gateway {msg.reply_to} unreachable: {e}") from e
            self.trace.mark(msg.session_id, msg.round_id, "written")

    async def close(self, cancel: bool) -> None:
        if self.down is not None:
            await self.down.close(cancel=cancel)
        if self.verdicts is not None:
            if cancel:
                self.verdicts.cancel()
                return
            with contextlib.suppress(Exception):
                await self.verdicts.done_writing()
