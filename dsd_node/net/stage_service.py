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

import grpc

from dsd_node.engine.config import GenerationError
from dsd_node.engine.messages import RoundMsg, VerdictMsg
from dsd_node.engine.shard_runner import SessionLimitError
from dsd_node.engine.stage import BadRound, StageHandler
from dsd_node.net.dialable import Dialable, NotAnnounced
from dsd_node.net.grpc_util import Channels
from dsd_node.net.pipeline_client import StreamLink
from dsd_node.net.tls import AccessPolicy, AuthError, TlsIdentityError
from dsd_node.net.wire import WireError, round_from_pb, round_to_pb, verdict_to_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.stage")


class StreamAbort(Exception):
    """Ends a Forward stream with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class StageService(rpc.StageServicer):
    def __init__(self, handler: StageHandler, channels: Channels, session_ttl_s: float = 300.0,
                 policy: AccessPolicy | None = None, dialable: Dialable | None = None, peer_id: str = ""):
        self.handler, self.channels, self.session_ttl_s = handler, channels, session_ttl_s
        self.policy, self.dialable, self.peer_id = policy, dialable or Dialable(), peer_id

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

    async def Forward(self, request_iterator, context):
        queue: asyncio.Queue[RoundMsg | StreamAbort | None] = asyncio.Queue()
        sid: list[str] = []  # the stream's session, once its first round names it
        caller = self.policy.caller(context) if self.policy is not None else None

        async def read() -> None:
            try:
                async for m in request_iterator:
                    msg = round_from_pb(m)
                    self.check_upstream(msg, caller)
                    if not sid:
                        if not msg.session_id:
                            raise WireError("round without a session id")
                        self.handler.open_session(msg.session_id)
                        sid.append(msg.session_id)
                    elif msg.session_id != sid[0]:
                        raise WireError(f"round for session {msg.session_id!r} on the stream of session {sid[0]!r}")
                    self.handler.see_epoch(sid[0], msg.epoch)  # older rounds still queued become commit-only
                    queue.put_nowait(msg)
                queue.put_nowait(None)
            except WireError as e:
                queue.put_nowait(StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            except SessionLimitError as e:
                queue.put_nowait(StreamAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)))
            except AuthError as e:
                queue.put_nowait(StreamAbort(e.code, e.details))

        reader = asyncio.create_task(read())
        out = _Outlets(self.channels, self.dialable)
        problem: StreamAbort | None = None
        try:
            while True:
                msg = await self._next(queue, out.down)
                if msg is None:
                    break
                if isinstance(msg, StreamAbort):
                    problem = msg
                    break
                try:
                    await out.send(msg, await self._handle(msg))
                except StreamAbort as e:
                    problem = e
                    break
        finally:
            if sid:  # first, before any await: a cancelled handler must still free the session
                self.handler.end_session(sid[0])
            reader.cancel()
            await out.close(cancel=problem is not None)
        if problem is not None:
            log.warning("session %s: %s %s", sid[0] if sid else None, problem.code.name, problem.details)
            await context.abort(problem.code, problem.details)

    async def _handle(self, msg: RoundMsg) -> RoundMsg | VerdictMsg | None:
        try:
            return await asyncio.to_thread(self.handler.handle, msg, False)
        except BadRound as e:
            raise StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        except SessionLimitError as e:
            raise StreamAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e

    async def _next(self, queue: asyncio.Queue, down: StreamLink | None) -> RoundMsg | StreamAbort | None:
        """The next message of the stream; an abort when the next stage failed or the session idled too long."""
        get = asyncio.ensure_future(queue.get())
        waits = {get, down.failed} if down is not None else {get}
        done, _ = await asyncio.wait(waits, timeout=self.session_ttl_s, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if down is not None and down.failed.done():
            code, details = down.failed.result()
            return StreamAbort(grpc.StatusCode.UNAVAILABLE, f"next stage {down.address} failed: {code.name}: {details}")
        return StreamAbort(grpc.StatusCode.DEADLINE_EXCEEDED, f"session idle for {self.session_ttl_s:.0f} s: expired")

    async def EndSession(self, request, context):
        if not self.handler.end_session(request.session_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {request.session_id!r}")
        return pb.EndSessionReply()


class _Outlets:
    """Where one stream's results go: the next stage's Forward stream, or the gateway's Verdicts stream."""

    def __init__(self, channels: Channels, dialable: Dialable):
        self.channels, self.dialable = channels, dialable
        self.down: StreamLink | None = None
        self.verdicts = None

    async def send(self, msg: RoundMsg, out: RoundMsg | VerdictMsg | None) -> None:
        if isinstance(out, RoundMsg):
            if self.down is None:
                if out.hop >= len(out.route):
                    raise StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, "route ends before the last layer")
                nxt = out.route[out.hop]
                try:
                    await self.dialable.check(nxt.address, nxt.peer_id, "next stage")
                    self.down = StreamLink(nxt.address, await self.channels.get(nxt.address, nxt.peer_id or None))
                except NotAnnounced as e:
                    raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, str(e)) from e
                except TlsIdentityError as e:
                    raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, f"next stage {nxt.address}: {e}") from e
                except OSError as e:
                    raise StreamAbort(grpc.StatusCode.UNAVAILABLE, f"next stage {nxt.address} unreachable: {e}") from e
            try:
                await self.down.write(round_to_pb(out))
            except GenerationError as e:
                raise StreamAbort(grpc.StatusCode[e.code.name], str(e)) from e
        elif isinstance(out, VerdictMsg):
            try:
                if self.verdicts is None:
                    await self.dialable.check(msg.reply_to, "", "reply_to")
                    self.verdicts = rpc.GatewayStub(await self.channels.get(msg.reply_to)).Verdicts()
                await self.verdicts.write(verdict_to_pb(out))
            except NotAnnounced as e:
                raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, str(e)) from e
            except TlsIdentityError as e:
                raise StreamAbort(grpc.StatusCode.PERMISSION_DENIED, f"gateway {msg.reply_to}: {e}") from e
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, OSError) as e:
                raise StreamAbort(grpc.StatusCode.UNAVAILABLE, f"gateway {msg.reply_to} unreachable: {e}") from e

    async def close(self, cancel: bool) -> None:
        if self.down is not None:
            await self.down.close(cancel=cancel)
        if self.verdicts is not None:
            with contextlib.suppress(Exception):
                await self.verdicts.done_writing()
