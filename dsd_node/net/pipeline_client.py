"""The head's side of the network pipeline: one Forward stream to the first stage per session, verdicts
arriving on the gateway's Verdicts service (remote drafters: drafter_pool.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc

from dsd_node.engine.config import ErrorCode, GenerationError
from dsd_node.engine.hop_trace import HopTrace
from dsd_node.engine.messages import Hop, RoundMsg, VerdictMsg
from dsd_node.net.deadline import AdaptiveDeadline
from dsd_node.net.grpc_util import error_code
from dsd_node.net.mailbox import Mailbox
from dsd_node.net.wire import round_to_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc


class StreamLink:
    """A Forward stream to one stage for one session: writes rounds, and notices when the stream fails."""

    def __init__(self, address: str, channel: grpc.aio.Channel):
        self.address = address
        self.call = rpc.StageStub(channel).Forward()
        self.failed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._watch = asyncio.create_task(self._watch_replies())

    async def _watch_replies(self) -> None:
        try:
            async for _ in self.call:
                pass
            status = await self.call.code()
            if status != grpc.StatusCode.OK and not self.failed.done():
                self.failed.set_result((status, await self.call.details()))
        except grpc.aio.AioRpcError as e:
            if not self.failed.done():
                self.failed.set_result((e.code(), e.details()))
        except asyncio.CancelledError:
            pass

    async def write(self, msg: pb.Round) -> None:
        if self.failed.done():
            code, details = self.failed.result()
            raise GenerationError(f"stage at {self.address} failed: {code.name}: {details}", error_code(code))
        try:
            await self.call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            raise GenerationError(f"stage at {self.address} is unreachable: {e}") from e

    async def close(self, cancel: bool = False) -> None:
        if cancel:
            self.call.cancel()
        else:
            try:
                await self.call.done_writing()
            except Exception:
                self.call.cancel()
        self._watch.cancel()


class GrpcPipeline:
    """The Pipeline of a head session over the network (see dsd_node.engine.head.Pipeline).

    A verdict is awaited for the deadline of the oldest round still waiting for one (an AdaptiveDeadline: a
    multiple of recent round times). When it passes, `silent()` names the stages of the route that do not
    answer now: if any, the round fails at once (a hung stage costs seconds); if all answer (a slow, loaded
    stage), the wait goes on, deadline by deadline, up to the deadline's cap."""

    async_send = True  # send returns once the round is written to the first stage (see engine.head.Pipeline)

    def __init__(self, session_id: str, route: list[Hop], reply_to: str, channel: grpc.aio.Channel | None,
                 verdicts: Mailbox, round_timeout_s: float = 60.0, deadline: AdaptiveDeadline | None = None,
                 silent: Callable[[], Awaitable[list[str]]] | None = None,
                 on_round_trip: Callable[[float], None] | None = None, reply_record: bytes = b"",
                 trace: HopTrace | None = None, local_link=None):
        """route's hops may carry their signed discovery records and reply_record the head's: the first round
        takes them to the stages, with the route and the sampling settings (a SessionSetup), which the stages
        keep for the session's later rounds; they dial only announced peers (dsd_node.net.dialable).
        local_link (a stage_service.LocalStageLink, instead of channel): the first stage is in this process."""
        self.session_id, self.reply_to = session_id, reply_to
        self.route = [replace(h, record=b"") for h in route]
        self._first: tuple[list[Hop], bytes] | None = (route, reply_record)
        self.verdicts = verdicts
        self.deadline = deadline or AdaptiveDeadline(cap_s=round_timeout_s, floor_s=min(3.0, round_timeout_s))
        self.silent = silent
        self.local = local_link
        self.link = local_link if local_link is not None else StreamLink(route[0].address, channel)
        self._waiting: dict[int, tuple[float, int]] = {}  # round id -> (sent at, tree nodes), in send order
        self._grace_until = 0.0  # the stages answered at the last deadline: wait on until then
        self.on_round_trip = on_round_trip  # seconds from a round's send to its verdict (metrics)
        self.trace = trace or HopTrace(None, "head")

    async def send(self, msg: RoundMsg) -> None:
        self.trace.mark(self.session_id, msg.round_id, "send")
        msg.route, msg.hop, msg.reply_to = self.route, 0, self.reply_to
        first = self._first is not None
        if first:
            msg.route, msg.reply_record = self._first
            self._first = None
        if len(msg.tree):  # a commit-only message gets no verdict
            self._waiting[msg.round_id] = (time.monotonic(), len(msg.tree))
        if self.local is not None:
            self.trace.mark(self.session_id, msg.round_id, "encoded")
            await self.local.write_round(msg)
        else:
            m = round_to_pb(msg, setup=first)  # later rounds: the stage kept the first round's settings
            self.trace.mark(self.session_id, msg.round_id, "encoded")
            await self.link.write(m)
        self.trace.mark(self.session_id, msg.round_id, "written")

    def _timeout(self) -> float:
        if not self._waiting:
            return self.deadline.cap_s
        now = time.monotonic()
        due = min(t + self.deadline.deadline_s(n) for t, n in self._waiting.values())
        return max(0.0, max(due, self._grace_until) - now)

    def _answered(self, round_id: int) -> None:
        sent = self._waiting.pop(round_id, None)
        for rid in [r for r in self._waiting if r < round_id]:  # older rounds given up: no verdict will come
            del self._waiting[rid]
        if sent is not None:
            self.deadline.observe(time.monotonic() - sent[0], sent[1])
            if self.on_round_trip is not None:
                self.on_round_trip(time.monotonic() - sent[0])

    async def recv(self) -> VerdictMsg:
        while True:
            timeout = self._timeout()
            if await self.verdicts.wait(timeout, self.link.failed):
                v = self.verdicts.get_nowait()
                self._answered(v.round_id)
                self.trace.mark(self.session_id, v.round_id, "verdict")
                return v
            if self.link.failed.done():
                code, details = self.link.failed.result()
                raise GenerationError(f"pipeline failed: {code.name}: {details}", error_code(code))
            now = time.monotonic()
            oldest = min((t for t, _ in self._waiting.values()), default=now)
            waited = now - oldest
            if self.silent is None or waited >= self.deadline.cap_s:
                raise GenerationError(f"no verdict within {waited:.1f} s: a stage is stuck or unreachable",
                                      ErrorCode.DEADLINE_EXCEEDED)
            silent = await self.silent()
            if silent:
                raise GenerationError(f"no verdict within {waited:.1f} s and no Info reply from {', '.join(silent)}",
                                      ErrorCode.DEADLINE_EXCEEDED)
            n = max((n for _, n in self._waiting.values()), default=1)  # all alive, only slow: wait on
            self._grace_until = min(oldest + self.deadline.cap_s, time.monotonic() + self.deadline.deadline_s(n))

    async def close(self, cancel: bool = False) -> None:
        await self.link.close(cancel)
