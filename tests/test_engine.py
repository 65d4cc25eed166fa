"""The engine in one process: shards, trees, KV bookkeeping, verification, against real references."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, hf_greedy
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    DynamicCache,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from dsd_node.engine.config import GenerationConfig, TreeShape
from dsd_node.engine.local import LocalEngine
from dsd_node.engine.models import ModelError, check_same_tokenizer, load_shard, split_layers
from dsd_node.engine.shard_runner import ShardRunner
from dsd_node.engine.tree import TokenTree, TreeError
from dsd_node.engine.verify import SamplingParams, target_probs

FAMILIES = {
    "llama": LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128),
    "qwen2": Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128),
    "mistral": MistralConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128),
    "gpt2": GPT2Config(vocab_size=300, n_embd=64, n_layer=4, n_head=4),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_shards_equal_the_full_model(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (1, 12))
    ref = model(ids).logits[0]
    runners = [ShardRunner(load_shard(str(tmp_path), a, b)) for a, b in [(0, 1), (1, 3), (3, 4)]]

    def run(round_id, base, tree):
        h = None
        for r in runners:
            h = r.forward("s", round_id, base, tree, h)
        return h

    assert torch.allclose(run(0, [], TokenTree.chain(ids[0, :8].tolist(), n_given=8)), ref[:8], atol=1e-5)
    for r in runners:
        r.apply("s", [(0, list(range(8)))], set())
    # a tree with a wrong branch (node 2) beside the true path 0 -> 1 -> 3
    tree = TokenTree([ids[0, 8].item(), ids[0, 9].item(), 5, ids[0, 10].item()], [-1, 0, 0, 1])
    assert torch.allclose(run(1, [], tree)[[0, 1, 3]], ref[8:11], atol=1e-5)
    # a round in flight on top of round 1's assumed path, before round 1 is committed
    assert torch.allclose(run(2, [(1, [0, 1, 3])], TokenTree([ids[0, 11].item()], [-1]))[0], ref[11], atol=1e-5)
    for r in runners:
        r.apply("s", [(1, [0, 1, 3]), (2, [0])], set())
        assert r.sessions["s"].cache.committed_len == 12 and not r.sessions["s"].cache.segments


def test_shard_holds_only_its_own_layers(tmp_path):
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"])
    model.save_pretrained(tmp_path)
    mid = load_shard(str(tmp_path), 1, 3)
    assert mid.embed is None and mid.head is None and mid.norm is None and len(mid.layers) == 2
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert sum(p.numel() for p in mid.layers.parameters()) == 2 * per_layer
    last = load_shard(str(tmp_path), 3, 4)  # tied embeddings: the head weight comes from the embedding tensor
    assert torch.equal(last.head.weight, model.lm_head.weight)


def test_unsupported_shape_and_bad_ranges_give_clear_errors(tmp_path):
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, is_decoder=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no a final norm"):
        load_shard(str(tmp_path), 0, 1)
    with pytest.raises(ModelError, match="not inside"):
        load_shard("embedded:target", 3, 99)
    with pytest.raises(ModelError, match="no such directory"):
        load_shard("/nonexistent/model-dir-that-is-not-on-the-hub-either", 0, 1)
    assert split_layers(8, 3) == [(0, 3), (3, 5), (5, 8)]


def test_drafter_with_another_tokenizer_is_refused(tokenizer, tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["some other text entirely"] * 10, vocab_size=300, special_tokens=["<|endoftext|>"])
    other = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(ModelError, match="does not share the tokenizer"):
        check_same_tokenizer(tokenizer, other, "embedded:target", "other")


@pytest.mark.slow
def test_draft_tree_budget():
    from dsd_node.engine.drafter import Drafter, DraftRequest

    d = Drafter("embedded:drafter")
    tree = d.draft("s", DraftRequest([1, 2, 3], depth=5, tree=TreeShape(branch=2, branch_depth=2))).tree
    assert len(tree) == 5 + 2 * 2 and tree.depths().count(0) == 3  # the main chain + 2 alternatives at 2 levels
    capped = d.draft("s", DraftRequest([1, 2, 3], depth=5, tree=TreeShape(branch=2, branch_depth=2, max_nodes=6)))
    assert len(capped.tree) == 6 and len(capped.main_path) == 5  # the main chain first
    assert len(d.draft("s", DraftRequest([1, 2, 3], depth=5, tree=TreeShape(max_nodes=3))).tree) == 3


def test_malformed_trees_are_refused():
    with pytest.raises(TreeError):
        TokenTree([1, 2], [-1, 1]).validate()  # a node cannot be its own parent
    with pytest.raises(TreeError):
        TokenTree([1, 2], [-1]).validate()
    with pytest.raises(TreeError):
        TokenTree([1, 99999], [-1, 0]).validate(vocab_size=2048)


@pytest.fixture(scope="module")
def engine3():
    return LocalEngine("embedded:target", "embedded:drafter", stages=3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ar", "si", "dsi"])
def test_greedy_is_lossless_in_every_mode(engine3, reference, tokenizer, mode):
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        want = hf_greedy(reference, ids, 40, tokenizer.eos_token_id)
        # min_valid_prob 0: dsi sends rounds past the chain whatever they cost (in one process nothing pays)
        got = engine3.generate(ids, GenerationConfig(mode=mode, max_new_tokens=40, draft_k=4, max_inflight=3,
                                                     min_valid_prob=0.0))
        assert got.tokens == want, f"{mode} diverged from HF generate on {prompt!r}"
        if mode != "ar":
            assert max(got.stats.accepted_per_round) > 1  # the drafter is actually used


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_greedy_lossless_with_branching_trees_and_any_cut(reference, tokenizer, stages):
    eng = LocalEngine("embedded:target", "embedded:drafter", stages=stages)
    for prompt in PROMPTS[:3]:
        ids = tokenizer(prompt)["input_ids"]
        want = hf_greedy(reference, ids, 30, tokenizer.eos_token_id)
        for mode in ("si", "dsi"):
            cfg = GenerationConfig(mode=mode, max_new_tokens=30, draft_k=5, tree=TreeShape(branch=2, branch_depth=2), max_inflight=4,
                                   min_valid_prob=0.0)
            assert eng.generate(ids, cfg).tokens == want


@pytest.mark.slow
def test_random_drafter_and_self_drafter(reference, tokenizer, random_drafter):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    want = hf_greedy(reference, ids, 30, tokenizer.eos_token_id)
    wrong = LocalEngine("embedded:target", random_drafter, stages=2)
    for mode, inflight in (("si", 1), ("dsi", 1), ("dsi", 4)):
        cfg = GenerationConfig(mode=mode, max_new_tokens=30, max_inflight=inflight, min_valid_prob=0.0)
        assert wrong.generate(ids, cfg).tokens == want
    oracle = LocalEngine("embedded:target", "self", stages=2)
    r = oracle.generate(ids, GenerationConfig(mode="si", max_new_tokens=30, draft_k=4, ignore_eos=True))
    assert r.tokens == hf_greedy(reference, ids, 30, None)
    assert r.stats.accepted_per_round[:-1] == [5] * (len(r.stats.accepted_per_round) - 1)  # k drafts + 1 per round
    r = oracle.generate(ids, GenerationConfig(mode="dsi", max_new_tokens=30, draft_k=4, max_inflight=3, ignore_eos=True,
                                              min_valid_prob=0.0))
    assert r.stats.rounds_wasted == 0 and max(r.stats.inflight) >= 1


@pytest.mark.slow
def test_rollback_stress_leaves_caches_equal_to_a_fresh_prefill(reference, tokenizer, random_drafter):
    eng = LocalEngine("embedded:target", random_drafter, stages=3)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    cfg = GenerationConfig(mode="dsi", max_new_tokens=80, draft_k=3, max_inflight=4, ignore_eos=True, min_valid_prob=0.0)
    res = eng.generate(ids, cfg, session_id="stress", keep_session=True)
    assert res.tokens == hf_greedy(reference, ids, 80, None)
    assert res.stats.rounds_wasted > 0  # rollbacks really happened
    committed = ids + res.tokens[:-1]  # the last token is committed but not yet in any cache
    fresh = DynamicCache()
    with torch.no_grad():
        reference(torch.tensor([committed]), past_key_values=fresh, use_cache=True)
    for h in eng.handlers:
        cache = h.runner.sessions["stress"].cache
        assert cache.committed_len == len(committed) and not cache.segments
        for layer in range(h.runner.shard.start, h.runner.shard.end):
            k, v = cache.committed[layer]
            assert torch.allclose(k, fresh.layers[layer].keys, atol=1e-4)
            assert torch.allclose(v, fresh.layers[layer].values, atol=1e-4)


def _exact_marginals(model, ids: list[int], params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distributions of the first and second sampled tokens under the target."""
    with torch.no_grad():
        p1 = target_probs(model(torch.tensor([ids])).logits[0, -1], params)
        support = torch.nonzero(p1).flatten()
        batch = torch.tensor([ids + [t] for t in support.tolist()])
        p2_given = target_probs(model(batch).logits[:, -1], params)
    return p1, (p1[support].unsqueeze(1) * p2_given).sum(0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["si", pytest.param("dsi", marks=pytest.mark.extended)])  # dsi: 30 s, extended tier
def test_sampling_keeps_the_target_distribution(reference, tokenizer, random_drafter, mode):
    """Multi-step speculative sampling over draft trees, with a drafter far from the target, must still sample
    the target's distribution."""
    ids = tokenizer("def ")["input_ids"]
    params = SamplingParams.create(temperature=1.0, top_p=0.9, seed=0)
    p1, p2 = _exact_marginals(reference, ids, params)
    eng = LocalEngine("embedded:target", random_drafter, stages=2)
    n = 600
    c1, c2 = torch.zeros_like(p1), torch.zeros_like(p2)
    for seed in range(n):
        cfg = GenerationConfig(mode=mode, max_new_tokens=2, draft_k=3, max_inflight=2, ignore_eos=True,
                               tree=TreeShape(branch=2, branch_depth=2),  # trees: siblings drawn i.i.d. from q
                               sampling=SamplingParams.create(temperature=1.0, top_p=0.9, seed=seed))
        toks = eng.generate(ids, cfg).tokens
        c1[toks[0]] += 1
        c2[toks[1]] += 1
    # total variation over the target's 8 most likely tokens plus one bucket for the rest
    # (sampling noise ~0.05 at n=600; a drafter-biased sampler is far off)
    tv = [_bucketed_tv(c / n, p) for c, p in ((c1, p1), (c2, p2))]
    assert max(tv) < 0.1, tv


def _bucketed_tv(emp: torch.Tensor, exact: torch.Tensor, top: int = 8) -> float:
    idx = torch.topk(exact, top).indices
    e = torch.cat([emp[idx], (1 - emp[idx].sum()).reshape(1)])
    x = torch.cat([exact[idx], (1 - exact[idx].sum()).reshape(1)])
    return 0.5 * (e - x).abs().sum().item()


@pytest.mark.slow
def test_adaptive_mode_is_explicitly_lossy_and_strict_at_zero_margins(engine3, reference, tokenizer):
    ids = tokenizer(PROMPTS[2])["input_ids"]
    want = hf_greedy(reference, ids, 40, tokenizer.eos_token_id)
    strict = SamplingParams.create(adaptive=True, adaptive_margin=0.0, adaptive_tie_margin=0.0)
    assert engine3.generate(ids, GenerationConfig(max_new_tokens=40, sampling=strict)).tokens == want
    loose = SamplingParams.create(adaptive=True, adaptive_margin=1.0, adaptive_tie_margin=1.0)
    got = engine3.generate(ids, GenerationConfig(max_new_tokens=40, tree=TreeShape(branch=0), sampling=loose))
    greedy = engine3.generate(ids, GenerationConfig(max_new_tokens=40, tree=TreeShape(branch=0)))
    # accepting everything: the output is the drafter's chain, rounds take whole drafts
    assert min(got.stats.accepted_per_round[:-1]) == 5
    assert sum(got.stats.accepted_per_round) / got.stats.rounds > sum(greedy.stats.accepted_per_round) / greedy.stats.rounds
