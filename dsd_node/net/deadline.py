"""How long to wait for a reply before calling the peer stuck: a multiple of what replies took recently.

A round's time (send to verdict) covers the links' RTT and every stage's compute, so the recent round
times measure both. The deadline of a round of n tree nodes is `factor` times the slowest recent round,
scaled up when n is larger than the largest recent round (a prefill, a replay after a failover), never
under `floor_s` and never over `cap_s` (the configured round timeout, also used before any measurement).
"""

from __future__ import annotations

from collections import deque


class AdaptiveDeadline:
    def __init__(self, cap_s: float = 60.0, floor_s: float = 3.0, factor: float = 8.0, window: int = 32):
        if not 0 < floor_s <= cap_s or factor < 1:
            raise ValueError("deadline needs 0 < floor_s <= cap_s and factor >= 1")
        self.cap_s, self.floor_s, self.factor = cap_s, floor_s, factor
        self._recent: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, size)

    def observe(self, seconds: float, size: int = 1) -> None:
        self._recent.append((max(0.0, seconds), max(1, size)))

    @property
    def measured(self) -> bool:
        return bool(self._recent)

    def deadline_s(self, size: int = 1) -> float:
        if not self._recent:
            return self.cap_s
        slowest = max(s for s, _ in self._recent)
        largest = max(n for _, n in self._recent)
        estimate = slowest * max(1.0, size / largest)
        return min(self.cap_s, max(self.floor_s, self.factor * estimate))
