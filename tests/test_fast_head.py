"""The head's loop (ar, si, dsi) against a scripted pipeline and drafter: no weights, no processes, no network.

The fake target is a deterministic next-token function. The fake pipeline is one greedy last stage:
it keeps the committed text (what a KV cache would hold), the tentative trees of the rounds in
flight and the verified-but-uncommitted rounds, and checks the head's protocol as it goes (commits
are exactly earlier verdicts, a round's base is exactly the verified uncommitted rounds). The fake
drafter proposes the target's own continuation, except at scripted levels of scripted calls.
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from dsd_node.engine.config import GenerationConfig, TreeShape
from dsd_node.engine.drafter import Draft, DraftRequest
from dsd_node.engine.head import Head
from dsd_node.engine.messages import RoundMsg, VerdictMsg
from dsd_node.engine.speculation import AHEAD, ONE, SPLIT, DsiPolicy, Ewma, PolicyMemory
from dsd_node.engine.tree import TokenTree
from dsd_node.ops.bench.dsi_sim import scripted_verdict

V = 97
SID = "s"
PROMPT = [11, 42, 5]


def target_next(seq: list[int]) -> int:
    return (sum(seq[-2:]) * 7 + 3) % V


def greedy(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(target_next(seq))
    return seq[len(prompt) :]


class ScriptedDrafter:
    """Proposes the target's continuation of the context; on call c it goes wrong at level wrong_at[c].

    Alternatives (req.tree.branch at the first branch_depth levels) are wrong tokens, except that with
    rescue=True the first alternative at the wrong level is the right token."""

    def __init__(self, wrong_at: dict[int, int] | None = None, rescue: bool = False):
        self.wrong_at = wrong_at or {}
        self.rescue = rescue
        self.requests: list[DraftRequest] = []

    async def draft(self, session_id: str, req: DraftRequest) -> Draft:
        assert session_id == SID
        bad = self.wrong_at.get(len(self.requests))
        self.requests.append(req)
        seq, tokens, parents, main, parent = list(req.context), [], [], [], -1
        for level in range(req.depth):
            right = target_next(seq)
            tok = (right + 1) % V if level == bad else right
            main.append(len(tokens))
            tokens.append(tok)
            parents.append(parent)
            siblings_parent, parent = parent, len(tokens) - 1
            for j in range(req.tree.branch if level < req.tree.branch_depth else 0):
                tokens.append(right if (self.rescue and level == bad and j == 0) else (right + 2 + j) % V)
                parents.append(siblings_parent)
            seq.append(tok)
        return Draft(TokenTree(tokens, parents), main)


class ScriptedPipeline:
    """Every stage at once, ending in a greedy verifier over target_next; rounds in force_stale come back stale."""

    def __init__(self, force_stale: set[int] | None = None):
        self.force_stale = force_stale or set()
        self.sent: list[RoundMsg] = []
        self.received: list[VerdictMsg] = []  # verdicts the head has taken
        self.queue: deque[VerdictMsg] = deque()
        self.epoch = 0
        self.text: list[int] = []  # the committed prefix: what every stage's KV cache holds
        self.trees: dict[int, TokenTree] = {}  # tentative rounds
        self.pending: dict[int, list[int]] = {}  # verified, uncommitted round -> accepted path
        self.y: int | None = None  # the next token: committed by the last verdict, in no cache yet

    async def send(self, msg: RoundMsg) -> None:
        assert msg.session_id == SID
        assert len(self.sent) < 500, "the head keeps sending rounds without making progress"
        self.sent.append(msg)
        tree = msg.tree if msg.epoch >= self.epoch else TokenTree([], [])  # an older epoch: commit-only
        self.epoch = max(self.epoch, msg.epoch)
        for rid, keep in msg.commits:
            assert self.pending.pop(rid, None) == keep, f"round {msg.round_id} commits {rid}:{keep}, not a verdict"
            self.text += [self.trees[rid].tokens[i] for i in keep]
        self.trees = {rid: t for rid, t in self.trees.items() if rid in {b for b, _ in msg.base}}
        if tree.tokens:
            tree.validate(V)
            self.trees[msg.round_id] = tree
            self.queue.append(self._verify(msg, tree))

    async def recv(self) -> VerdictMsg:
        assert self.queue, "the head waits for a verdict that no round will produce"
        self.received.append(self.queue.popleft())
        return self.received[-1]

    def _verify(self, msg: RoundMsg, tree: TokenTree) -> VerdictMsg:
        if msg.round_id in self.force_stale:
            return VerdictMsg(SID, msg.round_id, msg.epoch, stale=True)
        return scripted_verdict(self, msg, tree, target_next)


async def generate(
    cfg: GenerationConfig,
    drafter: ScriptedDrafter | None = None,
    pipe: ScriptedPipeline | None = None,
    eos: int | None = None,
    depth: int = 1,
    prompt: list[int] = PROMPT,
    policy: DsiPolicy | None = None,
):
    """Run the head, flush its last commits, and check what every stage would hold afterwards.

    dsi runs with `eager()` unless a policy is given: the protocol tests want rounds in flight."""
    pipe = pipe or ScriptedPipeline()
    if policy is None and cfg.mode == "dsi":
        policy = eager()
    streamed: list[int] = []

    async def on_tokens(toks: list[int]) -> None:
        streamed.extend(toks)

    head = Head(SID, pipe, drafter, cfg, eos_token_id=eos, on_tokens=on_tokens, pipeline_depth=depth, policy=policy)
    out = await head.run(list(prompt))
    assert streamed == out
    await head.flush()
    assert pipe.text == head.known[:-1]  # every accepted token is committed exactly once, y excepted
    s = head.stats
    assert s.new_tokens == len(out)
    assert s.rounds == len(pipe.sent) - 1 == len(s.accepted_per_round) + s.rounds_wasted + len(head.inflight)
    return out, head, pipe


def eager() -> DsiPolicy:
    """A policy that believes every draft is right and that rounds cost nothing: as many rounds in flight as allowed."""
    return DsiPolicy(min_valid_prob=0.05, stages=0, hits=1e9, tries=1e9, explore_every=0)


def frozen(alpha: float, wait_ms: float, draft_ms: float, stages: int = 4, min_valid_prob: float = 0.35,
           overhead_ms: float = 8.0) -> DsiPolicy:
    """A policy whose figures stay as given whatever the scripted pipeline's timing (weight 0, a huge prior)."""
    return DsiPolicy(min_valid_prob, stages, alpha * 1e9, 1e9, Ewma(wait_ms, 0.0), Ewma(draft_ms, 0.0),
                     Ewma(wait_ms + overhead_ms, 0.0), Ewma(draft_ms, 0.0), explore_every=0)


def chain(k: int, **kw) -> GenerationConfig:
    return GenerationConfig(mode="si", draft_k=k, tree=TreeShape(branch=0), **kw)


def dsi(k: int, inflight: int, **kw) -> GenerationConfig:
    kw = {"tree": TreeShape(branch=0), "min_valid_prob": 0.05, **kw}
    return GenerationConfig(mode="dsi", draft_k=k, max_inflight=inflight, **kw)


@pytest.mark.parametrize("k", [1, 3, 6])
async def test_si_accept_all_gives_k_plus_one_tokens_per_round(k):
    n = 4 * (k + 1)
    out, head, pipe = await generate(chain(k, max_new_tokens=n), ScriptedDrafter())
    assert out == greedy(PROMPT, n)
    assert head.stats.accepted_per_round == [k + 1] * 4 and head.stats.rounds_wasted == 0
    first, *rest, _flush = pipe.sent
    assert first.tree.n_given == len(PROMPT) and first.tree.tokens == PROMPT + greedy(PROMPT, k)
    for prev, msg in zip(pipe.sent, rest, strict=False):
        verdict = pipe.received[prev.round_id]
        assert msg.commits == [(prev.round_id, verdict.accepted)] and msg.base == []
        assert msg.tree.parents[0] == -1 and msg.tree.tokens[0] == verdict.tokens[-1]  # y, then k drafts
        assert len(msg.tree) == k + 1


@pytest.mark.parametrize("d", [0, 1, 3])
async def test_si_reject_at_depth_d(d):
    drafter = ScriptedDrafter(wrong_at={1: d, 2: d})
    out, head, _ = await generate(chain(4, max_new_tokens=20), drafter)
    assert out == greedy(PROMPT, 20)
    assert head.stats.accepted_per_round[:3] == [5, d + 1, d + 1]  # d draft tokens pass, then the target's own
    assert head.stats.rounds_wasted == 0


async def test_alternative_leaf_rescues_a_rejected_main_token():
    cfg = GenerationConfig(mode="si", draft_k=4, max_new_tokens=12, tree=TreeShape(branch=1, branch_depth=2))
    out, head, pipe = await generate(cfg, ScriptedDrafter(wrong_at={0: 1}, rescue=True))
    assert out == greedy(PROMPT, 12)
    # main[0] passes, main[1] is wrong but its sibling (a leaf) is right, then the target's next token
    assert head.stats.accepted_per_round[0] == 3
    tree, accepted = pipe.sent[0].tree, pipe.received[0].accepted
    n = len(PROMPT)
    assert tree.parents[accepted[-1]] == accepted[-2] == n and accepted[-1] != n + 2  # not the main chain's node
    assert pipe.sent[1].commits == [(0, accepted)]


async def test_ar_is_one_token_per_round():
    cfg = GenerationConfig(mode="ar", max_new_tokens=6)
    out, head, pipe = await generate(cfg, drafter=None)
    assert out == greedy(PROMPT, 6)
    assert head.stats.accepted_per_round == [1] * 6 and head.stats.rounds == 6
    assert pipe.sent[0].tree.tokens == PROMPT and pipe.sent[0].tree.n_given == len(PROMPT)
    assert [m.tree.tokens for m in pipe.sent[1:-1]] == [[t] for t in out[:-1]]


async def test_dsi_accept_all_keeps_rounds_in_flight_on_assumed_paths():
    out, head, pipe = await generate(dsi(3, 3, max_new_tokens=40), ScriptedDrafter(), depth=3)
    assert out == greedy(PROMPT, 40)
    assert head.stats.rounds_wasted == 0 and not any(v.stale for v in pipe.received)
    assert max(head.stats.inflight) == 2  # the third round was sent with two ahead of it
    verdicts = {v.round_id: v for v in pipe.received}
    for msg in pipe.sent[:-1]:
        # a round builds on every earlier round still in flight, with the path that round turned out to accept
        assert [rid for rid, _ in msg.base] == list(range(msg.round_id - len(msg.base), msg.round_id))
        assert all(verdicts[rid].accepted == path for rid, path in msg.base)
    assert head.stats.accepted_per_round[:5] == [4] * 5


async def test_dsi_keeps_pipelining_up_to_max_new_tokens():
    # each token the rounds in flight assume is counted once: a pure-draft round's first token is its guess for
    # the token its predecessor's verdict adds, so the head does not stop speculating early near the end
    drafter = ScriptedDrafter()
    out, head, _ = await generate(dsi(4, 3, max_new_tokens=30), drafter, depth=3)
    assert out == greedy(PROMPT, 30)
    assert [r.depth for r in drafter.requests] == [4, 5, 5, 5, 5, 5] and head.stats.inflight == [0, 1, 2, 2, 2, 2]


async def test_dsi_rejection_makes_later_rounds_stale_and_their_verdicts_are_ignored():
    # round 0's draft goes wrong at level 1: rounds 1 and 2, sent on its assumed path, are wasted
    out, head, pipe = await generate(dsi(4, 3, max_new_tokens=30), ScriptedDrafter(wrong_at={0: 1}), depth=3)
    assert out == greedy(PROMPT, 30)
    assert [m.round_id for m in pipe.sent[:3]] == [0, 1, 2] and head.stats.inflight[:3] == [0, 1, 2]
    assert pipe.received[0].accepted == list(range(len(PROMPT) + 1))  # the prompt and one draft token
    assert [v.round_id for v in pipe.received[1:3]] == [1, 2] and all(v.stale for v in pipe.received[1:3])
    assert head.stats.rounds_wasted == 2  # counted once, when round 0's verdict broke their assumption
    restart = pipe.sent[3]
    assert restart.epoch == 1 and restart.base == [] and restart.commits == [(0, pipe.received[0].accepted)]
    assert restart.tree.tokens[0] == pipe.received[0].tokens[-1]
    assert all(m.epoch == 1 for m in pipe.sent[3:])
    assert head.stats.accepted_per_round[0] == 2


async def test_dsi_wrong_first_token_of_the_next_round_is_caught_on_the_verdict_before_it():
    # round 0 is accepted whole, but round 1's root (its guess of round 0's last token) is wrong
    out, head, pipe = await generate(dsi(4, 3, max_new_tokens=30), ScriptedDrafter(wrong_at={1: 0}), depth=3)
    assert out == greedy(PROMPT, 30)
    assert pipe.received[0].accepted == list(range(len(PROMPT) + 4)) and head.stats.rounds_wasted == 2
    assert (
        pipe.sent[3].epoch == 1 and pipe.sent[3].base == [] and pipe.sent[3].commits == [(0, pipe.received[0].accepted)]
    )


async def test_dsi_stale_verdict_from_the_pipeline_restarts_from_the_committed_text():
    pipe = ScriptedPipeline(force_stale={2})  # e.g. a stage lost the round
    out, head, _ = await generate(dsi(3, 3, max_new_tokens=40), ScriptedDrafter(), pipe=pipe, depth=3)
    assert out == greedy(PROMPT, 40)
    restart = next(i for i, m in enumerate(pipe.sent) if m.epoch == 1)
    behind = [m.round_id for m in pipe.sent[:restart] if m.round_id > 2]  # given up with round 2
    assert behind and head.stats.rounds_wasted == 1 + len(behind)
    # rounds 0 and 1 were committed on the rounds sent after their verdicts; the restart starts from y
    assert [m.commits for m in pipe.sent[3:5]] == [[(0, pipe.received[0].accepted)], [(1, pipe.received[1].accepted)]]
    assert pipe.sent[restart].base == [] and pipe.sent[restart].commits == []
    assert pipe.sent[restart].tree.tokens[0] == pipe.received[1].tokens[-1]


@pytest.mark.parametrize("mode", ["ar", "si", "dsi"])
@pytest.mark.parametrize("n", [1, 7])
async def test_max_new_tokens_cut(mode, n):
    cfg = GenerationConfig(mode=mode, draft_k=4, max_new_tokens=n, max_inflight=3, tree=TreeShape(branch=0))
    drafter = None if mode == "ar" else ScriptedDrafter()
    out, head, _ = await generate(cfg, drafter, depth=3)
    assert out == greedy(PROMPT, n)
    for req in drafter.requests if drafter else []:
        assert req.depth <= n + 1  # no round drafts far beyond the tokens still wanted


@pytest.mark.parametrize("mode", ["ar", "si", "dsi"])
async def test_eos_cut(mode):
    ref = greedy(PROMPT, 40)
    i = next(i for i in range(6, 40) if ref[i] not in ref[:i])  # a token first seen at position i
    cfg = GenerationConfig(mode=mode, draft_k=3, max_new_tokens=40, max_inflight=2, tree=TreeShape(branch=0))
    out, _, _ = await generate(cfg, None if mode == "ar" else ScriptedDrafter(), eos=ref[i], depth=2)
    assert out == ref[: i + 1]
    cfg.ignore_eos = True
    out, _, _ = await generate(cfg, None if mode == "ar" else ScriptedDrafter(), eos=ref[i], depth=2)
    assert out == ref


async def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="needs a drafter"):
        Head(SID, ScriptedPipeline(), None, GenerationConfig(mode="si"))
    with pytest.raises(ValueError, match="unknown mode"):
        Head(SID, ScriptedPipeline(), ScriptedDrafter(), GenerationConfig(mode="fast"))
    with pytest.raises(ValueError, match="empty prompt"):
        await Head(SID, ScriptedPipeline(), ScriptedDrafter(), GenerationConfig()).run([])


# ---------------------------------------------------------------------------------------------------------------------
# dsi's scheduling from measured figures (dsd_node.engine.speculation): split chains, speculation past them


def test_policy_splits_a_chain_where_an_early_miss_is_likely_and_not_where_it_is_rare():
    # 2-core figures of oracle:ALPHA at N=4, t1=25 ms: ~11 ms per drafted token, ~150 ms from send to verdict
    assert frozen(0.7, 150, 11).split(4) == 1
    assert frozen(0.6, 150, 11).split(4) == 1
    assert frozen(0.95, 150, 11).split(4) == 4  # the chain is usually accepted whole: one round, as si
    assert frozen(0.7, 150, 0).split(4) == 4  # drafting costs nothing: nothing to hide behind the first round
    p = frozen(0.7, 150, 11)
    assert p.chain_time(1, 4) < p.chain_time(4, 4) == 4 * 11 + 150
    # a compute-bound pipeline (t1 = 0): a round sent behind another waits a whole pass longer: no split
    assert frozen(0.7, 40, 11, overhead_ms=40).split(4) == 4
    # drafting B competes with A's compute (the drafter shares cores with the stages): twice as slow, no split
    busy = frozen(0.7, 150, 11)
    busy.draft_busy_ms_per_token = Ewma(22.0, 0.0)
    assert busy.split(4) == 4
    assert frozen(0.7, 40, 11, overhead_ms=2).split(4) == 1


def test_policy_lets_the_realized_chain_times_overrule_the_model():
    p = frozen(0.7, 150, 11)
    p.explore_every = 4
    assert p.model_split(4) == 1
    assert p.split(4) == 4  # si's way first, to have something to compare with
    p.saw_chain(ONE, 300.0, 3)
    assert p.split(4) == 1  # then the split
    p.saw_chain(SPLIT, 600.0, 3)  # the split was slower here (e.g. drafting and stages sharing two cores)
    assert p.split(4) == 4
    p.saw_chain(ONE, 300.0, 3)
    assert p.split(4) == 4
    p.saw_chain(ONE, 300.0, 3)
    assert p.split(4) == 4
    p.saw_chain(ONE, 300.0, 3)
    assert p.split(4) == 1  # the slower way still gets 1 chain in explore_every: tried again
    p.saw_chain(SPLIT, 100.0, 5)  # and now the split is faster overall: 700 ms / 8 tokens < 1200 / 12
    assert p.chain_rate(SPLIT) < p.chain_rate(ONE) and p.split(4) == 1


async def test_a_routes_next_session_starts_from_what_its_last_one_measured():
    memory = PolicyMemory(max_routes=2, prior_tries=16.0, chain_memory=32)
    first = memory.policy("route-a", 0.35, 4)
    assert not first.measured() and first.accept_rate == 0.5  # nothing kept yet: the priors
    out, _, _ = await generate(dsi(4, 3, max_new_tokens=60), ScriptedDrafter(wrong_at={3: 0, 6: 2}), depth=4,
                               policy=first)
    assert out == greedy(PROMPT, 60) and first.measured() and first.tries > 16
    memory.keep("route-a", first)
    second = memory.policy("route-a", 0.2, 4)
    assert second is not first and second.min_valid_prob == 0.2  # the session's own settings
    assert second.wait_ms.value == first.wait_ms.value and second.draft_ms_per_token.value == first.draft_ms_per_token.value
    assert second.tries == pytest.approx(16.0) and second.accept_rate == pytest.approx(first.accept_rate)
    second.saw_wait(1e6)
    assert first.wait_ms.value < 1e6  # a copy: the new session's figures do not change the kept ones
    assert not memory.policy("route-b", 0.35, 4).measured()  # another route learns for itself
    memory.keep("route-b", DsiPolicy())
    memory.keep("route-c", DsiPolicy())
    assert len(memory) == 2 and not memory.policy("route-a", 0.35, 4).measured()  # the least recently used went


def test_kept_chain_rates_are_bounded_so_a_change_is_still_seen():
    old = frozen(0.7, 150, 11)
    for _ in range(100):
        old.saw_chain(ONE, 300.0, 3)
        old.saw_chain(SPLIT, 600.0, 3)
    new = DsiPolicy()
    new.carry_from(old, prior_tries=16.0, chain_memory=32)
    assert sum(new.chain_count.values()) == pytest.approx(32)
    assert new.chain_rate(ONE) == pytest.approx(100.0) and new.chain_rate(SPLIT) == pytest.approx(200.0)
    for _ in range(30):  # the split became faster on this route: a few sessions' chains turn the comparison
        new.saw_chain(SPLIT, 100.0, 3)
    assert new.chain_rate(SPLIT) < new.chain_rate(ONE)


class SlowAfterWaste(ScriptedPipeline):
    """The first round of each new epoch (sent behind wasted rounds) waits `extra_s` for its verdict."""

    def __init__(self, extra_s: float):
        super().__init__()
        self.extra_s, self.slow = extra_s, set()

    async def send(self, msg: RoundMsg) -> None:
        if msg.epoch > 0 and msg.tree.tokens and not any(m.epoch == msg.epoch and m.tree.tokens for m in self.sent):
            self.slow.add(msg.round_id)
        await super().send(msg)

    async def recv(self) -> VerdictMsg:
        v = await super().recv()
        if v.round_id in self.slow:
            await asyncio.sleep(self.extra_s)
        return v


async def test_what_wasted_rounds_cost_the_next_chain_is_charged_to_the_way_that_wasted_them():
    # the model always splits (frozen figures: 150 ms alone); a round after waste waits 200 ms: 50 ms is the waste's
    p = DsiPolicy(0.35, 4, 0.7e9, 1e9, Ewma(150.0, 0.0), Ewma(11.0, 0.0), Ewma(158.0, 0.0), Ewma(11.0, 0.0),
                  explore_every=0)
    pipe = SlowAfterWaste(0.2)
    out, head, _ = await generate(dsi(4, 3, max_new_tokens=40), ScriptedDrafter(wrong_at={2: 0, 5: 1, 8: 0}),
                                  pipe=pipe, depth=4, policy=p)
    assert out == greedy(PROMPT, 40) and head.stats.rounds_wasted >= 1 and pipe.slow
    charged = p.waste_charged_ms[SPLIT]
    assert 0.8 * 50 * len(pipe.slow) <= charged <= 50 * len(pipe.slow) + 100  # each after-waste wait, less 150 ms
    assert p.waste_charged_ms[ONE] == p.waste_charged_ms[AHEAD] == 0.0
    assert p.charge_waste(ONE, 100.0) == 0.0 and p.charge_waste(ONE, 170.0) == pytest.approx(20.0)
    assert DsiPolicy().charge_waste(SPLIT, 500.0) == 0.0  # nothing to compare with before a wait is measured


def test_policy_measures_the_overhead_of_a_round_behind_another_from_the_waits():
    p = DsiPolicy(0.35, 4)
    assert p.overhead_ms == 8.0  # not measured yet: 2 ms per stage
    for _ in range(20):
        p.saw_wait(60.0)
        p.saw_wait(95.0, behind=True)
    assert p.overhead_ms == pytest.approx(35.0)
    p.saw_wait(10.0, behind=True)
    assert p.overhead_ms < 35.0


def test_policy_speculates_past_the_chain_only_when_the_round_is_likely_used_and_the_wait_hides_it():
    assert frozen(0.95, 150, 2).speculate(5, 5, 150)
    assert not frozen(0.7, 150, 2).speculate(5, 5, 150)  # p = 0.7^5 = 0.17: below min_valid_prob
    assert not frozen(0.95, 150, 11).speculate(5, 5, 20)  # little wait left to hide 55 ms of drafting in
    assert not frozen(0.95, 30, 11, min_valid_prob=0.05).speculate(5, 5, 0)  # t1 = 0: nothing to hide


async def test_dsi_sends_a_split_chain_as_two_rounds_with_the_tokens_si_would_send():
    drafter = ScriptedDrafter()
    cfg = dsi(4, 3, max_new_tokens=20)
    out, head, pipe = await generate(cfg, drafter, depth=4, policy=frozen(0.7, 150, 11))
    assert out == greedy(PROMPT, 20)
    assert [r.depth for r in drafter.requests[:4]] == [1, 3, 1, 3]  # [y, d1], then [d2, d3, d4] on top of it
    assert head.stats.accepted_per_round[:4] == [2, 3, 2, 3] and head.stats.rounds_wasted == 0
    a, b = pipe.sent[0], pipe.sent[1]
    assert a.tree.tokens == PROMPT + greedy(PROMPT, 1) and b.base == [(0, list(range(len(PROMPT) + 1)))]
    assert b.tree.tokens == greedy(PROMPT, 4)[1:] and b.tree.parents == [-1, 0, 1]
    assert max(head.stats.inflight) == 1  # nothing past the chain: 0.7^4 is below min_valid_prob


class Recording(DsiPolicy):
    """A frozen policy that records which rounds' waits were taken as sent behind another round."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.behind: list[bool] = []

    def saw_wait(self, ms: float, behind: bool = False) -> None:
        self.behind.append(behind)


async def test_dsi_split_chain_restarts_from_the_first_rounds_verdict_when_it_misses():
    drafter = ScriptedDrafter(wrong_at={0: 0})  # the first round's only draft is wrong: its second round is wasted
    policy = Recording(0.35, 4, 0.7e9, 1e9, Ewma(150, 0.0), Ewma(11, 0.0), Ewma(158, 0.0), Ewma(11, 0.0), 0)
    out, head, pipe = await generate(dsi(4, 3, max_new_tokens=20), drafter, depth=4, policy=policy)
    assert out == greedy(PROMPT, 20)
    assert pipe.received[0].accepted == list(range(len(PROMPT))) and head.stats.rounds_wasted == 1
    restart = pipe.sent[2]
    assert restart.epoch == 1 and restart.base == [] and restart.commits == [(0, pipe.received[0].accepted)]
    assert restart.tree.tokens == greedy(PROMPT, 2)  # y (the target's own token), then one draft: split again
    # waits (the prompt's round prefills: not taken): the restart behind wasted round 1 (its expected 150 ms
    # are not over), then the restart's second round behind it
    assert policy.behind[:2] == [True, True]


async def test_dsi_is_si_when_there_is_no_wait_to_hide_drafting_in():
    # the scripted pipeline answers at once and drafts cost nothing: the measured figures say no split and
    # nothing ahead, so dsi sends exactly si's rounds (also from the start: no bet before anything is measured)
    cfg_si, cfg_dsi = chain(4, max_new_tokens=30), dsi(4, 3, max_new_tokens=30, min_valid_prob=0.35)
    drafter = ScriptedDrafter(wrong_at={2: 1, 5: 3})
    _, _, si_pipe = await generate(cfg_si, drafter)
    drafter = ScriptedDrafter(wrong_at={2: 1, 5: 3})
    out, head, pipe = await generate(cfg_dsi, drafter, depth=4, policy=DsiPolicy(0.35, 4))
    assert out == greedy(PROMPT, 30)
    assert max(head.stats.inflight) == 0 and head.stats.rounds_wasted == 0
    assert [m.tree for m in pipe.sent] == [m.tree for m in si_pipe.sent]


async def test_dsi_tries_si_and_the_split_and_keeps_the_faster():
    # the scripted pipeline answers at once, so the realized chains decide, whatever the frozen model says
    p = frozen(0.7, 150, 11)
    p.explore_every = 4
    out, head, _ = await generate(dsi(4, 3, max_new_tokens=60), ScriptedDrafter(wrong_at={3: 0, 6: 2}), depth=4,
                                  policy=p)
    assert out == greedy(PROMPT, 60)
    assert p.chain_count[ONE] >= 1 and p.chain_count[SPLIT] >= 1
    assert 0 < sum(p.chain_tokens.values()) <= len(out)  # every chain's tokens counted once, the prompt's not


async def test_dsi_speculates_past_the_chain_when_whole_rounds_are_likely():
    out, head, _ = await generate(dsi(4, 3, max_new_tokens=40), ScriptedDrafter(), depth=4,
                                  policy=frozen(0.95, 150, 2))
    assert out == greedy(PROMPT, 40)
    assert max(head.stats.inflight) == 2 and head.stats.rounds_wasted == 0


def test_rounds_past_the_chain_go_only_while_such_chains_realize_more_tokens_per_ms():
    p = frozen(0.95, 150, 2)
    p.explore_every = 4
    assert p.speculate(5, 5, 150.0)  # the model says they pay
    assert not p.may_go_ahead()  # si's way first, to have something to compare with
    p.saw_chain(ONE, 300.0, 3)
    assert p.may_go_ahead()
    p.saw_chain(AHEAD, 900.0, 3)  # slower here (a compute-bound pipeline: the rounds queue behind each other)
    assert not p.may_go_ahead()
    for _ in range(3):
        p.saw_chain(ONE, 300.0, 3)
    assert p.may_go_ahead()  # the loser keeps 1 chain in explore_every
    p.saw_chain(AHEAD, 100.0, 9)  # and now faster overall: 1000 ms / 12 tokens < 1200 / 12
    assert p.may_go_ahead()
    p.min_valid_prob = 0.0
    p.saw_chain(AHEAD, 1e6, 1)
    assert p.may_go_ahead()  # min_valid_prob 0: always (how tests drive rollbacks)


async def test_dsi_sends_no_round_past_the_chain_where_such_chains_were_slower():
    p = frozen(0.95, 150, 2)
    p.explore_every = 8
    for _ in range(3):  # slow chains with rounds past them, each tried again after 7 others: the last one just now
        for _ in range(7):
            p.saw_chain(ONE, 300.0, 5)
        p.saw_chain(AHEAD, 3000.0, 5)
    out, head, _ = await generate(dsi(4, 3, max_new_tokens=24), ScriptedDrafter(), depth=4, policy=p)
    assert out == greedy(PROMPT, 24)
    assert max(head.stats.inflight) == 0 and head.stats.rounds_wasted == 0  # si's rounds, one at a time
    assert p.chain_count[AHEAD] == 3 and p.chain_count[ONE] > 21  # its own chains went the faster way


def test_the_losing_way_is_tried_again_after_explore_every_chains_across_sessions():
    """Counted in chains since it was last taken, not as a share of the kept chains: those are capped, so a way
    that lost on a route's first (cold) chains would otherwise keep its share, and its figure, for many sessions."""
    memory = PolicyMemory(chain_memory=32)
    p = memory.policy("route", 0.35, 4)
    p.saw_chain(ONE, 300.0, 5)
    p.saw_chain(AHEAD, 9000.0, 5)  # a cold first chain: far slower than it will be
    for _ in range(30):
        p.saw_chain(ONE, 300.0, 5)
    memory.keep("route", p)
    q = memory.policy("route", 0.35, 4)  # the next session: counts scaled to 32 chains, AHEAD still ~1 of them
    assert q.chain_count[AHEAD] < 32 / q.explore_every
    assert q.may_go_ahead()  # 30 chains since it was taken: tried again
    q.saw_chain(AHEAD, 1000.0, 5)
    assert not q.may_go_ahead()  # (still slower overall) then 7 chains the faster way first
    for _ in range(q.explore_every - 1):
        q.saw_chain(ONE, 300.0, 5)
    assert q.may_go_ahead()


async def test_chains_cut_by_the_token_budget_do_not_bill_si_s_way_for_the_sessions_end():
    """Near a session's end a round drafts fewer tokens and there is no room past the chain: such chains (si's way
    or split) are not recorded. A chain with rounds past it is, up to the session's end (its accepted runs)."""
    one = frozen(0.95, 150, 2)
    one.explore_every, one.min_valid_prob = 0, 1.0  # never a round past the chain: every chain is si's round
    out, head, pipe = await generate(dsi(4, 3, max_new_tokens=22), ScriptedDrafter(), depth=4, policy=one)
    assert out == greedy(PROMPT, 22)
    assert head.stats.accepted_per_round == [5, 5, 5, 5, 3] and len(pipe.sent[4].tree) == 3  # 2 drafts: cut
    assert one.chain_count[ONE] == 3 and one.chain_tokens[ONE] == 15  # not the prompt's, not the cut one
    ahead = frozen(0.95, 150, 2)
    ahead.explore_every = 0
    # the first round past the prompt's guesses wrong: wasted; from the prompt's verdict on, one chain of whole
    # rounds with rounds past it, to the end (its last round cut by the budget): recorded, with all its tokens
    out, head, _ = await generate(dsi(4, 3, max_new_tokens=40), ScriptedDrafter(wrong_at={1: 0}), depth=4,
                                  policy=ahead)
    assert out == greedy(PROMPT, 40) and head.stats.rounds_wasted > 0 and max(head.stats.inflight) == 2
    assert ahead.chain_count == {ONE: 0, SPLIT: 0, AHEAD: 1} and ahead.chain_tokens[AHEAD] == 40 - 5


@pytest.mark.parametrize("policy", ["split", "ahead", "eager"])
@pytest.mark.parametrize("seed", range(6))
async def test_dsi_output_is_the_targets_whatever_the_misses(policy, seed):
    import random

    rng = random.Random(seed)
    wrong_at = {c: rng.randrange(5) for c in range(60) if rng.random() < 0.5}
    pol = {"split": frozen(0.6, 150, 11), "ahead": frozen(0.97, 150, 1), "eager": eager()}[policy]
    cfg = dsi(4, 3, max_new_tokens=37, tree=TreeShape(branch=1, branch_depth=2))
    out, head, _ = await generate(cfg, ScriptedDrafter(wrong_at, rescue=seed % 2 == 0), depth=4, policy=pol)
    assert out == greedy(PROMPT, 37)
    assert head.stats.rounds_wasted > 0 and max(head.stats.inflight) >= 1  # the scheme was exercised


@pytest.mark.parametrize("alpha", [0.6, 0.9])
async def test_dsi_over_a_timed_pipeline_stays_exact(alpha):
    # the bench's simulator (dsd_node.ops.bench.dsi_sim): real waits (scaled down), so the policy measures real
    # figures and splits chains or sends rounds past them as it would on a network; the output is checked there
    from dsd_node.ops.bench.dsi_sim import Costs
    from dsd_node.ops.bench.dsi_sim import generate as sim_generate

    costs = Costs(stages=4, t1_ms=2.5, stage_ms=0.7, node_ms=0.15, draft_ms=1.1)
    for seed in range(2):
        for mode in ("si", "dsi"):
            ms, out = await sim_generate(mode, alpha, costs, seed, n=24)
            assert len(out) == 24 and ms > 0


async def test_min_valid_prob_zero_always_pipelines():
    # what the one-process engine tests use to drive rounds in flight and rollbacks with real models
    pol = DsiPolicy(0.0, 4)
    assert pol.speculate(50, 5, 0.0)
    out, head, _ = await generate(dsi(3, 3, max_new_tokens=30, min_valid_prob=0.0), ScriptedDrafter(wrong_at={2: 1}),
                                  depth=3, policy=pol)
    assert out == greedy(PROMPT, 30)
    assert max(head.stats.inflight) == 2 and head.stats.rounds_wasted > 0
