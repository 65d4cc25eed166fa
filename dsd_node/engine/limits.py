"""Admission limits, in one place: what one request, one round and one draft may ask of a node.

The gateway checks a request against them before it starts a session; every stage checks each round again
(a stage cannot trust its caller), and the drafter checks each draft request. A request over a limit is
refused with a LimitError (a ValueError: INVALID_ARGUMENT on the wire) before anything is allocated.

The costs they bound: a round of n tree nodes after a context of c positions builds an n x (c + n) attention
mask and, for a branching tree, an n x n ancestor matrix on the host; a draft of depth k and branch b asks
the drafter for the top 1 + b tokens at each level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported at run time: the node's config reads this module without torch
    from dsd_node.engine.config import GenerationConfig, TreeShape

MAX_INFLIGHT = 64  # dsi rounds in flight: each holds a tentative KV segment on every stage


class LimitError(ValueError):
    """A request, round or draft over an admission limit (one line, naming the limit and the value)."""


@dataclass(frozen=True)
class Limits:
    """Per-request and per-node caps. 0 for max_context means the model's own context (positions)."""

    max_context: int = 0  # prompt + new tokens (0: the model's positions); a node never exceeds its model's
    max_tree_nodes: int = 256  # draft nodes per round (a round's given prompt nodes are bounded by max_context)
    max_branch: int = 16  # alternatives per level of a draft tree
    max_draft_k: int = 64  # the main chain's length (draft depth)
    max_sessions: int = 64  # sessions per stage; concurrent generations per gateway
    max_client_sessions: int = 0  # gateway: generations running or queued per client (0: no quota)
    session_ttl_s: float = 30.0  # a session with no new work (a round with a tree) for this long expires
    queue_size: int = 64  # gateway: requests waiting for a slot when all are in use
    queue_timeout_s: float = 30.0  # gateway: longest wait for a slot (then RESOURCE_EXHAUSTED)

    def __post_init__(self) -> None:
        for name in (
            "max_context",
            "max_tree_nodes",
            "max_branch",
            "max_draft_k",
            "max_sessions",
            "max_client_sessions",
            "queue_size",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative")
        if self.max_tree_nodes < 2 or self.max_draft_k < 1 or self.max_sessions < 1:
            raise ValueError("max_tree_nodes must be at least 2, max_draft_k and max_sessions at least 1")
        if not self.session_ttl_s > 0 or not self.queue_timeout_s >= 0:
            raise ValueError("session_ttl must be positive and queue_timeout cannot be negative")

    def context(self, model_positions: int | None) -> int | None:
        """The positions a session may use: the model's, capped by max_context."""
        caps = [c for c in (model_positions, self.max_context or None) if c]
        return min(caps) if caps else None

    def check_shape(self, draft_k: int, tree: TreeShape) -> None:
        """A draft of main chain draft_k with this tree shape (as the drafter and the gateway see it)."""
        if draft_k > self.max_draft_k:
            raise LimitError(f"draft depth {draft_k} exceeds this node's limit of {self.max_draft_k}")
        if tree.branch > self.max_branch:
            raise LimitError(f"branch {tree.branch} exceeds this node's limit of {self.max_branch}")
        if tree.max_nodes > self.max_tree_nodes:
            raise LimitError(
                f"max_nodes {tree.max_nodes} exceeds this node's limit of {self.max_tree_nodes} tree nodes"
            )
        if draft_nodes(draft_k, tree) > self.max_tree_nodes:
            raise LimitError(
                f"a draft of depth {draft_k} with branch {tree.branch} at {tree.branch_depth} levels has "
                f"{draft_nodes(draft_k, tree)} nodes, over this node's limit of {self.max_tree_nodes}"
            )

    def check_generation(self, n_prompt: int, cfg: GenerationConfig, model_positions: int | None) -> None:
        """A whole request, at the gateway: prompt + new tokens within the context, and the shape of its rounds."""
        ctx = self.context(model_positions)
        check_context(n_prompt, cfg.max_new_tokens, ctx,
                      "the model's context" if ctx == model_positions else "this gateway's limit")
        if cfg.max_inflight > MAX_INFLIGHT:
            raise LimitError(f"max_inflight {cfg.max_inflight} exceeds the limit of {MAX_INFLIGHT}")
        if cfg.mode != "ar":
            # a round is the known next token plus a draft one level deeper than draft_k at most
            self.check_shape(cfg.draft_k + 1, cfg.tree)

    def check_round(self, n_given: int, n_nodes: int, ctx_len: int, model_positions: int | None) -> None:
        """One round at a stage, before the tree is walked or anything allocated: its draft nodes, and its given
        (prompt) nodes within the context. Speculation may run past the end of the context by one draft at most
        (check_depth, once the tree is known to be well formed)."""
        if n_nodes - n_given > self.max_tree_nodes:
            raise LimitError(
                f"round has {n_nodes - n_given} draft tree nodes, over this stage's limit of {self.max_tree_nodes}"
            )
        ctx = self.context(model_positions)
        if ctx is not None and ctx_len + n_given > ctx:
            raise LimitError(
                f"round of {n_given} given tokens after {ctx_len} positions exceeds the context of {ctx} positions"
            )

    def check_depth(self, ctx_len: int, depth: int, model_positions: int | None) -> None:
        """The deepest node of a round (depth 0: a root) at position ctx_len + depth: within the context, plus
        one draft of speculation past its end."""
        ctx = self.context(model_positions)
        if ctx is not None and ctx_len + depth + 1 > ctx + self.max_draft_k + 1:
            raise LimitError(f"round reaches position {ctx_len + depth}, past the context of {ctx} positions")


def check_context(n_prompt: int, max_new_tokens: int, limit: int | None, what: str = "the model's context") -> None:
    """LimitError (one line) when a prompt plus the tokens asked for do not fit `limit` positions."""
    if limit is not None and n_prompt + max_new_tokens > limit:
        fix = (f"ask for at most {limit - n_prompt} new tokens or shorten the prompt" if n_prompt < limit
               else f"shorten the prompt to under {limit} tokens")
        raise LimitError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceed {what} "
                         f"of {limit} positions: {fix}")


def draft_nodes(draft_k: int, tree: TreeShape) -> int:
    """Nodes of a draft of main chain draft_k: the chain plus branch alternatives at branch_depth levels (capped)."""
    n = draft_k + tree.branch * min(tree.branch_depth, draft_k)
    return min(n, tree.max_nodes) if tree.max_nodes else n
