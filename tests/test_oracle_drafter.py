"""The calibrated drafter oracle:ALPHA: its spec, the theory it is checked against, and (with the embedded
target) that it commits the predicted tokens per round while the output stays the target's greedy output."""

from __future__ import annotations

import statistics

import pytest
from conftest import PROMPTS, hf_greedy

from dsd_node.engine.config import DrafterSpec, GenerationConfig, TreeShape
from dsd_node.ops.bench.formula import dsi_over_si_bound, expected_tau, oracle_alpha, predicted_dsi_over_si
from dsd_node.ops.bench.plan import BenchConfig


def test_drafter_spec_names() -> None:
    assert DrafterSpec.parse("self", "t") == DrafterSpec("t", 1.0)
    assert DrafterSpec.parse("oracle", "t") == DrafterSpec("t", 1.0)
    assert DrafterSpec.parse("oracle:0.7", "t") == DrafterSpec("t", 0.7)
    assert DrafterSpec.parse("oracle:0", "t").is_target
    spec = DrafterSpec.parse("embedded:drafter", "t")
    assert spec == DrafterSpec("embedded:drafter") and not spec.is_target
    for bad in ("oracle:1.5", "oracle:-0.1", "oracle:x", "oracle:"):
        with pytest.raises(ValueError, match="oracle:ALPHA needs 0 <= ALPHA <= 1"):
            DrafterSpec.parse(bad, "t")


def test_theory_formulas() -> None:
    assert expected_tau(1.0, 4) == 5.0
    assert expected_tau(0.0, 4) == 1.0
    assert expected_tau(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert oracle_alpha("oracle:0.6") == 0.6 and oracle_alpha("oracle") == 1.0 and oracle_alpha("embedded") is None
    # si's round at N=4, t1=25 ms on 2 cores: 4 drafts of 11 ms, then ~150 ms to the verdict
    r = 4 * 11 + 150
    # one round only in flight: dsi is si
    assert predicted_dsi_over_si(0.7, 4, 4, r, 11, max_inflight=1) == 1.0
    # split [y, d1] + [d2, d3, d4]: a miss at d1 or at d2 is known (k - 1) * D earlier, half the time at ALPHA 0.7
    assert 1.02 < predicted_dsi_over_si(0.7, 4, 4, r, 11, max_inflight=3) < 1.1
    # drafting costs nothing: nothing to overlap, and past the chain p = 0.7^5 is too small
    assert predicted_dsi_over_si(0.7, 4, 4, 150, 0, max_inflight=3) == 1.0
    # always usable, cheap drafts: rounds past the chain, a verdict every round / m
    assert predicted_dsi_over_si(1.0, 4, 4, 100, 0.1, max_inflight=4) == pytest.approx(4.0)
    # the bound when misses are never rescued: 1 / (1 - ALPHA^(k+1)) with free drafts, and below 1.3 at ALPHA 0.7
    assert dsi_over_si_bound(0.7, 4, 150, 0) == pytest.approx(1 / (1 - 0.7**5))
    assert dsi_over_si_bound(0.7, 4, r, 11) < 1.3 < dsi_over_si_bound(0.8, 4, r, 11)
    for a in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert 1.0 <= predicted_dsi_over_si(a, 4, 4, r, 11, 3) <= dsi_over_si_bound(a, 4, r, 11)


def test_bench_accepts_oracle_alpha_drafters() -> None:
    cfg = BenchConfig(drafters=["oracle:0.7", "embedded"])
    cfg.validate()
    assert cfg.drafter_source("oracle:0.7") == "oracle:0.7" and cfg.drafter_source("oracle") == "self"
    with pytest.raises(ValueError, match="oracle:ALPHA"):
        BenchConfig(drafters=["oracle:2"]).validate()


@pytest.fixture(scope="module")
def engines():
    from dsd_node.engine.local import LocalEngine

    return {a: LocalEngine("embedded:target", f"oracle:{a:g}", stages=2) for a in (0.0, 0.7)}


@pytest.mark.slow
def test_oracle_alpha_is_lossless_and_commits_the_predicted_tokens_per_round(engines, reference, tokenizer) -> None:
    k, n = 4, 40
    taus = []
    for i, prompt in enumerate(PROMPTS[:3]):
        ids = tokenizer(prompt)["input_ids"]
        want = hf_greedy(reference, ids, n, None)
        for mode in ("si", "dsi") if i == 0 else ("si",):
            r = engines[0.7].generate(ids, GenerationConfig(mode=mode, max_new_tokens=n, draft_k=k, ignore_eos=True))
            assert r.tokens == want, (prompt, mode)
            if mode == "si":
                taus += r.stats.accepted_per_round[:-1]  # the last round is cut by max_new_tokens
    # 0.7 at k=4: 2.77 tokens per round expected; ~40 rounds, per-round sd ~1.4 -> the mean's sd ~0.22
    assert abs(statistics.mean(taus) - expected_tau(0.7, k)) < 0.6, taus
    assert 1 < min(taus) or max(taus) == k + 1  # both whole rounds and early misses happen


@pytest.mark.slow
def test_oracle_zero_never_proposes_the_target_token_even_with_alternatives(engines, reference, tokenizer) -> None:
    ids = tokenizer(PROMPTS[2])["input_ids"]
    cfg = GenerationConfig(mode="si", max_new_tokens=24, draft_k=4, ignore_eos=True, tree=TreeShape(branch=3, branch_depth=2))
    r = engines[0.0].generate(ids, cfg)
    assert r.tokens == hf_greedy(reference, ids, 24, None)
    assert set(r.stats.accepted_per_round) == {1}  # every round: the target's own token only
