"""Peers a gateway keeps out of its routes for a while, with exponential backoff (as Petals' ban timeout).

A peer (a stage or drafter, named by its gRPC address) is excluded when it fails: a round that failed
because of it, or an Info probe it did not answer. The first exclusion lasts `base_s`; every further
failure before the peer has served a round successfully doubles it, up to `max_s`. When the time is up the
peer is eligible again: routing probes it like any other, and it is used if it answers. A success
(`forgive`) resets its count. Overload (RESOURCE_EXHAUSTED) is back-pressure and is never a reason here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Exclusion:
    """One peer's record: why it was excluded (the latest reasons first), until when, and how often in a row."""

    peer: str
    until: float  # on the clock of the Exclusions that made it
    failures: int  # consecutive failures (sets the backoff)
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else ""


class Exclusions:
    """Which peers are out now, why, and until when. `clock` is monotonic seconds (injectable for tests)."""

    KEEP_REASONS = 3

    def __init__(self, base_s: float = 5.0, max_s: float = 120.0, clock: Callable[[], float] = time.monotonic):
        if base_s <= 0 or max_s < base_s:
            raise ValueError("backoff needs 0 < base_s <= max_s")
        self.base_s, self.max_s, self.clock = base_s, max_s, clock
        self._by_peer: dict[str, Exclusion] = {}

    def backoff_s(self, failures: int) -> float:
        """How long the `failures`-th consecutive failure keeps a peer out."""
        return min(self.max_s, self.base_s * 2 ** max(0, failures - 1))

    def exclude(self, peer: str, reason: str) -> Exclusion:
        """Record a failure of `peer`: out for the backoff of its consecutive failures, counted from now."""
        old = self._by_peer.get(peer)
        failures = (old.failures if old else 0) + 1
        reasons = [reason, *(old.reasons if old else [])][: self.KEEP_REASONS]
        ex = Exclusion(peer, self.clock() + self.backoff_s(failures), failures, reasons)
        self._by_peer[peer] = ex
        return ex

    def forgive(self, peer: str) -> None:
        """`peer` served successfully: forget its failures."""
        self._by_peer.pop(peer, None)

    def is_excluded(self, peer: str) -> bool:
        ex = self._by_peer.get(peer)
        return ex is not None and ex.until > self.clock()

    def excluded(self) -> set[str]:
        """The peers out now."""
        now = self.clock()
        return {p for p, ex in self._by_peer.items() if ex.until > now}

    def active(self) -> list[Exclusion]:
        """The exclusions in force now, the longest first."""
        now = self.clock()
        return sorted((ex for ex in self._by_peer.values() if ex.until > now), key=lambda ex: -ex.until)

    def remaining_s(self, peer: str) -> float:
        ex = self._by_peer.get(peer)
        return max(0.0, ex.until - self.clock()) if ex else 0.0

    def get(self, peer: str) -> Exclusion | None:
        """A peer's record, also after its time ran out (its failure count is kept until `forgive`)."""
        return self._by_peer.get(peer)
