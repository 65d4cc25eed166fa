"""Token trees, the tree attention mask, and the verifier on hand-made logits (greedy, adaptive, sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from dsd_node.engine.tree import SparseDist, TokenTree, TreeError, tree_attention
from dsd_node.engine.verify import Rule, SamplingParams, VerifierSession, target_probs

# after a context of 3 tokens:   0 - 1 - 3
#                                 \- 2
#                                4          (a second root)
PARENTS = [-1, 0, 0, 1, -1]
VISIBLE = [{0}, {0, 1}, {0, 2}, {0, 1, 3}, {4}]  # each node sees itself and its ancestors


def test_tree_structure():
    t = TokenTree([10, 11, 12, 13, 14], PARENTS)
    t.validate(vocab_size=15)
    assert t.depths() == [0, 1, 1, 2, 0]
    assert t.children() == {-1: [0, 4], 0: [1, 2], 1: [3]}
    assert t.path_to(3) == [0, 1, 3] and t.path_to(4) == [4]
    c = TokenTree.chain([7, 8, 9], n_given=2)
    assert c.parents == [-1, 0, 1] and c.n_given == 2
    c.validate()


@pytest.mark.parametrize(
    "tree, match",
    [
        (TokenTree([1, 2], [-1]), "2 tokens but 1 parents"),
        (TokenTree([1, 2], [-1, 1]), "node 1 has parent 1"),
        (TokenTree([1], [0]), "node 0 has parent 0"),
        (TokenTree([1, 2], [-1, -2]), "node 1 has parent -2"),
        (TokenTree([1, 2], [-1, 0], n_given=3), "given nodes"),
        (TokenTree([1, 2], [-1, -1], n_given=2), "given nodes must form a chain"),
        (TokenTree([1, 5], [-1, 0]), "outside the vocabulary"),
        (TokenTree([1, -1], [-1, 0]), "outside the vocabulary"),
        (TokenTree([1, 2], [-1, 0], draft_dists=[None]), "draft_dists"),
    ],
)
def test_malformed_trees_are_refused(tree, match):
    with pytest.raises(TreeError, match=match):
        tree.validate(vocab_size=5)


def test_sparse_dist_round_trip():
    p = torch.tensor([0.0, 0.25, 0.0, 0.75])
    d = SparseDist.from_probs(p)
    assert d.ids == [1, 3] and d.dense(4).tolist() == p.tolist()


TREES = {  # parents, what each node sees, depths
    "tree": (PARENTS, VISIBLE, [0, 1, 1, 2, 0]),
    "chain": ([-1, 0, 1, 2], [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}], [0, 1, 2, 3]),
    "two roots": ([-1, -1, 1], [{0}, {1}, {1, 2}], [0, 0, 1]),
}


@pytest.mark.parametrize("shape", TREES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tree_attention_mask_is_float_prefix_plus_ancestors(shape, dtype):
    parents, visible, depths = TREES[shape]
    n = len(parents)
    mask, pos = tree_attention(parents, ctx_len=3, dtype=dtype)
    assert mask.shape == (1, 1, n, 3 + n) and mask.dtype == dtype
    assert pos.tolist() == [[3 + d for d in depths]]  # context length + depth
    assert (mask[0, 0, :, :3] == 0).all()  # every node sees the whole context
    neg = torch.finfo(dtype).min
    for i, seen in enumerate(visible):
        assert mask[0, 0, i, 3:].tolist() == [0.0 if j in seen else neg for j in range(n)]


def test_tree_attention_gives_masked_positions_zero_weight():
    mask, _ = tree_attention(PARENTS, ctx_len=2, dtype=torch.float32)
    weights = torch.softmax(torch.randn(1, 1, 5, 7, generator=torch.Generator().manual_seed(0)) + mask, dim=-1)[0, 0]
    for i, seen in enumerate(VISIBLE):
        visible = {0, 1} | {2 + j for j in seen}
        assert all((weights[i, j] > 0) == (j in visible) for j in range(7))
    assert torch.allclose(weights.sum(-1), torch.ones(5))
    assert tree_attention([-1, 0], ctx_len=0, dtype=torch.float32)[1].tolist() == [[0, 1]]


V = 10


def logits_for(tops: list[int]) -> torch.Tensor:
    """One row per node whose argmax is the given token."""
    out = torch.zeros(len(tops), V)
    out[range(len(tops)), tops] = 5.0
    return out


def test_greedy_first_round_follows_the_target_through_an_alternative():
    # given prompt 5 6 (nodes 0, 1); drafts: 7 (2) -> 9 (4) -> 1 (5) is the main chain, 8 (3) an alternative to 7
    tree = TokenTree([5, 6, 7, 8, 9, 1], [-1, 0, 1, 1, 2, 4], n_given=2)
    s = VerifierSession(SamplingParams())
    r = s.verify(0, [], tree, logits_for([0, 8, 9, 4, 1, 3]))
    assert not r.stale and r.accepted == [0, 1, 3] and r.tokens == [8, 4]  # the alternative, then its bonus
    assert s.next_token == 4 and s.pending == {0: [0, 1, 3]}
    r = VerifierSession(SamplingParams()).verify(0, [], tree, logits_for([0, 7, 9, 4, 1, 3]))
    assert r.accepted == [0, 1, 2, 4, 5] and r.tokens == [7, 9, 1, 3]  # the whole chain plus the bonus


def test_rounds_after_the_first_start_at_the_next_token_and_must_build_on_accepted_rounds():
    s = VerifierSession(SamplingParams())
    s.verify(0, [], TokenTree([5, 6, 7], [-1, 0, 1], n_given=2), logits_for([0, 7, 4]))
    assert s.next_token == 4 and s.pending == {0: [0, 1, 2]}
    tree = TokenTree([3, 4, 6], [-1, -1, 1])  # roots are candidates for the next token (4)
    logits = logits_for([0, 6, 2])
    assert s.verify(1, [], tree, logits).stale  # round 0 is verified but not committed: it must be the base
    assert s.verify(1, [(0, [0, 1])], tree, logits).stale  # built on a path round 0 did not accept
    r = s.verify(1, [(0, [0, 1, 2])], tree, logits)
    assert not r.stale and r.accepted == [1, 2] and r.tokens == [6, 2]
    assert s.verify(2, [(0, [0, 1, 2]), (1, [1, 2])], TokenTree([9], [-1]), logits_for([0])).stale  # y is 2, not 9
    assert s.next_token == 2 and list(s.pending) == [0, 1]  # a stale round changes nothing
    s.commit(0)
    s.commit(1)
    r = s.verify(3, [], TokenTree([2], [-1]), logits_for([5]))
    assert r.accepted == [0] and r.tokens == [5] and s.pending == {3: [0]}
    assert VerifierSession(SamplingParams()).verify(0, [], TokenTree([2], [-1]), logits_for([5])).stale  # no y yet


def test_greedy_ties_go_to_the_lowest_token_id():
    logits = torch.zeros(2, V)
    logits[0, [2, 5]] = 3.0
    s = VerifierSession(SamplingParams())
    assert s.verify(0, [], TokenTree([1, 5], [-1, 0], n_given=1), logits).tokens == [2]
    assert VerifierSession(SamplingParams()).verify(0, [], TokenTree([1, 2], [-1, 0], n_given=1), logits).tokens[0] == 2


def near_tie(gap: float) -> torch.Tensor:
    """Logits of [top, draft, rest...]: p(0) = 0.4, p(1) = 0.4 - gap; the draft's child row wants token 3."""
    p = torch.tensor([0.4, 0.4 - gap, 0.1, 0.1 + gap])
    return torch.stack([p.log(), torch.tensor([0.0, 0.0, 0.0, 5.0])])


def adaptive(margin: float, tie: float) -> SamplingParams:
    return SamplingParams.create(adaptive=True, adaptive_margin=margin, adaptive_tie_margin=tie)


TREE = TokenTree([2, 1], [-1, 0], n_given=1)  # given token 2, then the draft token 1
LOW = torch.tensor([False, True, False, False])  # token 1 is low-importance (e.g. whitespace)


@pytest.mark.parametrize(
    "params, gap, low, accepted",
    [
        (SamplingParams(), 0.005, LOW, False),  # greedy: only the argmax passes
        (adaptive(0.0, 0.01), 0.005, None, True),  # a near-tie passes for any token
        (adaptive(0.0, 0.001), 0.005, None, False),
        (adaptive(0.05, 0.01), 0.03, LOW, True),  # a low-importance token within the margin
        (adaptive(0.05, 0.01), 0.03, ~LOW, False),  # ... but not an important one
        (adaptive(0.05, 0.01), 0.03, None, False),  # ... nor without a mask
        (adaptive(0.02, 0.01), 0.03, LOW, False),  # ... nor beyond the margin
    ],
)
def test_adaptive_margins(params, gap, low, accepted):
    r = VerifierSession(params).verify(0, [], TREE, near_tie(gap), low)
    assert r.tokens == ([1, 3] if accepted else [0])


def test_adaptive_prefers_the_argmax_child():
    tree = TokenTree([2, 1, 0], [-1, 0, 0], n_given=1)  # the near-tie child comes first
    r = VerifierSession(adaptive(0.05, 0.01)).verify(0, [], tree, torch.cat([near_tie(0.005), torch.zeros(1, 4)]), LOW)
    assert r.accepted == [0, 2]


def test_sampling_params_and_target_probs():
    assert SamplingParams.create().rule == Rule.GREEDY
    assert SamplingParams.create(temperature=0.7).rule == Rule.SAMPLE
    assert SamplingParams.create(temperature=0.7).temperature == 0.7
    with pytest.raises(ValueError):
        SamplingParams.create(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams.create(temperature=0.5, adaptive=True)
    logits = torch.tensor([0.0, math.log(2.0)])
    assert torch.allclose(target_probs(logits, SamplingParams(temperature=1.0)), torch.tensor([1 / 3, 2 / 3]))
    r2 = math.sqrt(2.0)
    assert torch.allclose(target_probs(logits, SamplingParams(temperature=2.0)), torch.tensor([1, r2]) / (1 + r2))
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert torch.allclose(target_probs(p.log(), SamplingParams(top_p=0.75)), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(target_probs(p.log(), SamplingParams(top_p=0.9)), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)


SAMPLE = SamplingParams(rule=Rule.SAMPLE, seed=0)


def sample_round(s: VerifierSession, tree: TokenTree, logits: torch.Tensor):
    s.next_token, s.pending = tree.tokens[0], {}  # each trial: a fresh round after y = the root
    return s.verify(0, [], tree, logits)


def test_speculative_sampling_acceptance_and_residual():
    # target p and draft q over 3 tokens; two children (tokens 1, 2) of the root y = 0, tried in order
    p, q = torch.tensor([0.6, 0.3, 0.1]), SparseDist([0, 1, 2], [0.1, 0.6, 0.3])
    # child 1: accepted with min(1, p1/q1) = 0.5. Rejected: p <- norm(max(p - q, 0)) = [1, 0, 0], so child 2
    # is accepted with p'(2)/q(2) = 0 (0.1/0.3 without the residual), and the token drawn from [1, 0, 0] is 0.
    tree = TokenTree([0, 1, 2], [-1, 0, 0], draft_dists=[None, q, q])
    logits = torch.stack([p.log(), torch.zeros(3), torch.zeros(3)])
    s = VerifierSession(SAMPLE)
    n = 2000
    results = [sample_round(s, tree, logits) for _ in range(n)]
    first = sum(r.accepted == [0, 1] for r in results)
    assert abs(first / n - 0.5) < 0.05
    assert all(r.accepted == [0] and r.tokens == [0] for r in results if r.accepted != [0, 1])


def test_speculative_sampling_over_a_tree_keeps_the_target_distribution():
    # children drawn i.i.d. from q; the first token out must be distributed as p, and the first child is
    # accepted with probability sum(min(p, q)) = 0.5
    p, qd = torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.tensor([0.5, 0.1, 0.1, 0.3])
    q = SparseDist([0, 1, 2, 3], qd.tolist())
    logits = torch.stack([p.log(), torch.zeros(4), torch.zeros(4)])
    s, g = VerifierSession(SAMPLE), torch.Generator().manual_seed(1)
    n = 3000
    counts, first = torch.zeros(4), 0
    for _ in range(n):
        kids = torch.multinomial(qd, 2, replacement=True, generator=g).tolist()
        r = sample_round(s, TokenTree([3, *kids], [-1, 0, 0], draft_dists=[None, q, q]), logits)
        counts[r.tokens[0]] += 1
        first += r.accepted == [0, 1]
    assert torch.allclose(counts / n, p, atol=0.045), counts / n
    assert abs(first / n - 0.5) < 0.05
