"""Runs one pipeline shard on token trees: per-session KV caches, one forward pass per round.

A round stays on the shard's device: token ids, the tree mask, positions, the KV cache and the hidden
states or logits it returns. Hidden states from another stage are moved onto the device (and into the
shard's dtype) on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsd_node.engine.hop_trace import HopTrace
from dsd_node.engine.kv_cache import TreeKVCache
from dsd_node.engine.models import Shard
from dsd_node.engine.tree import TokenTree, attention_inputs
from dsd_node.engine.verify import VerifierSession


class SessionLimitError(RuntimeError):
    """The shard holds as many sessions (or as much KV memory) as it is allowed to."""


@dataclass
class ShardSession:
    cache: TreeKVCache = field(default_factory=TreeKVCache)
    epoch: int = 0  # newest epoch seen: rounds of older epochs are stale
    verifier: VerifierSession | None = None  # last shard only


class ShardRunner:
    """Layers [start, end) of a target model, serving many sessions.

    `forward` takes the round's tree and, for every shard but the first, the hidden states of its
    nodes; it returns hidden states for the next shard, or logits [n, vocab] on the last shard.
    """

    def __init__(self, shard: Shard, max_sessions: int = 64, max_kv_bytes: int | None = None):
        self.shard = shard
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self.sessions: dict[str, ShardSession] = {}

    def session(self, session_id: str, create: bool = True) -> ShardSession:
        """The session's state, created on first use (SessionLimitError when the node is full)."""
        s = self.sessions.get(session_id)
        if s is None:
            if not create:
                raise SessionLimitError(f"session {session_id} has ended on this node")
            if len(self.sessions) >= self.max_sessions:
                raise SessionLimitError(f"node is full: {len(self.sessions)}/{self.max_sessions} sessions in use, retry later")
            if self.max_kv_bytes is not None and self.kv_bytes() >= self.max_kv_bytes:
                raise SessionLimitError(f"node is full: KV cache memory {self.kv_bytes()} >= {self.max_kv_bytes} bytes")
            s = self.sessions[session_id] = ShardSession(TreeKVCache(device=self.shard.device))
        return s

    def end_session(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def kv_bytes(self) -> int:
        return sum(s.cache.nbytes() for s in self.sessions.values())

    def apply(self, session_id: str, commits: list[tuple[int, list[int]]], keep_rounds: set[int],
              create: bool = True) -> None:
        """Apply verdicts (in order), then drop every tentative segment not in keep_rounds.

        create=False: the session must still exist (a round running on a worker thread while its stream ends
        must not bring the session back: nobody would free it)."""
        cache = self.session(session_id, create).cache
        for rid, keep in commits:
            cache.commit(rid, keep)
        cache.retain(keep_rounds)

    @torch.inference_mode()
    def forward(self, session_id: str, round_id: int, base: list[tuple[int, list[int]]], tree: TokenTree,
                hidden: torch.Tensor | None = None, create: bool = True, trace: HopTrace | None = None) -> torch.Tensor:
        sh = self.shard
        cache = self.session(session_id, create).cache
        ctx = cache.begin(round_id, base, len(tree))
        mask, pos = attention_inputs(tree.parents, ctx, sh.dtype, sh.device)
        if trace is not None:
            trace.mark(session_id, round_id, "mask")
        out = run_shard(sh, cache, mask, pos, tokens=tree.tokens, hidden=hidden)
        if trace is not None:
            trace.mark(session_id, round_id, "forward")
        return out


def run_shard(sh: Shard, cache, mask: torch.Tensor | None, pos: torch.Tensor, tokens: list[int] | None = None,
              hidden: torch.Tensor | None = None) -> torch.Tensor:
    """One pass of a shard over new positions (mask and positions from tree_attention), on the shard's device.

    The first shard embeds `tokens`; the others take `hidden` (from the wire, host memory, or an in-process
    stage; another float dtype is rounded to the shard's). Returns hidden states [1, n, hidden] for the next
    shard, or float32 logits [n, vocab] on the last one, still on the device: verification runs there too.
    """
    if sh.is_first:
        h = sh.embed(torch.tensor([tokens], dtype=torch.long, device=sh.device))
        if sh.pos_embed is not None:
            h = h + sh.pos_embed(pos)
    else:
        h = hidden.to(device=sh.device, dtype=sh.dtype)
    pos_emb = sh.rotary(h, position_ids=pos) if sh.rotary is not None else None
    for layer in sh.layers:
        out = layer(h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, position_embeddings=pos_emb)
        h = out[0] if isinstance(out, tuple) else out
    if sh.is_last:
        return sh.head(sh.norm(h))[0].float()
    return h
