"""Tree verification at the last stage: greedy, lossless speculative sampling, and the adaptive rule.

Per session the verifier holds the next token y: committed by the previous verdict but not yet in
any KV cache. A round's roots are candidates for y's position (a plain round puts y itself as its
only root); the root equal to y is accepted, and verification walks down the tree from it with the
target's logits. The first round of a session instead starts with given prompt tokens.

- GREEDY: follow the child equal to the target's argmax; the verdict ends with the argmax after the
  last accepted node. Output equals the target's own greedy output.
- SAMPLE: SpecInfer's multi-step speculative sampling. Children of a node, drawn i.i.d. from the
  draft distribution q, are tried in order: accept x with probability min(1, p(x)/q(x)); after a
  rejection p <- norm(max(p - q, 0)). If none is accepted, the next token is drawn from p (for a
  chain this is plain speculative sampling). Roots of a pipelined round are accepted only when equal
  to y, itself drawn from p. Lossless.
- ADAPTIVE (lossy, opt-in): greedy, but a draft token also passes when it is low-importance
  (whitespace, delimiters, function words) and p_top - p_draft <= adaptive_margin, or for any
  token when p_top - p_draft <= adaptive_tie_margin (near-ties, as in MARS). By default only
  near-ties within 0.01 pass (DEFAULT_ADAPTIVE_*: chosen for a bounded quality loss).

The logits stay on the shard's device: greedy verification brings back one argmax id per node;
sampling draws with a generator on that device (seeded with the session's seed), so only token ids
and accept/reject decisions reach Python.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from dsd_node.engine.device import make_generator
from dsd_node.engine.tree import TokenTree

FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for with from and or but nor so as is are was were be been it its this that "
    "these those than then there here".split()
)
DELIMITERS = frozenset(",;:()[]{}\"'`.")
# Default margins of the adaptive rule, chosen by `python -m dsd_node.ops.bench.adaptive` on HumanEval prompts: the
# fastest setting whose output's perplexity and mean regret under the target stay within 1.10x of greedy's (tau
# 1.99 -> 3.17 at k = 4). Relaxing low-importance tokens (the margin) cost more quality per token gained than
# near-ties did: in code, whitespace is indentation. docs/bench.md has the curve.
DEFAULT_ADAPTIVE_MARGIN = 0.0
DEFAULT_ADAPTIVE_TIE_MARGIN = 0.01


class Rule(IntEnum):
    GREEDY = 0
    SAMPLE = 1
    ADAPTIVE = 2


@dataclass
class SamplingParams:
    rule: Rule = Rule.GREEDY
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    adaptive_margin: float = DEFAULT_ADAPTIVE_MARGIN
    adaptive_tie_margin: float = DEFAULT_ADAPTIVE_TIE_MARGIN

    @staticmethod
    def create(temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, adaptive: bool = False,
               adaptive_margin: float = DEFAULT_ADAPTIVE_MARGIN,
               adaptive_tie_margin: float = DEFAULT_ADAPTIVE_TIE_MARGIN) -> SamplingParams:
        """temperature 0 means greedy; adaptive relaxes greedy acceptance (lossy)."""
        if not (0 <= temperature < float("inf")) or not 0 < top_p <= 1:  # NaN fails both comparisons
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if adaptive and temperature > 0:
            raise ValueError("adaptive verification relaxes greedy decoding: use it with temperature 0")
        rule = Rule.ADAPTIVE if adaptive else (Rule.SAMPLE if temperature > 0 else Rule.GREEDY)
        return SamplingParams(rule, temperature or 1.0, top_p, seed, adaptive_margin, adaptive_tie_margin)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature and top-p (nucleus) filtering, over the last dimension."""
    p = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sp, idx = torch.sort(p, dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > params.top_p  # keep the smallest set whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def low_importance_mask(tokenizer) -> torch.Tensor:
    """Vocabulary mask of low-importance tokens: whitespace, delimiters, function words."""
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        stripped = text.strip()
        mask[i] = (
            stripped == ""
            or all(c in DELIMITERS for c in stripped)
            or (stripped.lower() in FUNCTION_WORDS and all(c in string.ascii_letters for c in stripped))
        )
    return mask


@dataclass
class VerifyResult:
    stale: bool
    accepted: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class VerifierSession:
    """What the last stage remembers of one session between rounds."""

    params: SamplingParams
    next_token: int | None = None
    pending: dict[int, list[int]] = field(default_factory=dict)  # verified, uncommitted round -> accepted path
    rng: torch.Generator = field(default_factory=torch.Generator)
    _placed: bool = field(default=False, repr=False)  # rng moved to the logits' device (once)

    def __post_init__(self) -> None:
        self.rng.manual_seed(self.params.seed)

    def commit(self, round_id: int) -> None:
        self.pending.pop(round_id, None)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The session's generator: on the logits' device from the first sampled round on (seeded the same),
        or the CPU's where that device has none."""
        if not self._placed:
            self._placed = True
            if device.type != "cpu":
                self.rng = make_generator(device, self.params.seed)
        return self.rng

    def builds_on_accepted(self, base: list[tuple[int, list[int]]]) -> bool:
        """A round is valid only if its base is exactly the verified, uncommitted rounds with their accepted paths."""
        return [rid for rid, _ in base] == list(self.pending) and all(self.pending[rid] == path for rid, path in base)

    def verify(self, round_id: int, base: list[tuple[int, list[int]]], tree: TokenTree, logits: torch.Tensor,
               low_importance: torch.Tensor | None = None) -> VerifyResult:
        if not self.builds_on_accepted(base) or (tree.n_given == 0 and self.next_token is None):
            return VerifyResult(stale=True)
        kids = tree.children()
        if tree.n_given:
            path, cur = list(range(tree.n_given)), tree.n_given - 1
        else:
            match = [r for r in kids.get(-1, []) if tree.tokens[r] == self.next_token]
            if not match:
                return VerifyResult(stale=True)
            path, cur = [match[0]], match[0]
        tokens: list[int] = []
        # greedy and adaptive: every node's argmax in one transfer; sampling works on the device
        tops = logits.argmax(-1).tolist() if self.params.rule != Rule.SAMPLE else None
        rng = self._generator(logits.device) if tops is None else None
        while True:
            child, nxt = self._step(tree, kids.get(cur, []), logits[cur], low_importance,
                                    tops[cur] if tops is not None else None, rng)
            if child is None:
                tokens.append(nxt)
                break
            path.append(child)
            tokens.append(tree.tokens[child])
            cur = child
        self.next_token = tokens[-1]
        self.pending[round_id] = path
        return VerifyResult(stale=False, accepted=path, tokens=tokens)

    def _step(self, tree: TokenTree, children: list[int], logits: torch.Tensor,
              low_importance: torch.Tensor | None, top: int | None = None,
              rng: torch.Generator | None = None) -> tuple[int | None, int]:
        """Pick the accepted child of one node, or (None, next token). `top`: the node's argmax, if known."""
        prm = self.params
        if prm.rule == Rule.SAMPLE:
            rng = rng or self.rng
            p = target_probs(logits.to(rng.device), prm)
            for c in children:
                q = tree.draft_dists[c].dense(p.numel(), p.device) if tree.draft_dists and tree.draft_dists[c] else None
                x = tree.tokens[c]
                if q is None or q[x] <= 0:
                    continue
                if torch.rand((), generator=rng, device=rng.device).item() < min(1.0, (p[x] / q[x]).item()):
                    return c, x
                residual = torch.clamp(p - q, min=0.0)
                if residual.sum() > 0:
                    p = residual / residual.sum()
            return None, int(torch.multinomial(p, 1, generator=rng).item())
        if top is None:
            top = int(torch.argmax(logits).item())
        for c in children:
            if tree.tokens[c] == top:
                return c, top
        if prm.rule == Rule.ADAPTIVE and children:
            p = torch.softmax(logits.float(), dim=-1)
            for c in children:
                x = tree.tokens[c]
                gap = (p[top] - p[x]).item()
                if gap <= prm.adaptive_tie_margin or (
                        low_importance is not None and bool(low_importance[x]) and gap <= prm.adaptive_margin):
                    return c, x
        return None, top
