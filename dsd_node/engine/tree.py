"""Token trees: candidate tokens with parent indices, and the attention mask that verifies them in one pass.

Node i's parent is parents[i] (< i), or -1 for a root, which follows the end of the context. A
chain is the special case parents = [-1, 0, 1, ...]. The first n_given nodes are a chain of known
tokens (a prompt) committed without verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class TreeError(ValueError):
    """A malformed tree (bad parent indices, lengths that do not match)."""


@dataclass
class SparseDist:
    """A distribution over the vocabulary, stored as the tokens with nonzero mass."""

    ids: list[int]
    probs: list[float]

    @staticmethod
    def from_probs(p: torch.Tensor) -> SparseDist:
        ids = torch.nonzero(p > 0).flatten()
        return SparseDist(ids.tolist(), p[ids].tolist())

    def dense(self, vocab: int, device: torch.device | str | None = None) -> torch.Tensor:
        p = torch.zeros(vocab, dtype=torch.float32, device=device)
        if self.ids:
            p[torch.tensor(self.ids, device=device)] = torch.tensor(self.probs, dtype=torch.float32, device=device)
        return p


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int]
    n_given: int = 0
    draft_dists: list[SparseDist | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def chain(tokens: list[int], n_given: int = 0) -> TokenTree:
        return TokenTree(list(tokens), list(range(-1, len(tokens) - 1)), n_given)

    def validate(self, vocab_size: int | None = None) -> None:
        if len(self.parents) != len(self.tokens):
            raise TreeError(f"tree has {len(self.tokens)} tokens but {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise TreeError(f"node {i} has parent {p}: parents must be -1 or an earlier node")
        if self.n_given > len(self.tokens) or self.parents[: self.n_given] != list(range(-1, self.n_given - 1)):
            raise TreeError(f"the first {self.n_given} given nodes must form a chain from the root")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.tokens):
            raise TreeError(f"token id outside the vocabulary (0..{vocab_size - 1})")
        if self.draft_dists and len(self.draft_dists) != len(self.tokens):
            raise TreeError("draft_dists must be empty or one per node")
        for i, d in enumerate(self.draft_dists):
            if d is None:
                continue
            if len(d.ids) != len(d.probs):
                raise TreeError(f"draft distribution of node {i} has {len(d.ids)} ids but {len(d.probs)} probabilities")
            if vocab_size is not None and any(not 0 <= t < vocab_size for t in d.ids):
                raise TreeError(f"draft distribution of node {i} has a token id outside the vocabulary "
                                f"(0..{vocab_size - 1})")
            if not all(0 <= p <= 1 for p in d.probs):  # false for NaN too
                raise TreeError(f"draft distribution of node {i} has a probability outside [0, 1]")

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(0 if p < 0 else d[p] + 1)
        return d

    def children(self) -> dict[int, list[int]]:
        """Parent index (-1 for the roots) -> child node indices, in order."""
        out: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
        return out

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def tree_attention(parents: list[int], ctx_len: int, dtype: torch.dtype,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float additive 4D mask [1, 1, n, ctx_len + n] and position ids [1, n] for a tree after a context.

    Every node sees the whole context and its own ancestors (itself included); positions are
    ctx_len + depth. (A bool mask is silently wrong under eager attention: keep it float.) Both are
    made on `device` (the KV cache's): only the n x n ancestor matrix of the tree is built on the host.
    """
    n = len(parents)
    mask = torch.zeros(1, 1, n, ctx_len + n, dtype=dtype, device=device)
    if all(p == i - 1 for i, p in enumerate(parents)):  # a chain (a prompt, a plain round): causal
        visible = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
        depth = torch.arange(n, device=device)
    else:
        anc = torch.zeros(n, n, dtype=torch.bool)
        d = [0] * n
        for i, p in enumerate(parents):
            if p >= 0:
                anc[i] = anc[p]
                d[i] = d[p] + 1
            anc[i, i] = True
        visible = anc.to(device)
        depth = torch.tensor(d, dtype=torch.long, device=device)
    mask[0, 0, :, ctx_len:].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask, (ctx_len + depth).unsqueeze(0)


def attention_inputs(parents: list[int], ctx_len: int, dtype: torch.dtype, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """tree_attention, except for a single node: it sees the whole context, so no mask is built (None, as in
    HF's own one-token decoding steps; the attention layers then attend to every cached position)."""
    if len(parents) == 1:
        return None, torch.tensor([[ctx_len]], device=device)
    return tree_attention(parents, ctx_len, dtype, device)
