"""The head: owns a session, drafts rounds, sends them down the pipeline and commits verdicts.

Modes:
- ar:  one token per pipeline pass (the baseline): each round is the next token alone.
- si:  speculative inference: the round is the known next token y plus a draft tree; wait for its verdict.
- dsi: speculation parallelism: up to max_inflight rounds in flight. A round drafted while round r
       travels assumes that r's main path is accepted; its roots are candidates for the token after it.
       When a verdict breaks that assumption, the epoch is bumped, the later rounds are wasted, and
       drafting restarts from the committed text. What is sent when comes from measurement
       (dsd_node.engine.speculation): each chain of draft_k tokens, the one si would send as one
       round, may go as two rounds (the first as soon as its first tokens are drafted, so a miss early
       in the chain is known sooner), and a round past the chain is sent only when its chance of being
       used pays for its cost.

The transport is abstract (`Pipeline`): the in-process pipeline (dsd_node.engine.local) and the gRPC
network (dsd_node.net.gateway) run exactly this loop.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from dsd_node.engine.config import GenerationConfig, GenerationError, Stats
from dsd_node.engine.drafter import Draft, DraftRequest
from dsd_node.engine.messages import RoundMsg, VerdictMsg
from dsd_node.engine.speculation import AHEAD, ONE, SPLIT, DsiPolicy
from dsd_node.engine.tree import TokenTree

log = logging.getLogger("dsd.head")


class Pipeline(Protocol):
    # async_send (optional, False): send returns once the round is on its way, not when it is computed; the head
    # then sends the next round before it streams the tokens of a verdict to its client
    async def send(self, msg: RoundMsg) -> None: ...
    async def recv(self) -> VerdictMsg: ...


class DraftSource(Protocol):
    async def draft(self, session_id: str, req: DraftRequest) -> Draft: ...


class DrafterUnavailable(GenerationError):
    """No drafter answers now: the head sends this round without a draft (as in ar) and says so in its stats."""


@dataclass
class _Sent:
    round_id: int
    tree: TokenTree
    main_path: list[int]  # nodes assumed accepted by the rounds drafted on top of this one
    assumed: list[int]  # tokens of main_path beyond what was known when it was sent
    n_known: int = 1  # main_path nodes that are not this round's own drafts (prompt, y, or the guess checked before)
    sent_at: float = 0.0
    behind: bool = False  # sent behind another round still in the pipeline (in flight, or wasted and still going)
    after_waste: str | None = None  # sent behind wasted rounds only: the way of the chain that wasted them


class Head:
    """Runs one session's generation loop over a pipeline."""

    def __init__(self, session_id: str, pipeline: Pipeline, drafter: DraftSource | None, cfg: GenerationConfig,
                 eos_token_id: int | None = None, on_tokens: Callable[[list[int]], Awaitable[None]] | None = None,
                 pipeline_depth: int = 1, policy: DsiPolicy | None = None):
        cfg.validate()
        if cfg.mode != "ar" and drafter is None:
            raise ValueError(f"mode {cfg.mode} needs a drafter")
        self.sid, self.pipe, self.drafter, self.cfg = session_id, pipeline, drafter, cfg
        self.eos = None if cfg.ignore_eos else eos_token_id
        self.on_tokens = on_tokens
        self.pipeline_depth = pipeline_depth  # stages in the route: the default number of dsi rounds in flight
        self.stats = Stats(cfg.mode)
        self.known: list[int] = []  # committed tokens; the last one (y) is not yet in any KV cache
        self.n_prompt = 0
        self.next_round = 0
        self.epoch = 0
        self.inflight: deque[_Sent] = deque()
        self.commits: list[tuple[int, list[int]]] = []
        self.drafter_down = False  # the last draft failed: rounds go without one, one at a time
        self.valid_rate = 0.5  # running rate of rounds a successor could build on (drives the dsi depth)
        self.pipe_async = getattr(pipeline, "async_send", False)  # send returns before the round is computed
        self.policy = policy or DsiPolicy(cfg.min_valid_prob, pipeline_depth)  # dsi: measured figures, decisions
        self.chain_left = 0  # dsi: drafts of the current chain still to send (the second round of a split)
        self.wasted_until = 0.0  # when the wasted rounds still in the pipeline are expected out of it
        self.waste_way: str | None = None  # the way of the chain whose rounds were wasted last
        self.chain_charged_ms = 0.0  # of the chain under way's time: what wasted rounds of an earlier one cost it
        self.chain: tuple[float, int, str] | None = None  # dsi: the chain under way: start, len(known), its way
        self.chain_may_ahead = False  # dsi: rounds past the chain under way are allowed (when they pay)
        self.chain_cut = False  # dsi: the token budget cut the chain under way (see _end_chain)

    @property
    def generated(self) -> list[int]:
        return self.known[self.n_prompt:]

    def _done(self) -> bool:
        gen = self.generated
        return len(gen) >= self.cfg.max_new_tokens or (self.eos is not None and self.eos in gen)

    def _first_depth(self) -> int:
        """Drafts in a round that starts a chain (after the prompt or a known y): draft_k, or fewer in dsi
        when splitting the chain pays (the rest goes next, on top of it)."""
        k = self.cfg.draft_k
        if self.cfg.mode != "dsi" or self.drafter_down or (self.cfg.max_inflight or self.pipeline_depth) < 2:
            self.chain_left, self.chain = 0, None
            return k
        now = time.perf_counter()
        self._end_chain(now)  # the chain before this one ended with the verdict just taken
        j = self.policy.split(k)
        self.chain_left = k - j
        self.chain_may_ahead = self.policy.may_go_ahead()
        # the prompt's chain also prefills: not a chain's time
        way = SPLIT if j < k else ONE
        self.chain = (now, len(self.known), way) if len(self.known) > self.n_prompt or self.stats.rounds else None
        return j

    def _end_chain(self, now: float) -> None:
        """The chain under way (dsi) ended now: record its time and the tokens it committed, unless the token budget
        cut it and it went si's way or split (a round with fewer drafts, or no room for a round past it: near a
        session's end only those are possible, so they would bill the session's end to those ways). A chain with
        rounds past it is recorded even so, up to the session's end: its rounds in flight were sent before the
        budget bound, and leaving out its long runs of accepted rounds (the ones that reach the end) would bill
        it only for its short ones."""
        if self.chain is not None:
            start, n_known, way = self.chain
            tokens = min(len(self.known), self.n_prompt + self.cfg.max_new_tokens) - n_known
            if tokens > 0 and (way == AHEAD or not self.chain_cut):
                self.policy.saw_chain(way, (now - start) * 1e3 - self.chain_charged_ms, tokens)
        self.chain, self.chain_charged_ms, self.chain_cut = None, 0.0, False

    def _next_depth(self) -> int:
        """dsi: drafted tokens of the round to send now on top of those in flight (0: none now)."""
        if self.cfg.mode != "dsi" or self.drafter_down or not self.inflight or \
                len(self.inflight) >= (self.cfg.max_inflight or self.pipeline_depth):
            return 0
        if len(self.generated) + self._speculated() >= self.cfg.max_new_tokens:
            self.chain_cut = True
            return 0
        if self.chain_left:  # the rest of a split chain: si would have sent it already
            return self.chain_left
        if not self.chain_may_ahead:
            return 0
        depth = self.cfg.draft_k + 1  # the guess for the last round's added token, then draft_k
        newest = self.inflight[-1]
        remaining = newest.sent_at + (self.policy.wait_ms.value or 0.0) / 1e3 - time.perf_counter()
        if not self.policy.speculate(self._speculated(), depth, max(0.0, remaining) * 1e3):
            return 0
        if self.chain is not None:
            self.chain = (*self.chain[:2], AHEAD)
        return depth

    def _speculated(self) -> int:
        """Tokens beyond `known` that the rounds in flight assume: their drafts plus the token each verdict adds.

        A pure-draft dsi round's first token is its guess for the previous round's added token, counted there."""
        return sum(len(s.assumed) + (len(s.assumed) < len(s.main_path)) for s in self.inflight)

    async def _draft(self, context: list[int], depth: int) -> Draft:
        cfg = self.cfg
        req = DraftRequest(context, depth, cfg.tree, cfg.sampling)
        d = await self.drafter.draft(self.sid, req)
        self.drafter_down = False
        self.stats.draft_ms += d.draft_ms
        self.policy.saw_draft_time(d.draft_ms, depth, busy=bool(self.inflight))
        return d

    async def _send_round(self, prompt: list[int] | None, depth: int) -> None:
        """Send the next round: after the prompt or y (`depth` drafts; 0: none), or a pure draft of `depth` tokens
        on top of the rounds in flight."""
        cfg = self.cfg
        remaining = cfg.max_new_tokens - len(self.generated) - self._speculated()
        # a pure draft's first token is its guess for a token already counted in `remaining`
        k = min(depth, max(1, remaining)) if prompt is not None or not self.inflight else max(1, min(depth, remaining + 1))
        self.chain_cut = self.chain_cut or k < depth
        if prompt is not None:  # first round: the prompt, given, plus a draft after it
            tree, main = TokenTree.chain(prompt, n_given=len(prompt)), list(range(len(prompt)))
            context, offset = prompt, len(prompt)
        elif not self.inflight:  # the known next token y, then a draft after it
            tree, main = TokenTree([self.known[-1]], [-1]), [0]
            context, offset = self.known, 1
        else:  # dsi: a pure draft on top of the rounds in flight; its roots are candidates for y'
            tree, main = TokenTree([], []), []
            context, offset = self.known + [t for s in self.inflight for t in s.assumed], 0
        assumed: list[int] = []
        d = None
        if cfg.mode != "ar" and (k or not offset):
            try:
                d = await self._draft(context, k if offset else max(1, k))
            except DrafterUnavailable:
                self.drafter_down = True
                self.stats.drafter_failures += 1
                if not offset:  # a pure dsi draft has nothing to send without one
                    return
                self.stats.fallback_rounds += 1
        if d is not None:
            anchor = offset - 1
            tree = TokenTree(tree.tokens + d.tree.tokens,
                             tree.parents + [anchor if p < 0 else p + offset for p in d.tree.parents],
                             tree.n_given,
                             ([None] * offset + d.tree.draft_dists) if d.tree.draft_dists else [])
            main = main + [i + offset for i in d.main_path]
            assumed = [tree.tokens[i] for i in main[offset:]]
        msg = RoundMsg(self.sid, self.next_round, self.epoch, self.commits,
                       [(s.round_id, s.main_path) for s in self.inflight], tree, cfg.sampling)
        self.commits = []
        if not offset:
            self.chain_left = 0  # the chain's rest is sent (or a round past it)
        self.stats.inflight.append(len(self.inflight))
        now = time.perf_counter()
        after_waste = self.waste_way if not self.inflight and now < self.wasted_until else None
        self.inflight.append(_Sent(self.next_round, tree, main, assumed, max(1, offset), now,
                                   bool(self.inflight) or now < self.wasted_until, after_waste))
        self.next_round += 1
        self.stats.rounds += 1
        await self.pipe.send(msg)

    def _invalidate(self) -> None:
        wait = (self.policy.wait_ms.value or 0.0) / 1e3
        self.wasted_until = max([self.wasted_until] + [s.sent_at + wait for s in self.inflight])
        self.waste_way = self.chain[2] if self.chain is not None else None
        self.stats.rounds_wasted += len(self.inflight)
        self.inflight.clear()
        self.chain_left = 0
        self.epoch += 1

    def _measure(self, sent: _Sent, v: VerdictMsg) -> None:
        """The policy's figures from one verdict: the wait, and the round's own drafts along its main path."""
        if not sent.tree.n_given:  # the prompt's round also prefills: its wait says nothing of a round's
            wait = (time.perf_counter() - sent.sent_at) * 1e3
            if sent.after_waste is not None:  # what the wasted rounds ahead of it cost: the wasting way's, not this chain's
                self.chain_charged_ms += self.policy.charge_waste(sent.after_waste, wait)
            self.policy.saw_wait(wait, sent.behind)
        matched = 0
        for a, b in zip(v.accepted, sent.main_path, strict=False):
            if a != b:
                break
            matched += 1
        drafts = len(sent.main_path) - sent.n_known
        if matched >= sent.n_known and drafts > 0:
            hits = matched - sent.n_known
            self.policy.saw_drafts(hits, hits + (hits < drafts))

    def _on_verdict(self, v: VerdictMsg) -> None:
        """Commit a verdict; give up the rounds in flight that it makes invalid."""
        sent = self.inflight.popleft()
        if v.stale:  # the last stage found the round built on something not accepted
            self.stats.rounds_wasted += 1
            self._invalidate()
            return
        self.commits.append((sent.round_id, v.accepted))
        self.known.extend(v.tokens)
        self.stats.accepted_per_round.append(len(v.tokens))
        self._measure(sent, v)
        if self.inflight:
            nxt = self.inflight[0]
            valid = v.accepted == sent.main_path
            if valid and nxt.main_path:  # the next round's guess for the token this verdict added
                self.policy.saw_drafts(int(self.known[-1] == nxt.tree.tokens[nxt.main_path[0]]), 1)
            valid = valid and self.known[-1] in [nxt.tree.tokens[i] for i, p in enumerate(nxt.tree.parents) if p < 0]
            if not valid:
                self._invalidate()

    async def run(self, prompt: list[int]) -> list[int]:
        """Generate; returns the new tokens (cut at max_new_tokens and after the first EOS)."""
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        t0 = time.perf_counter()
        self.known, self.n_prompt = list(prompt), len(prompt)
        await self._send_round(prompt, self._first_depth())
        emitted = 0
        while True:
            await self._fill()
            v = await self.pipe.recv()
            if not self.inflight or v.round_id != self.inflight[0].round_id:
                continue  # a verdict for a round already given up (an older epoch)
            self._on_verdict(v)
            out = self.trimmed()
            if self.pipe_async and not self._done():  # the next round first: it travels while the client gets these
                await self._fill()
            if self.on_tokens and len(out) > emitted:
                await self.on_tokens(out[emitted:])
            emitted = len(out)
            if self._done():
                break
        self.stats.new_tokens = len(self.trimmed())
        self.stats.wall_ms = (time.perf_counter() - t0) * 1e3
        if self.cfg.mode == "dsi":
            self._end_chain(time.perf_counter())
            log.info("dsi %s: %s", self.sid, self.policy.describe(self.cfg.draft_k))
        return self.trimmed()

    async def _fill(self) -> None:
        """Send the next round when none is in flight, then (dsi) the rounds the policy puts on top of it."""
        if not self.inflight:
            await self._send_round(None, self._first_depth())
        while depth := self._next_depth():
            await self._send_round(None, depth)

    def trimmed(self) -> list[int]:
        gen = self.generated[: self.cfg.max_new_tokens]
        if self.eos is not None and self.eos in gen:
            gen = gen[: gen.index(self.eos) + 1]
        return gen

    async def flush(self) -> None:
        """Send the pending commits down the pipeline (a commit-only message), e.g. before inspecting caches."""
        msg = RoundMsg(self.sid, self.next_round, self.epoch, self.commits, [], TokenTree([], []), self.cfg.sampling)
        self.commits = []
        self.next_round += 1
        await self.pipe.send(msg)
