"""Conversions between the Python messages and the protobuf wire types, with validation of tensor bytes."""

from __future__ import annotations

import math

import torch

from dsd_node.engine.messages import Hop, RoundMsg, VerdictMsg
from dsd_node.engine.tree import SparseDist, TokenTree
from dsd_node.engine.verify import Rule, SamplingParams
from dsd_node.proto import dsd_pb2 as pb

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


class WireError(ValueError):
    """Bytes on the wire that do not decode: unknown dtype, size that does not match the shape."""


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return pb.Tensor(data=data, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape))


def tensor_from_pb(m: pb.Tensor) -> torch.Tensor:
    if m.dtype not in WIRE_DTYPES:
        raise WireError(f"unknown tensor dtype {m.dtype!r} (expected one of {', '.join(WIRE_DTYPES)})")
    dtype = WIRE_DTYPES[m.dtype]
    shape = list(m.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"negative dimension in tensor shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(m.data) != math.prod(shape) * itemsize:
        raise WireError(f"tensor bytes ({len(m.data)}) do not match shape {shape} of {m.dtype} "
                        f"({math.prod(shape) * itemsize} bytes)")
    raw = torch.frombuffer(bytearray(m.data), dtype=torch.uint8) if m.data else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def sampling_to_pb(s: SamplingParams) -> pb.Sampling:
    return pb.Sampling(rule=int(s.rule), temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                       adaptive_margin=s.adaptive_margin, adaptive_tie_margin=s.adaptive_tie_margin)


def sampling_from_pb(m: pb.Sampling) -> SamplingParams:
    if m.rule not in (r.value for r in Rule):
        raise WireError(f"unknown sampling rule {m.rule}")
    return SamplingParams(Rule(m.rule), m.temperature or 1.0, m.top_p or 1.0, m.seed, m.adaptive_margin,
                          m.adaptive_tie_margin)


def tree_to_pb(t: TokenTree) -> pb.DraftTree:
    dists = [pb.SparseDist(ids=d.ids, probs=d.probs) if d else pb.SparseDist() for d in t.draft_dists]
    return pb.DraftTree(tokens=t.tokens, parents=t.parents, n_given=t.n_given, draft_dists=dists)


def tree_from_pb(m: pb.DraftTree) -> TokenTree:
    dists = [SparseDist(list(d.ids), list(d.probs)) if d.ids else None for d in m.draft_dists]
    if any(d is not None and len(d.ids) != len(d.probs) for d in dists):
        raise WireError("a draft distribution has different numbers of ids and probabilities")
    return TokenTree(list(m.tokens), list(m.parents), m.n_given, dists)


def round_to_pb(r: RoundMsg) -> pb.Round:
    return pb.Round(
        session_id=r.session_id, round_id=r.round_id, epoch=r.epoch,
        commits=[pb.Commit(round_id=rid, keep=keep) for rid, keep in r.commits],
        base=[pb.BaseRef(round_id=rid, path=path) for rid, path in r.base],
        tree=tree_to_pb(r.tree), hidden=tensor_to_pb(r.hidden) if r.hidden is not None else None,
        sampling=sampling_to_pb(r.sampling), route=[pb.Hop(address=h.address, layer_start=h.layer_start,
                                                         layer_end=h.layer_end) for h in r.route],
        hop=r.hop, reply_to=r.reply_to)


def round_from_pb(m: pb.Round) -> RoundMsg:
    return RoundMsg(
        session_id=m.session_id, round_id=m.round_id, epoch=m.epoch,
        commits=[(c.round_id, list(c.keep)) for c in m.commits],
        base=[(b.round_id, list(b.path)) for b in m.base],
        tree=tree_from_pb(m.tree), sampling=sampling_from_pb(m.sampling),
        hidden=tensor_from_pb(m.hidden) if m.HasField("hidden") else None,
        route=[Hop(h.address, h.layer_start, h.layer_end) for h in m.route], hop=m.hop, reply_to=m.reply_to)


def verdict_to_pb(v: VerdictMsg) -> pb.Verdict:
    return pb.Verdict(session_id=v.session_id, round_id=v.round_id, epoch=v.epoch, stale=v.stale,
                      accepted=v.accepted, tokens=v.tokens, verify_ms=v.verify_ms)


def verdict_from_pb(m: pb.Verdict) -> VerdictMsg:
    return VerdictMsg(m.session_id, m.round_id, m.epoch, m.stale, list(m.accepted), list(m.tokens), m.verify_ms)
