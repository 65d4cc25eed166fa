"""The small services: Drafter (draft trees for a remote head) and Node (Info: what this node is)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from dsd_node.engine.drafter import Drafter
from dsd_node.engine.limits import LimitError, Limits
from dsd_node.engine.models import max_positions
from dsd_node.net.wire import NodeInfo, draft_request_from_pb, draft_to_pb, node_info_to_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

log = logging.getLogger("dsd.drafter")


class DrafterService(rpc.DrafterServicer):
    """Checks every draft request against the limits (a drafter cannot trust its caller either)."""

    def __init__(self, drafter: Drafter, limits: Limits | None = None):
        self.drafter = drafter
        self.limits = limits or Limits(max_sessions=drafter.max_sessions)
        self.positions = max_positions(drafter.shard)

    async def Draft(self, request, context):
        try:
            req = draft_request_from_pb(request, self.drafter.vocab_size)
            self.limits.check_shape(req.depth, req.tree)
            ctx = self.limits.context(self.positions)
            if ctx is not None and len(req.context) + req.depth > ctx:
                raise LimitError(f"context of {len(req.context)} tokens + draft depth {req.depth} exceed the "
                                 f"drafter's {ctx} positions")
        except ValueError as e:
            log.warning("refused a draft from %s: INVALID_ARGUMENT %s", context.peer(), e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            d = await asyncio.to_thread(self.drafter.draft, request.session_id or "anonymous", req)
        except Exception as e:  # one line and a status, never a traceback to the caller
            log.warning("draft for session %s failed: %s: %s", request.session_id, type(e).__name__, e)
            await context.abort(grpc.StatusCode.INTERNAL, f"draft failed: {type(e).__name__}: {e}")
        return draft_to_pb(d)

    async def EndSession(self, request, context):
        if not self.drafter.end_session(request.session_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session id {request.session_id!r}")
        return pb.EndSessionReply()


class NodeService(rpc.NodeServicer):
    """Info answers with what `describe` says now (sessions, a head's route)."""

    def __init__(self, describe: Callable[[], NodeInfo]):
        self.describe = describe

    async def Info(self, request, context):
        return node_info_to_pb(self.describe())
