"""How dsi schedules its rounds: where to split a round's draft chain, and whether to speculate past it.

The head measures, per session, what the choice depends on (as Sequoia sizes its trees from measured
acceptance and verify cost): the per-token acceptance a (every draft token a verdict checked: hits and
misses along the main path), the wait W from sending a round to its verdict, and the drafter's cost D
per drafted token (as the head waits for it).

Split. si drafts a chain of k tokens, then sends [y, d1..dk] and waits. dsi sends the same chain in two
rounds: A = [y, d1..dj] as soon as j tokens are drafted, then B = [d(j+1)..dk] built on A. Nothing is
bet that si would not draft anyway: B's tokens are si's own. When A's verdict stops inside A (its drafts
miss, or its added token is not d(j+1)), B is wasted but the next round starts from A's verdict, up to
(k - j)·D earlier than si's; when it does not, B's verdict arrives when si's would have. With
q = a^(j+1), the expected time from a restart to the verdict that ends the chain is

    T(j) = q·(j·D + (k - j)·D' + W) + (1 - q)·max(j·D + W, j·D + (k - j)·D') + [j < k]·overhead

(the head drafts B while A travels, so A's verdict is read after B is drafted). D' is the drafting time per
token measured while a round is in flight: where the drafter shares cores (or, colocated with stage 0, a
process) with the pipeline, drafting B competes with A's compute and D' > D. `overhead` is what a round
costs the rounds behind it: measured as the wait of rounds sent behind another one still in the pipeline
(B, or the round after a wasted one) less the wait of rounds sent alone. Where the pipeline is compute-
bound (t1 = 0 on two cores) that is a whole pass, and the head stops splitting; where it is link-bound,
about nothing. Before it is measured it is ROUND_OVERHEAD_MS_PER_STAGE per stage. The head takes the j
that minimizes T; j = k is si's round.

Past the chain. One more round on top of those in flight (the guess for the last one's added token and
k drafts) is usable with probability p = a^S, S the tokens it assumes. Sent now, and usable, its verdict
comes the remaining wait R of the newest round in flight earlier; its drafting (m·D') blocks the head's
loop, and when it is wasted that drafting and its stage compute were taken from the rounds that count:

    send iff p >= min_valid_prob and p·R - max(0, m·D' - R) > (1 - p)·(m·D' + overhead)

The realized rates decide. The model leaves out what the machine adds (drafting and stages taking turns on
shared cores, a busier pipeline), so each chain is recorded by the way it went: ONE (si's round), SPLIT, or
AHEAD (rounds past the chain were sent during it), with its ms and committed tokens. Where the model proposes
a split, the split is used only while split chains realize fewer ms per token than ONE's; rounds past the
chain only while AHEAD chains do. The way that lost is taken again after `explore_every` - 1 chains of the
others, so a change is seen. ONE and SPLIT chains that the token budget cuts (a round with fewer drafts, or
no room for a round past the chain: a session's last few) are not recorded: near a session's end only those
ways are possible, and they would be billed for the session's end. An AHEAD chain is recorded up to the
session's end: left out, its long runs of accepted rounds (the ones that reach the end) would be missing.

Memory. A 32-token generation has about ten chains: learning the figures above within one session costs a
good part of it (split chains and rounds past the chain sent on the prior, before the overhead of a round
behind another is known). `PolicyMemory` carries a route's figures from one session to the next on it (the
waits, the overhead, drafting costs and the realized rates of the ways, acceptance as a weak prior), so only
a route's first session learns; the realized rates decide as above.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

ONE, SPLIT, AHEAD = "one", "split", "ahead"  # the ways a chain can go (see "The realized rates decide")
ROUND_OVERHEAD_MS_PER_STAGE = 2.0  # prior for one more round through a stage (~2 ms per hop: DESIGN.md)


@dataclass
class Ewma:
    value: float | None = None
    weight: float = 0.3

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.weight) * self.value + self.weight * x


@dataclass
class DsiPolicy:
    """The measured figures of one session and the two decisions made from them."""

    min_valid_prob: float = 0.35
    stages: int = 1
    hits: float = 1.0  # per-token acceptance: a Beta(1, 1) prior, so a = 0.5 before any verdict
    tries: float = 2.0
    wait_ms: Ewma = None  # send -> verdict, rounds sent with none ahead of them in the pipeline
    draft_ms_per_token: Ewma = None
    wait_behind_ms: Ewma = None  # send -> verdict, rounds sent behind another one (in flight or wasted)
    draft_busy_ms_per_token: Ewma = None  # drafting while a round is in flight
    explore_every: int = 8  # once both ways of sending a chain are measured, the slower one is taken again after
    # n - 1 chains of the others (0: follow the model alone)


    def __post_init__(self) -> None:
        self.wait_ms = self.wait_ms or Ewma()
        self.draft_ms_per_token = self.draft_ms_per_token or Ewma()
        self.wait_behind_ms = self.wait_behind_ms or Ewma()
        self.draft_busy_ms_per_token = self.draft_busy_ms_per_token or Ewma()
        self.chain_ms = dict.fromkeys((ONE, SPLIT, AHEAD), 0.0)  # realized time of whole chains, by way
        self.chain_tokens = dict.fromkeys((ONE, SPLIT, AHEAD), 0.0)
        self.chain_count = dict.fromkeys((ONE, SPLIT, AHEAD), 0.0)
        self.waste_charged_ms = dict.fromkeys((ONE, SPLIT, AHEAD), 0.0)  # of chain_ms: what their wasted rounds cost
        # the chains after them
        self.chains_since = dict.fromkeys((ONE, SPLIT, AHEAD), 0)  # chains recorded since each way was last taken

    @property
    def accept_rate(self) -> float:
        return self.hits / self.tries

    @property
    def overhead_ms(self) -> float:
        if self.wait_behind_ms.value is None or self.wait_ms.value is None:
            return ROUND_OVERHEAD_MS_PER_STAGE * self.stages
        return max(0.0, self.wait_behind_ms.value - self.wait_ms.value)

    def saw_drafts(self, hits: int, tries: int) -> None:
        self.hits += hits
        self.tries += tries

    def saw_draft_time(self, ms: float, n_tokens: int, busy: bool = False) -> None:
        """One draft call. A call of one token is mostly the drafter catching up with the verdict (feeding the
        accepted tokens, cutting its cache): not a cost per token, so it is not taken."""
        if n_tokens > 1:
            (self.draft_busy_ms_per_token if busy else self.draft_ms_per_token).add(ms / n_tokens)

    @property
    def draft_busy_ms(self) -> float:
        """D': drafting per token with a round in flight (D until measured)."""
        busy = self.draft_busy_ms_per_token.value
        return busy if busy is not None else (self.draft_ms_per_token.value or 0.0)

    def saw_wait(self, ms: float, behind: bool = False) -> None:
        (self.wait_behind_ms if behind else self.wait_ms).add(ms)

    def measured(self) -> bool:
        return self.wait_ms.value is not None and self.draft_ms_per_token.value is not None

    def describe(self, k: int) -> str:
        """The measured figures and the split they give, for the log."""
        f = [self.wait_ms.value, self.wait_behind_ms.value, self.draft_ms_per_token.value,
             self.draft_busy_ms_per_token.value]
        w, wb, d, db = (f"{x:.1f}" if x is not None else "-" for x in f)
        return (f"acceptance {self.accept_rate:.2f}, wait {w} ms (behind another round {wb} ms, overhead "
                f"{self.overhead_ms:.1f} ms), draft {d} ms/token ({db} with a round in flight): split "
                f"{self.model_split(k)} of {k}; realized ms/token: " + ", ".join(
                    f"{way} {_f(self.chain_rate(way))} ({self.chain_count[way]:.0f} chains, "
                    f"{self.waste_charged_ms[way]:.0f} ms charged for waste)" for way in (ONE, SPLIT, AHEAD)))

    def chain_time(self, j: int, k: int) -> float:
        """T(j): expected ms from a restart to the verdict that ends a chain of k drafts sent as [y, d1..dj] + the rest."""
        a, d, w, db = self.accept_rate, self.draft_ms_per_token.value or 0.0, self.wait_ms.value or 0.0, self.draft_busy_ms
        if j >= k:
            return k * d + w
        q = a ** (j + 1)
        rest = j * d + (k - j) * db
        return q * (rest + w) + (1 - q) * max(j * d + w, rest) + self.overhead_ms

    def saw_chain(self, way: str, ms: float, tokens: int) -> None:
        """A chain ended (the next one starts): how long it took from its start and the tokens it committed."""
        self.chain_ms[way] += ms
        self.chain_tokens[way] += tokens
        self.chain_count[way] += 1
        for w in self.chains_since:
            self.chains_since[w] = 0 if w == way else self.chains_since[w] + 1

    def charge_waste(self, way: str, wait_ms: float) -> float:
        """A round sent behind wasted rounds only waited `wait_ms`: what it waited beyond a round sent alone is the
        cost of the waste, charged to the way of the chain that wasted them (returned: the chain under way's
        time is that much less its own). Uncharged, a split or a round past the chain that misses would bill the
        chain after it, whichever way that one goes, and look cheaper than it is."""
        if self.wait_ms.value is None:
            return 0.0
        extra = max(0.0, wait_ms - self.wait_ms.value)
        self.chain_ms[way] += extra
        self.waste_charged_ms[way] += extra
        return extra

    def chain_rate(self, way: str) -> float | None:
        """Realized ms per committed token of the chains that went `way` (None before one is measured)."""
        return self.chain_ms[way] / self.chain_tokens[way] if self.chain_tokens[way] else None

    def _prefer(self, way: str) -> bool:
        """Go `way` (SPLIT or AHEAD) rather than ONE on this chain? ONE first, then `way`, then the one whose chains
        realized fewer ms per token, the other taken again once explore_every - 1 chains went another way since it
        was last taken. Counted in chains since, not as a share of the kept chains: the kept counts are capped
        (PolicyMemory), so a loser's old chains would count as its share for many sessions and its figure, from
        a route's first (cold) chains, would not be measured again."""
        if self.explore_every <= 0:
            return True
        if not self.chain_count[ONE]:
            return False
        if not self.chain_count[way]:
            return True
        better = self.chain_rate(way) <= self.chain_rate(ONE)
        loser = ONE if better else way
        explore = self.chains_since[loser] >= self.explore_every - 1
        return better != explore

    def model_split(self, k: int) -> int:
        """The j that minimizes T(j) (k: no split, as si). Unmeasured: k."""
        if not self.measured() or k <= 1:
            return k
        return min(range(k, -1, -1), key=lambda j: (round(self.chain_time(j, k), 6), -j))  # ties: the larger j

    def split(self, k: int) -> int:
        """Drafts in the first round of the next chain of k. The model proposes; what the chains sent each way
        realize (ms per committed token, on this route) decides: si's way first, then the split, then the faster
        of the two, the other taken again after `explore_every` - 1 chains (the model ignores what the machine adds:
        drafting and stages taking turns on shared cores, a busier pipeline)."""
        j = self.model_split(k)
        return j if j >= k or self._prefer(SPLIT) else k

    def may_go_ahead(self) -> bool:
        """May the chain starting now have rounds past it (when the model says they pay)? min_valid_prob 0: yes."""
        return self.min_valid_prob <= 0 or self._prefer(AHEAD)

    def carry_from(self, old: DsiPolicy, prior_tries: float, chain_memory: int) -> None:
        """Start from what an earlier session on the same route measured: its timings, its chains' realized
        rates (at most `chain_memory` chains' worth) and its acceptance as a prior worth `prior_tries` drafts."""
        for name in ("wait_ms", "draft_ms_per_token", "wait_behind_ms", "draft_busy_ms_per_token"):
            e = getattr(old, name)
            setattr(self, name, Ewma(e.value, e.weight))
        scale = min(1.0, prior_tries / old.tries)
        self.hits, self.tries = old.hits * scale, old.tries * scale
        scale = min(1.0, chain_memory / max(1, sum(old.chain_count.values())))
        for way in self.chain_count:
            self.chain_ms[way] = old.chain_ms[way] * scale
            self.chain_tokens[way] = old.chain_tokens[way] * scale
            self.chain_count[way] = old.chain_count[way] * scale
        self.chains_since = dict(old.chains_since)

    def speculate(self, assumed: int, depth: int, remaining_ms: float) -> bool:
        """Send a round of `depth` drafted tokens that assumes `assumed` unverified tokens now?

        remaining_ms: how long the newest round in flight is still expected to take. min_valid_prob 0: always
        (up to max_inflight), whatever it costs: how tests drive pipelined rounds and rollbacks in one process."""
        if self.min_valid_prob <= 0:
            return True
        p = self.accept_rate ** assumed
        if p < self.min_valid_prob:
            return False
        draft = depth * self.draft_busy_ms
        gain = p * remaining_ms - max(0.0, draft - remaining_ms)
        return gain >= (1 - p) * (draft + self.overhead_ms)


class PolicyMemory:
    """dsi's measured figures per route, carried across the route's sessions; the `max_routes` most recently
    used routes are kept. The key names what the figures depend on: the route's stages, the drafts per round
    and the tree's shape (a round's size)."""

    def __init__(self, max_routes: int = 64, prior_tries: float = 16.0, chain_memory: int = 32):
        self.max_routes, self.prior_tries, self.chain_memory = max_routes, prior_tries, chain_memory
        self._kept: OrderedDict[Hashable, DsiPolicy] = OrderedDict()

    def policy(self, key: Hashable, min_valid_prob: float, stages: int) -> DsiPolicy:
        """A policy for a new session on `key`: fresh settings, the figures its last session ended with."""
        pol = DsiPolicy(min_valid_prob, stages)
        old = self._kept.get(key)
        if old is not None:
            pol.carry_from(old, self.prior_tries, self.chain_memory)
        return pol

    def keep(self, key: Hashable, policy: DsiPolicy) -> None:
        """A session on `key` ended: its figures (which began from the ones kept) are the route's now."""
        self._kept[key] = policy
        self._kept.move_to_end(key)
        while len(self._kept) > self.max_routes:
            self._kept.popitem(last=False)

    def __len__(self) -> int:
        return len(self._kept)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
