"""A head's drafters: every drafter it knows (given addresses and those found through discovery), tried in
turn, each failed one excluded with backoff. When none answers, `draft` raises DrafterUnavailable and the
head sends that round without a draft (as in ar): a failed drafter never fails over the stages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc

from dsd_node.engine.config import ErrorCode, GenerationError
from dsd_node.engine.drafter import Draft, DraftRequest
from dsd_node.engine.head import DrafterUnavailable
from dsd_node.net.deadline import AdaptiveDeadline
from dsd_node.net.exclusion import Exclusions
from dsd_node.net.grpc_util import Channels, rpc_error_text
from dsd_node.net.wire import draft_from_pb, draft_request_to_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.drafters")

REFRESH_S = 30.0  # look drafters up again at most this often (and sooner, when none is usable)


class DrafterPool:
    """A DraftSource over remote drafter nodes. `find`: the addresses of the drafters announced now."""

    def __init__(self, channels: Channels, addresses: list[str], exclusions: Exclusions,
                 find: Callable[[], Awaitable[list[str]]] | None = None, deadline: AdaptiveDeadline | None = None):
        self.channels, self.exclusions, self.find = channels, exclusions, find
        self.static = list(addresses)
        self.found: list[str] = []
        self.deadline = deadline or AdaptiveDeadline(cap_s=60.0, floor_s=3.0)
        self.preferred: str | None = None  # the drafter that answered last: asked first
        self._used: dict[str, set[str]] = {}  # session -> drafters that hold its state
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    @property
    def addresses(self) -> list[str]:
        return list(dict.fromkeys(self.static + self.found))

    def candidates(self) -> list[str]:
        out = [a for a in self.addresses if not self.exclusions.is_excluded(a)]
        if self.preferred in out:
            out.remove(self.preferred)
            out.insert(0, self.preferred)
        return out

    async def refresh(self) -> None:
        """Look the announced drafters up now (a failed lookup keeps the last list)."""
        if self.find is None:
            return
        self._refreshed_at = time.monotonic()
        try:
            self.found = await self.find()
        except Exception as e:  # a DHT query that times out must never stop a generation
            log.warning("looking up drafters failed (%s); keeping %d known", e, len(self.found))

    def _refresh_soon(self, force: bool = False) -> None:
        if self.find is None or (self._refreshing is not None and not self._refreshing.done()):
            return
        since = time.monotonic() - self._refreshed_at
        if since >= REFRESH_S or (force and since >= 2.0):
            self._refreshing = asyncio.create_task(self.refresh())

    async def draft(self, session_id: str, req: DraftRequest) -> Draft:
        self._refresh_soon()
        tried: list[str] = []
        for addr in self.candidates():
            fresh = addr not in self._used.get(session_id, ())  # it reads the whole context first
            size = len(req.context) + req.depth if fresh else req.depth
            timeout = self.deadline.deadline_s(size)
            t0 = time.perf_counter()
            try:
                r = await rpc.DrafterStub(await self.channels.get(addr)).Draft(draft_request_to_pb(session_id, req),
                                                                              timeout=timeout)
            except (grpc.aio.AioRpcError, OSError) as e:  # OSError: unreachable, or fails the TLS identity check
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                why = rpc_error_text(e) if isinstance(e, grpc.aio.AioRpcError) else f"UNAVAILABLE: {e}"
                if code == grpc.StatusCode.INVALID_ARGUMENT:  # the request itself is bad: no drafter will take it
                    raise GenerationError(f"drafter at {addr} refused the request: {why}",
                                          ErrorCode.INVALID_ARGUMENT) from e
                tried.append(f"{addr}: {why}")
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # overload is back-pressure, not a fault
                    ex = self.exclusions.exclude(addr, f"draft failed: {why}")
                    log.warning("drafter %s excluded for %.0f s: %s", addr, self.exclusions.remaining_s(addr),
                                ex.reason)
                continue
            seconds = time.perf_counter() - t0
            self.deadline.observe(seconds, size)
            self.exclusions.forgive(addr)
            self.preferred = addr
            self._used.setdefault(session_id, set()).add(addr)
            return replace(draft_from_pb(r), draft_ms=seconds * 1e3)
        self._refresh_soon(force=True)
        known = ", ".join(self.addresses) or "none known"
        raise DrafterUnavailable(f"no drafter reachable ({'; '.join(tried) or 'all excluded: ' + known})")

    async def end_session(self, session_id: str) -> None:
        """Free the session on the drafters that drafted for it (in the background: a hung one must not stall)."""
        for addr in self._used.pop(session_id, set()):
            t = asyncio.create_task(self._end(addr, session_id))
            self._background.add(t)
            t.add_done_callback(self._background.discard)

    async def _end(self, addr: str, session_id: str) -> None:
        try:
            channel = await self.channels.get(addr)
            await rpc.DrafterStub(channel).EndSession(pb.SessionRef(session_id=session_id), timeout=5)
        except (grpc.aio.AioRpcError, OSError):
            pass
