"""Every conversion between Python types and the protobuf wire types, in one place, with validation.

Rounds, verdicts, tensors (bytes checked against dtype and shape), sampling settings, generation
configs, draft requests and replies, stats and node info. Dataclasses whose fields mirror a message
one to one (TreeShape, Stats) are converted field by field, so a new field needs no code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from dsd_node.engine.config import GenerationConfig, Stats, TreeShape
from dsd_node.engine.drafter import Draft, DraftRequest
from dsd_node.engine.messages import Hop, RoundMsg, VerdictMsg
from dsd_node.engine.tree import SparseDist, TokenTree
from dsd_node.engine.verify import Rule, SamplingParams
from dsd_node.proto import dsd_pb2 as pb

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
MAX_TENSOR_DIMS, MAX_TENSOR_DIM = 8, 1 << 31  # sizes no message of 256 MB can fill, and no view overflows


class WireError(ValueError):
    """Bytes on the wire that do not decode: unknown dtype, size that does not match the shape."""


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    """A tensor's raw bytes (native little-endian layout, 2 bytes per bf16/fp16 value), from any device.

    This is where hidden states leave their device: one copy to host memory, only to be serialized.
    bfloat16 has no numpy dtype, so its bytes are read through a uint8 view (bit-exact)."""
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise WireError(f"cannot send a {t.dtype} tensor (wire dtypes: {', '.join(WIRE_DTYPES)})")
    t = t.detach().to("cpu").contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return pb.Tensor(data=data, dtype=name, shape=list(t.shape))


def tensor_from_pb(m: pb.Tensor) -> torch.Tensor:
    dtype = WIRE_DTYPES.get(m.dtype)
    if dtype is None:
        raise WireError(f"unknown tensor dtype {m.dtype!r} (expected one of {', '.join(WIRE_DTYPES)})")
    shape = list(m.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"negative dimension in tensor shape {shape}")
    if len(shape) > MAX_TENSOR_DIMS or any(d > MAX_TENSOR_DIM for d in shape):
        raise WireError(f"tensor shape {shape} is out of bounds (at most {MAX_TENSOR_DIMS} dimensions of at most "
                        f"{MAX_TENSOR_DIM} each)")
    itemsize = ITEMSIZE[dtype]
    data = m.data
    if len(data) != math.prod(shape) * itemsize:
        raise WireError(f"tensor bytes ({len(data)}) do not match shape {shape} of {m.dtype} "
                        f"({math.prod(shape) * itemsize} bytes)")
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)  # one copy: a writable buffer of its own


def sampling_to_pb(s: SamplingParams) -> pb.Sampling:
    return pb.Sampling(rule=int(s.rule), temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                       adaptive_margin=s.adaptive_margin, adaptive_tie_margin=s.adaptive_tie_margin)


def sampling_from_pb(m: pb.Sampling) -> SamplingParams:
    if m.rule not in (r.value for r in Rule):
        raise WireError(f"unknown sampling rule {m.rule}")
    if not (math.isfinite(m.temperature) and m.temperature >= 0):
        raise WireError(f"temperature must be a finite number >= 0, got {m.temperature}")
    if not 0 <= m.top_p <= 1:  # false for NaN too; 0 means unset (1)
        raise WireError(f"top_p must be in (0, 1], got {m.top_p}")
    for name in ("adaptive_margin", "adaptive_tie_margin"):
        if not 0 <= getattr(m, name) <= 1:
            raise WireError(f"{name} must be in [0, 1], got {getattr(m, name)}")
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


@dataclass(frozen=True)
class SessionSetup:
    """What a session's stream brings once, with its first round (pb.SessionSetup): the route, this stage's hop
    in it, where verdicts go, and the sampling settings. A stage keeps it for the stream's later rounds."""

    route: list[Hop]
    hop: int
    reply_to: str
    reply_record: bytes = field(compare=False, repr=False)  # as Hop.record: a repeat may leave the records out
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @classmethod
    def of(cls, r: RoundMsg) -> SessionSetup:
        """The settings a round brings."""
        return cls(r.route, r.hop, r.reply_to, r.reply_record, r.sampling)

    def apply(self, r: RoundMsg) -> RoundMsg:
        """`r` with these settings (a later round of the stream, which left them out)."""
        r.route, r.hop, r.reply_to, r.reply_record, r.sampling = (self.route, self.hop, self.reply_to,
                                                                   self.reply_record, self.sampling)
        return r


class NoSessionSetup(WireError):
    """A round of a session whose settings this stage does not hold (its first round brought none)."""


def session_setup_to_pb(r: RoundMsg) -> pb.SessionSetup:
    return pb.SessionSetup(route=[hop_to_pb(h) for h in r.route], hop=r.hop, reply_to=r.reply_to,
                           reply_record=r.reply_record, sampling=sampling_to_pb(r.sampling))


def session_setup_from_pb(m: pb.SessionSetup) -> SessionSetup:
    return SessionSetup([hop_from_pb(h) for h in m.route], m.hop, m.reply_to, m.reply_record,
                        sampling_from_pb(m.sampling))


def round_to_pb(r: RoundMsg, setup: bool = True) -> pb.Round:
    """setup: the round carries the session's settings (its route, hop, reply_to and sampling): a stream's first
    round must; later rounds of the stream leave them out (the receiving stage kept them)."""
    return pb.Round(
        session_id=r.session_id, round_id=r.round_id, epoch=r.epoch,
        commits=[pb.Commit(round_id=rid, keep=keep) for rid, keep in r.commits],
        base=[pb.BaseRef(round_id=rid, path=path) for rid, path in r.base],
        tree=tree_to_pb(r.tree), hidden=tensor_to_pb(r.hidden) if r.hidden is not None else None,
        setup=session_setup_to_pb(r) if setup else None)


def round_from_pb(m: pb.Round, setup: SessionSetup | None) -> tuple[RoundMsg, SessionSetup]:
    """The round, with the settings it carries, else with `setup` (the settings its stream's first round brought);
    and the settings it ran with. NoSessionSetup when it has none; WireError when it changes them."""
    if m.HasField("setup"):
        mine = session_setup_from_pb(m.setup)
        if setup is not None and mine != setup:
            raise WireError(f"round {m.round_id} of session {m.session_id!r} changes the session's settings "
                            "(route, hop, reply_to or sampling): they are fixed by its first round")
        setup = mine
    elif setup is None:
        raise NoSessionSetup(f"round {m.round_id} of session {m.session_id!r} brings no session settings and this "
                             "stage holds none for it (a session's first round carries its route and sampling)")
    msg = RoundMsg(
        session_id=m.session_id, round_id=m.round_id, epoch=m.epoch,
        commits=[(c.round_id, list(c.keep)) for c in m.commits],
        base=[(b.round_id, list(b.path)) for b in m.base],
        tree=tree_from_pb(m.tree), hidden=tensor_from_pb(m.hidden) if m.HasField("hidden") else None)
    return setup.apply(msg), setup


def verdict_to_pb(v: VerdictMsg) -> pb.Verdict:
    return pb.Verdict(session_id=v.session_id, round_id=v.round_id, epoch=v.epoch, stale=v.stale,
                      accepted=v.accepted, tokens=v.tokens, verify_ms=v.verify_ms)


def verdict_from_pb(m: pb.Verdict) -> VerdictMsg:
    return VerdictMsg(m.session_id, m.round_id, m.epoch, m.stale, list(m.accepted), list(m.tokens), m.verify_ms)


def hop_to_pb(h: Hop) -> pb.Hop:
    return pb.Hop(address=h.address, layer_start=h.layer_start, layer_end=h.layer_end, peer_id=h.peer_id,
                  record=h.record)


def hop_from_pb(m: pb.Hop) -> Hop:
    return Hop(m.address, m.layer_start, m.layer_end, m.peer_id, m.record)


def tree_shape_to_pb(s: TreeShape) -> pb.TreeShape:
    return pb.TreeShape(**{f.name: getattr(s, f.name) for f in fields(TreeShape)})


def tree_shape_from_pb(m: pb.TreeShape) -> TreeShape:
    return TreeShape(**{f.name: getattr(m, f.name) for f in fields(TreeShape)})


def generate_request_to_pb(prompt: str | list[int], cfg: GenerationConfig) -> pb.GenerateRequest:
    req = pb.GenerateRequest(mode=cfg.mode, max_new_tokens=cfg.max_new_tokens, draft_k=cfg.draft_k,
                             sampling=sampling_to_pb(cfg.sampling), max_inflight=cfg.max_inflight,
                             ignore_eos=cfg.ignore_eos, tree=tree_shape_to_pb(cfg.tree),
                             min_valid_prob=cfg.min_valid_prob)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_tokens.extend(prompt)
    return req


def generation_config_from_pb(m: pb.GenerateRequest, default_max_inflight: int = 0) -> GenerationConfig:
    """The request's settings; unset numbers take the defaults. ValueError (WireError) for what cannot be valid."""
    s = sampling_from_pb(m.sampling)  # then the same checks as a local config's (temperature, top_p, rule)
    s = SamplingParams.create(s.temperature if s.rule == Rule.SAMPLE else 0.0, s.top_p, s.seed, s.rule == Rule.ADAPTIVE,
                              s.adaptive_margin, s.adaptive_tie_margin)
    cfg = GenerationConfig(mode=m.mode or "si", max_new_tokens=m.max_new_tokens or 64, draft_k=m.draft_k or 4,
                           tree=tree_shape_from_pb(m.tree) if m.HasField("tree") else TreeShape(),
                           max_inflight=m.max_inflight or default_max_inflight, sampling=s, ignore_eos=m.ignore_eos)
    if m.HasField("min_valid_prob"):
        cfg.min_valid_prob = m.min_valid_prob
    cfg.validate()
    return cfg


def draft_request_to_pb(session_id: str, req: DraftRequest) -> pb.DraftRequest:
    return pb.DraftRequest(session_id=session_id, context=req.context, depth=req.depth,
                           tree=tree_shape_to_pb(req.tree), sampling=sampling_to_pb(req.sampling))


def draft_request_from_pb(m: pb.DraftRequest, vocab_size: int) -> DraftRequest:
    if not m.context:
        raise WireError("draft request with an empty context")
    if not 1 <= m.depth <= 64:
        raise WireError("draft depth must be between 1 and 64")
    if any(not 0 <= t < vocab_size for t in m.context):
        raise WireError("context token outside the vocabulary")
    return DraftRequest(list(m.context), m.depth, tree_shape_from_pb(m.tree), sampling_from_pb(m.sampling))


def draft_to_pb(d: Draft) -> pb.DraftReply:
    return pb.DraftReply(tree=tree_to_pb(d.tree), main_path=d.main_path, draft_ms=d.draft_ms)


def draft_from_pb(m: pb.DraftReply) -> Draft:
    return Draft(tree_from_pb(m.tree), list(m.main_path), m.draft_ms)


def stats_to_pb(s: Stats) -> pb.Stats:
    return pb.Stats(**{f.name: getattr(s, f.name) for f in fields(Stats)}, tokens_per_s=s.tokens_per_s,
                    ms_per_token=s.ms_per_token)


def stats_from_pb(m: pb.Stats) -> Stats:
    return Stats(**{f.name: (list(v) if f.name in ("accepted_per_round", "inflight") else v)
                    for f in fields(Stats) for v in [getattr(m, f.name)]})


@dataclass
class ExcludedPeer:
    """A peer a head keeps out of its routes for now (see dsd_node.net.exclusion)."""

    address: str
    reason: str
    remaining_s: float
    failures: int


@dataclass
class NodeInfo:
    """What a node says about itself (the Info call): roles, model, layers, load, and a head's route."""

    role: str
    model: str = ""
    model_hash: str = ""
    layer_start: int = 0
    layer_end: int = 0
    num_layers: int = 0
    version: str = ""
    sessions: int = 0
    max_sessions: int = 0
    peer_id: str = ""
    address: str = ""
    tokens_per_s: float = 0.0
    dtype: str = ""
    route: list[Hop] = field(default_factory=list)
    excluded: list[ExcludedPeer] = field(default_factory=list)  # a head: peers out of its routes now, and why
    banned: list[str] = field(default_factory=list)  # a head: "peer id: why" (output verification)


NODE_INFO_LISTS = ("route", "excluded", "banned")  # converted one by one below


def node_info_to_pb(i: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(**{f.name: getattr(i, f.name) for f in fields(NodeInfo) if f.name not in NODE_INFO_LISTS},
                       route=[hop_to_pb(h) for h in i.route],
                       excluded=[pb.ExcludedPeer(**{f.name: getattr(e, f.name) for f in fields(ExcludedPeer)})
                                 for e in i.excluded],
                       banned=list(i.banned))


def node_info_from_pb(m: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(**{f.name: getattr(m, f.name) for f in fields(NodeInfo) if f.name not in NODE_INFO_LISTS},
                    route=[hop_from_pb(h) for h in m.route],
                    excluded=[ExcludedPeer(**{f.name: getattr(e, f.name) for f in fields(ExcludedPeer)})
                              for e in m.excluded],
                    banned=list(m.banned))
