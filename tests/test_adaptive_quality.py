"""The quality measure of lossy decoding (the target's log-probability and regret) and the adaptive sweep."""

from __future__ import annotations

import pytest
import torch

from dsd_node.ops.bench.adaptive import AdaptiveRow, choose, run
from dsd_node.ops.bench.plan import BUILTIN_PROMPTS
from dsd_node.ops.bench.quality import ContinuationScorer, QualityGap
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow  # loads the embedded target


@pytest.fixture(scope="module")
def scorer():
    return ContinuationScorer("embedded:target")


def test_greedy_text_has_no_regret_and_a_second_choice_has_some(scorer, tokenizer):
    prompt = tokenizer(BUILTIN_PROMPTS[0])["input_ids"]
    greedy = hf_greedy(scorer.model, prompt, 12)
    lp, regret = scorer.score(prompt, greedy)
    assert regret == pytest.approx(0.0, abs=1e-6) and lp < 0
    with torch.no_grad():  # swap the first token for the target's second choice
        second = int(scorer.model(input_ids=torch.tensor([prompt])).logits[0, -1].topk(2).indices[1])
    lp2, regret2 = scorer.score(prompt, [second] + greedy[1:])
    assert regret2 < -1e-3
    gap = QualityGap(lp2, lp, regret2)
    assert gap.regret_ratio > 1.0 and gap.ppl_ratio == pytest.approx(2.718281828 ** (lp - lp2))


def test_adaptive_sweep_is_exact_at_zero_margins_and_reports_the_cost_of_loose_ones():
    prompts = [(f"builtin/{i}", BUILTIN_PROMPTS[i]) for i in (0, 4)]
    rows = run(prompts, 16, 4, 2, 25.0, settings=[(0.0, 0.0), (0.5, 0.5)])
    greedy, strict, loose = rows
    assert greedy.adaptive_margin is None and strict.adaptive_margin == 0.0
    assert strict.agreement_pct == 100.0 and strict.delta_logprob == 0.0 and strict.mean_regret == 0.0
    assert strict.tokens_per_round == greedy.tokens_per_round
    assert loose.tokens_per_round > greedy.tokens_per_round and loose.mean_regret < 0
    assert loose.modelled_tokens_per_s > greedy.modelled_tokens_per_s > 0
    assert choose(rows) in (strict, loose)
    assert choose([greedy, AdaptiveRow(**{**loose.__dict__, "within_bound": False})]) is None


@pytest.mark.extended  # starts a 2-stage testnet
def test_the_sweep_timed_through_a_testnet_commits_what_the_engine_commits(tmp_path, tokenizer):
    import asyncio

    from dsd_node.ops.bench.adaptive import time_on_testnet

    prompts = [(f"builtin/{i}", BUILTIN_PROMPTS[i]) for i in (0, 4)]
    rows = run(prompts, 16, 4, 2, 0.0, settings=[(0.0, 0.01), (0.5, 0.5)])
    asyncio.run(time_on_testnet(rows, [tokenizer(t)["input_ids"] for _, t in prompts], 16, 4, 2, 0.0, tmp_path))
    for r in rows:  # the same rule on the same tree: the same tokens per round through real stages as in one process
        assert r.measured_tokens_per_s > 0 and r.measured_tokens_per_round == pytest.approx(r.tokens_per_round, abs=1e-3)
    assert rows[2].measured_tokens_per_round > rows[0].measured_tokens_per_round  # the loose rule accepts more
