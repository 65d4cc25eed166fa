"""The small services: Drafter (draft trees for a remote head) and Node (Info: what this node is)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from dsd_node.engine.drafter import Drafter
from dsd_node.net.wire import NodeInfo, WireError, draft_request_from_pb, draft_to_pb, node_info_to_pb
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc


class DrafterService(rpc.DrafterServicer):
    def __init__(self, drafter: Drafter):
        self.drafter = drafter

    async def Draft(self, request, context):
        try:
            req = draft_request_from_pb(request, self.drafter.vocab_size)
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        d = await asyncio.to_thread(self.drafter.draft, request.session_id or "anonymous", req)
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
