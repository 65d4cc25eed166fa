"""What a stage does with one round message: the rules shared by the gRPC node and the in-process pipeline.

1. A round of an epoch older than the newest seen is stale: its tree is not computed, but its
   commits still apply (they are not repeated later) and it travels on as a commit-only message.
2. Commits are applied in order, then every tentative segment the round does not build on is dropped.
3. The shard runs the tree; a middle stage passes hidden states on, the last stage verifies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from dsd_node.engine.hop_trace import HopTrace
from dsd_node.engine.limits import Limits
from dsd_node.engine.messages import RoundMsg, VerdictMsg
from dsd_node.engine.models import max_positions
from dsd_node.engine.shard_runner import ShardRunner
from dsd_node.engine.tree import TokenTree
from dsd_node.engine.verify import Rule, VerifierSession


class BadRound(ValueError):
    """A round this stage cannot run: wrong layers, wrong tensor shape or dtype, malformed tree."""


class SessionExists(ValueError):
    """A second stream names a session that another stream holds on this stage."""


class StageHandler:
    def __init__(self, runner: ShardRunner, low_importance: Callable[[], torch.Tensor] | None = None,
                 limits: Limits | None = None):
        self.runner = runner
        self.limits = limits or Limits(max_sessions=runner.max_sessions)
        self.positions = max_positions(runner.shard)
        self._low_importance_fn = low_importance
        self._low_importance: torch.Tensor | None = None
        self.trace = HopTrace.from_env(f"stage{runner.shard.start}:{runner.shard.end}")

    def low_importance(self) -> torch.Tensor | None:
        if self._low_importance is None and self._low_importance_fn is not None:
            self._low_importance = self._low_importance_fn()
        return self._low_importance

    def check(self, msg: RoundMsg) -> None:
        """Refuse a round that does not fit this shard (before touching any state)."""
        sh = self.runner.shard
        if msg.route:
            if not 0 <= msg.hop < len(msg.route):
                raise BadRound(f"hop {msg.hop} is outside the route of {len(msg.route)} stages")
            want = msg.route[msg.hop]
            if (want.layer_start, want.layer_end) != (sh.start, sh.end):
                raise BadRound(f"round is for layers {want.layer_start}:{want.layer_end}, this node hosts {sh.start}:{sh.end}")
        if not msg.tree.tokens:
            return
        sess = self.runner.sessions.get(msg.session_id)
        ctx = (sess.cache.committed_len if sess else 0) + sum(len(path) for _, path in msg.base)
        try:  # before the tree is walked: its size bounds every allocation of the round
            self.limits.check_round(msg.tree.n_given, len(msg.tree), ctx, self.positions)
            msg.tree.validate(sh.config.vocab_size)
            self.limits.check_depth(ctx, max(msg.tree.depths()), self.positions)
        except ValueError as e:
            raise BadRound(str(e)) from e
        if sh.is_first:
            return
        h = msg.hidden
        if h is None:
            raise BadRound(f"stage {sh.start}:{sh.end} needs hidden states, the round carries none")
        # Hidden states of another float dtype are accepted and rounded to this stage's dtype on arrival
        # (ShardRunner). Safe: they are activations, which every layer already rounds to the stage's dtype.
        # A wider sender (float32 into a bf16 stage) is rounded once, exactly as this stage rounds its own
        # activations; a narrower one (bf16 into float32) widens exactly. The result is the pipeline run at
        # the lower of the two precisions at that boundary, no worse than a whole half-precision pipeline.
        # The one loss that is not rounding, overflow into float16's narrow range (|x| > 65504), is refused.
        if not h.is_floating_point():
            raise BadRound(f"hidden states are {h.dtype}, this stage runs {sh.dtype} (a float dtype is needed)")
        if sh.dtype == torch.float16 and h.dtype != torch.float16 and h.numel() and \
                h.abs().amax().item() > torch.finfo(torch.float16).max:
            raise BadRound(f"{h.dtype} hidden states exceed float16's range (this stage runs float16)")
        if tuple(h.shape) != (1, len(msg.tree), sh.hidden_size):
            raise BadRound(f"hidden states have shape {tuple(h.shape)}, expected {(1, len(msg.tree), sh.hidden_size)}")

    def open_session(self, session_id: str) -> None:
        """Hold a new session (SessionLimitError when this node is full, SessionExists when it is held)."""
        if session_id in self.runner.sessions:
            raise SessionExists(f"session {session_id!r} is already open on this stage (another stream holds it)")
        self.runner.session(session_id)

    def end_session(self, session_id: str) -> bool:
        return self.runner.end_session(session_id)

    def see_epoch(self, session_id: str, epoch: int) -> bool:
        """Rule 1, in one place: note a round's epoch as soon as it arrives; True if the round is stale.

        Called on arrival (so rounds of an older epoch still queued behind it become commit-only) and again
        when the round is handled. A session this stage does not hold has nothing to make stale."""
        sess = self.runner.sessions.get(session_id)
        if sess is None:
            return False
        stale = epoch < sess.epoch
        sess.epoch = max(sess.epoch, epoch)
        return stale

    def handle(self, msg: RoundMsg, create: bool = True) -> RoundMsg | VerdictMsg | None:
        """Run one round. Returns the message for the next stage, the verdict (last stage), or None.

        create=False: the session must exist already (a stream that owns it may have freed it meanwhile)."""
        tr = self.trace
        tr.mark(msg.session_id, msg.round_id, "handle")
        self.check(msg)
        tr.mark(msg.session_id, msg.round_id, "checked")
        sh = self.runner.shard
        sess = self.runner.session(msg.session_id, create)
        if self.see_epoch(msg.session_id, msg.epoch) and msg.tree.tokens:
            msg = replace(msg, tree=TokenTree([], []), hidden=None)  # keep base: those segments are still live
        try:
            self.runner.apply(msg.session_id, msg.commits, {rid for rid, _ in msg.base}, create)
        except ValueError as e:
            raise BadRound(str(e)) from e
        tr.mark(msg.session_id, msg.round_id, "committed")
        if sh.is_last:
            if sess.verifier is None:
                sess.verifier = VerifierSession(msg.sampling)
            for rid, _ in msg.commits:
                sess.verifier.commit(rid)
        if not msg.tree.tokens:
            return None if sh.is_last else replace(msg, hop=msg.hop + 1)
        try:
            out = self.runner.forward(msg.session_id, msg.round_id, msg.base, msg.tree, msg.hidden, create, tr)
        except ValueError as e:
            raise BadRound(str(e)) from e
        if not sh.is_last:
            return replace(msg, hidden=out, hop=msg.hop + 1)
        t0 = time.perf_counter()
        low = self.low_importance() if msg.sampling.rule == Rule.ADAPTIVE else None
        res = sess.verifier.verify(msg.round_id, msg.base, msg.tree, out, low)
        tr.mark(msg.session_id, msg.round_id, "verified")
        return VerdictMsg(msg.session_id, msg.round_id, msg.epoch, res.stale, res.accepted, res.tokens,
                          (time.perf_counter() - t0) * 1e3)
