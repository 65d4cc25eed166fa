"""The drafter: a small model that proposes a token tree continuing a context.

The tree is the drafter's most likely chain of `depth` tokens (its main path) plus, at the first
`branch_depth` levels, up to `branch` alternatives as leaf siblings: when the target rejects a
main-path token, one of them may still match. Greedy alternatives are the next-best tokens; when
sampling, the token and its alternatives are drawn i.i.d. from the drafter's distribution q, which
is attached to each node for lossless verification.

Per session the drafter keeps its KV cache and reuses the longest common prefix with the next
context, so a round costs one forward pass per drafted token.

The drafter is the whole model as one shard (dsd_node.engine.models.load_shard): built on the meta
device and read from safetensors straight onto its device, where its cache, logits and sampling stay.

A calibrated drafter for benchmarks and tests (config.DrafterSpec): `oracle:ALPHA` drafts with the
target itself and, at each position, with probability ALPHA keeps its greedy token; otherwise it
proposes the next-best one and keeps the target's token out of that level's alternatives too, so a
greedy draft of depth k commits (1 - ALPHA^(k+1)) / (1 - ALPHA) tokens per round on average whatever
the tree's width. When sampling, the draws come from the target's distribution with probability ALPHA
and otherwise from it without its likeliest token (verification stays lossless: each node carries the
distribution it was drawn from). The coin of position p is a hash of (seed, p): the same context gives
the same draft in every process. `self` is `oracle:1`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from dsd_node.engine.config import TreeShape
from dsd_node.engine.device import make_generator
from dsd_node.engine.models import load_shard
from dsd_node.engine.shard_runner import run_shard
from dsd_node.engine.tree import SparseDist, TokenTree, attention_inputs
from dsd_node.engine.verify import Rule, SamplingParams, target_probs


def _unit(seed: int, position: int) -> float:
    """A uniform number in [0, 1) from (seed, position): splitmix64, the same in every process."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return ((x ^ (x >> 31)) >> 11) / float(1 << 53)


@dataclass
class DraftRequest:
    context: list[int]
    depth: int  # the main chain's length
    tree: TreeShape = field(default_factory=TreeShape)  # max_nodes: the main chain first, alternatives fill the rest
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Draft:
    tree: TokenTree  # roots follow the end of the context
    main_path: list[int]
    draft_ms: float = 0.0


@dataclass
class _DraftSession:
    cache: object
    tokens: list[int] = field(default_factory=list)
    rng: torch.Generator | None = None
    last_used: float = field(default_factory=time.monotonic)


class Drafter:
    def __init__(self, source: str, dtype: str | torch.dtype = "float32", max_sessions: int = 64,
                 device: str | torch.device = "cpu", oracle_alpha: float | None = None):
        self.model_id = source
        self.oracle_alpha = oracle_alpha  # see DrafterSpec: None drafts with the model as it is
        self.shard = load_shard(source, 0, None, dtype, device)  # every layer, embeddings and head
        self.device, self.dtype = self.shard.device, self.shard.dtype
        self.vocab_size = self.shard.head.weight.shape[0]
        self.max_sessions = max_sessions
        self.sessions: dict[str, _DraftSession] = {}

    def end_session(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def _session(self, session_id: str, seed: int) -> _DraftSession:
        s = self.sessions.get(session_id)
        if s is None:
            if len(self.sessions) >= self.max_sessions:
                oldest = min(self.sessions, key=lambda k: self.sessions[k].last_used)
                del self.sessions[oldest]
            s = self.sessions[session_id] = _DraftSession(DynamicCache(), rng=make_generator(self.device, seed + 1))
        s.last_used = time.monotonic()
        return s

    def _feed(self, s: _DraftSession, tokens: list[int]) -> torch.Tensor:
        """Run `tokens` after the session's cached ones; the float logits after the last, on the device."""
        mask, pos = attention_inputs(list(range(-1, len(tokens) - 1)), len(s.tokens), self.dtype, self.device)
        logits = run_shard(self.shard, s.cache, mask, pos, tokens=tokens)
        s.tokens.extend(tokens)
        return logits[-1]

    @torch.inference_mode()
    def draft(self, session_id: str, req: DraftRequest) -> Draft:
        if not req.context:
            raise ValueError("cannot draft from an empty context")
        t0 = time.perf_counter()
        s = self._session(session_id, req.sampling.seed)
        keep = 0
        for a, b in zip(s.tokens, req.context[:-1], strict=False):  # at least one token is fed to get logits
            if a != b:
                break
            keep += 1
        if keep == 0:
            s.cache, s.tokens = DynamicCache(), []
        elif keep < len(s.tokens):
            s.cache.crop(keep - len(s.tokens))  # transformers 5.x: a negative count of tokens to remove
            del s.tokens[keep:]
        logits = self._feed(s, req.context[keep:])
        sample = req.sampling.rule == Rule.SAMPLE
        tokens: list[int] = []
        parents: list[int] = []
        dists: list[SparseDist | None] = []
        main: list[int] = []
        parent = -1
        shape = req.tree
        depth = min(req.depth, shape.max_nodes) if shape.max_nodes else req.depth
        alt_budget = shape.max_nodes - depth if shape.max_nodes else shape.branch * shape.branch_depth
        for level in range(depth):
            n_alt = min(alt_budget, shape.branch if level < shape.branch_depth else 0, self.vocab_size - 1)
            alt_budget -= n_alt
            miss = self._oracle_misses(req.sampling.seed, len(req.context) + level)
            if sample:  # the token and its alternatives drawn i.i.d. from q, as multi-step speculative sampling needs
                q = target_probs(logits, req.sampling)
                if miss:  # an oracle's miss: q without the target's likeliest token
                    q = q.clone()
                    q[torch.argmax(q)] = 0.0
                    q = q / q.sum() if q.sum() > 0 else torch.full_like(q, 1.0 / q.numel())
                drawn = torch.multinomial(q.to(s.rng.device), 1 + n_alt, replacement=True, generator=s.rng).tolist()
                dists += [SparseDist.from_probs(q)] * (1 + n_alt)
            else:
                drawn = torch.topk(logits, min(2 + n_alt, logits.numel())).indices.tolist()[miss:][: 1 + n_alt]
            tok, alts = drawn[0], drawn[1:]
            main.append(len(tokens))
            tokens.append(tok)
            parents.append(parent)
            siblings_parent, parent = parent, len(tokens) - 1
            for a in alts:
                tokens.append(a)
                parents.append(siblings_parent)
            if level + 1 < depth:
                logits = self._feed(s, [tok])
        return Draft(TokenTree(tokens, parents, 0, dists), main, (time.perf_counter() - t0) * 1e3)

    def _oracle_misses(self, seed: int, position: int) -> int:
        """1 where an oracle drafter replaces the target's token at `position`, else 0."""
        return int(self.oracle_alpha is not None and _unit(seed, position) >= self.oracle_alpha)
