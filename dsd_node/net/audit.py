"""Verified outputs: the gateway re-runs a sample of rounds through independent replicas and bans peers whose
results disagree with the majority.

A check replays one round as a prefill on another route: the session's text so far is the given part of a
chain tree and the round's committed tokens are its drafts, so the other route's verdict says, in one pass,
whether it would have committed exactly these tokens (greedy and adaptive verification are deterministic;
sampled rounds are not checked). The other route replaces every hop that has a replica (preferring peers not
yet vouched for, so newcomers are vetted early). Agreement vouches for every peer of both routes; a
disagreement asks a third route, and the peers of the minority's hops are banned. When the session's own
route is in the minority the round's tokens are never sent to the client: IntegrityError ends the session,
the gateway re-routes around the banned peers and regenerates from the last text it sent.

Which rounds (fraction > 0; 0 turns verification off): the first round of a session whose route holds a peer
not yet vouched for, then each round with probability `fraction`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dsd_node.engine.config import ErrorCode, GenerationError
from dsd_node.engine.messages import Hop
from dsd_node.engine.verify import Rule, SamplingParams
from dsd_node.p2p.records import NodeRecord

log = logging.getLogger("dsd.audit")

Replay = Callable[[list[Hop], list[int], list[int], SamplingParams], Awaitable[list[int]]]


class IntegrityError(GenerationError):
    """The session's route produced tokens that independent replicas do not (the peers are banned)."""

    def __init__(self, message: str):
        super().__init__(message, ErrorCode.UNAVAILABLE)  # another route can cure it


@dataclass
class AuditStats:
    checks: int = 0
    mismatches: int = 0
    unverifiable: int = 0  # no replica of any hop to compare with
    tokens_checked: int = 0
    check_ms: float = 0.0


@dataclass
class Auditor:
    """`replicas(fresh)`: the announced stage records (the candidates for other routes; fresh: look them up
    now, asked when the records known give no other route); `replay(route, context,
    tokens, sampling)`: the tokens that route commits for `tokens` given `context` (GatewayService.replay)."""

    replicas: Callable[[bool], Awaitable[list[NodeRecord]]]
    replay: Replay
    fraction: float = 0.05
    rng: random.Random = field(default_factory=random.Random)
    vouched: set[str] = field(default_factory=set)
    banned: dict[str, str] = field(default_factory=dict)  # peer id -> why
    stats: AuditStats = field(default_factory=AuditStats)
    on_ban: Callable[[str], None] | None = None  # e.g. exclude the peer from routing
    on_result: Callable[[str], None] | None = None  # each round's result: skipped, agree, mismatch, unverifiable
    record_of: Callable[[str], bytes] = lambda peer_id: b""  # a peer's signed record (travels with a replay)
    # gRPC addresses the gateway excludes now (dead, frozen or slow: see net/exclusion.py): no replay goes through
    # them, or a replay on a frozen replica would hold the session until its stages expire it
    excluded: Callable[[], set[str]] = set

    def _count(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def should_check(self, route: list[Hop], first_round: bool, sampling: SamplingParams) -> bool:
        if self.fraction <= 0 or sampling.rule == Rule.SAMPLE:
            check = False  # verification off, or sampled rounds (not deterministic: nothing to compare)
        else:
            check = (first_round and any(h.peer_id not in self.vouched for h in route)) or self.rng.random() < self.fraction
        if not check:
            self._count("skipped")
        return check

    async def check(self, route: list[Hop], context: list[int], tokens: list[int], sampling: SamplingParams) -> None:
        """Compare `route`'s `tokens` with other replicas; IntegrityError when `route` is in the minority."""
        t0 = time.perf_counter()
        try:
            await self._check(route, context, tokens, sampling)
        finally:
            self.stats.check_ms += (time.perf_counter() - t0) * 1e3

    async def _check(self, route: list[Hop], context: list[int], tokens: list[int], sampling: SamplingParams) -> None:
        opinions: list[tuple[list[Hop], list[int]]] = [(route, tokens)]
        alt, records = await self._another_route([route], await self._records(False))
        if alt is None:
            return self._unverifiable(route, "no other replica of its layers is announced")
        second = (await self.replay(alt, context, tokens, sampling))[: len(tokens)]
        if not second:  # the replay failed (unreachable replica...): no opinion, not a disagreement
            return self._unverifiable(route, f"the replay on {' -> '.join(h.address for h in alt)} failed")
        self.stats.checks += 1
        self.stats.tokens_checked += len(tokens)
        opinions.append((alt, second))
        if second == tokens:
            self.vouched.update(h.peer_id for r, _ in opinions for h in r)
            self._count("agree")
            return
        self.stats.mismatches += 1
        self._count("mismatch")
        third, _ = await self._another_route([route, alt], records)
        if third is not None and (toks := (await self.replay(third, context, tokens, sampling))[: len(tokens)]):
            opinions.append((third, toks))  # (a failed replay gives no opinion)
        counts: dict[tuple[int, ...], int] = {}
        for _, toks in opinions:
            counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
        best, votes = max(counts.items(), key=lambda kv: kv[1])
        if votes < 2:  # no majority: distrust the side with peers nobody has vouched for yet
            fresh = [o for o in opinions[:2] if any(h.peer_id not in self.vouched for h in o[0])]
            losers = fresh if len(fresh) == 1 else []
            if not losers:
                said = "; ".join(f"{' -> '.join(h.address for h in r)}: {toks[:6]}" for r, toks in opinions)
                raise IntegrityError(f"replicas disagree and no majority decides ({said}): not sending unverified text")
        else:
            losers = [o for o in opinions if tuple(o[1]) != best]
            self.vouched.update(h.peer_id for r, toks in opinions if tuple(toks) == best for h in r)
        honest = {h.peer_id for r, toks in opinions if all(r is not lr for lr, _ in losers) for h in r}
        for lr, toks in losers:
            for h in lr:
                if h.peer_id and h.peer_id not in honest:
                    self.ban(h.peer_id, f"its layers {h.layer_start}:{h.layer_end} gave {toks[:4]}..., replicas "
                                        f"{list(best)[:4]}...")
        if any(lr is route for lr, _ in losers):
            raise IntegrityError(f"round failed verification: route {' -> '.join(h.address for h in route)} "
                                 f"committed {tokens[:4]}..., independent replicas {list(best)[:4]}...")

    async def _records(self, fresh: bool) -> list[NodeRecord]:
        excluded = self.excluded()
        return [r for r in await self.replicas(fresh) if r.peer_id not in self.banned and r.grpc_address not in excluded]

    async def _another_route(self, used: list[list[Hop]], records: list[NodeRecord]
                             ) -> tuple[list[Hop] | None, list[NodeRecord]]:
        """A route of replicas not in `used` from `records`, else from records looked up afresh (a lookup may have
        missed replicas, or they were announced since); the route (None: none) and the records it came from."""
        route = self._other_route(records, used)
        if route is None:
            records = await self._records(True)
            route = self._other_route(records, used)
        return route, records

    def _unverifiable(self, route: list[Hop], why: str) -> None:
        self.stats.unverifiable += 1
        self._count("unverifiable")
        log.warning("cannot verify a round of route %s: %s", " -> ".join(h.address for h in route), why)

    def ban(self, peer_id: str, why: str) -> None:
        if peer_id not in self.banned:
            log.warning("banning peer %s: %s", peer_id, why)
            self.banned[peer_id] = why
            self.vouched.discard(peer_id)
            if self.on_ban is not None:
                self.on_ban(peer_id)

    def _other_route(self, records: list[NodeRecord], used: list[list[Hop]]) -> list[Hop] | None:
        """`used[0]` with each hop replaced by a replica of its layers not used yet (unvouched first), or None
        when no hop has one."""
        out, replaced = [], False
        for i, hop in enumerate(used[0]):
            taken = {r[i].peer_id for r in used}
            cands = [r for r in records if (r.layer_start, r.layer_end) == (hop.layer_start, hop.layer_end)
                     and r.peer_id not in taken]
            cands.sort(key=lambda r: (r.peer_id in self.vouched, r.peer_id))
            if cands:
                r = cands[0]
                out.append(Hop(r.grpc_address, r.layer_start, r.layer_end, r.peer_id, self.record_of(r.peer_id)))
                replaced = True
            else:
                out.append(hop)
        return out if replaced else None
