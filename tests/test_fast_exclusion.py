"""Exclusion with backoff, the adaptive round deadline and the gateway's blame rule: pure and fast."""

from __future__ import annotations

import pytest

from dsd_node.engine.config import ErrorCode, GenerationError
from dsd_node.engine.messages import Hop
from dsd_node.net.deadline import AdaptiveDeadline
from dsd_node.net.exclusion import Exclusions
from dsd_node.net.gateway import GatewayConfig, GatewayService
from dsd_node.net.grpc_util import Channels
from dsd_node.ops.testnet import free_port


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_exclusion_expires_and_backs_off_exponentially():
    clock = Clock()
    ex = Exclusions(base_s=5, max_s=40, clock=clock)
    first = ex.exclude("a:1", "no Info reply")
    assert first.failures == 1 and ex.is_excluded("a:1") and ex.excluded() == {"a:1"}
    assert ex.remaining_s("a:1") == pytest.approx(5)
    clock.t += 5.01  # the backoff is over: eligible again (routing probes it like any other peer)
    assert not ex.is_excluded("a:1") and ex.excluded() == set() and ex.active() == []
    # it fails again before serving anything: twice as long, then 4x, 8x, capped at max_s
    waits = []
    for _ in range(5):
        ex.exclude("a:1", "failed a round")
        waits.append(ex.remaining_s("a:1"))
        clock.t += waits[-1] + 0.01
    assert waits == pytest.approx([10, 20, 40, 40, 40])


def test_forgive_resets_and_reasons_are_kept_newest_first():
    clock = Clock()
    ex = Exclusions(base_s=2, max_s=100, clock=clock)
    for r in ("r1", "r2", "r3", "r4"):
        ex.exclude("b:2", r)
    rec = ex.get("b:2")
    assert rec.reasons == ["r4", "r3", "r2"] and rec.reason == "r4" and rec.failures == 4
    ex.exclude("c:3", "other")
    assert [e.peer for e in ex.active()] == ["b:2", "c:3"]  # the longest first
    ex.forgive("b:2")  # it served a round: its record is gone, a new failure starts from the base again
    assert ex.get("b:2") is None and not ex.is_excluded("b:2")
    assert ex.exclude("b:2", "again").failures == 1 and ex.remaining_s("b:2") == pytest.approx(2)


def test_exclusions_reject_a_nonsense_backoff():
    with pytest.raises(ValueError):
        Exclusions(base_s=0)
    with pytest.raises(ValueError):
        Exclusions(base_s=10, max_s=5)


def test_round_deadline_follows_recent_rounds_with_floor_and_cap():
    d = AdaptiveDeadline(cap_s=60, floor_s=3, factor=8)
    assert d.deadline_s(5) == 60 and not d.measured  # nothing measured yet: the configured round timeout
    d.observe(0.02, 5)  # decode rounds on loopback: tens of ms
    d.observe(0.05, 40)  # a prefill of 40 tokens
    assert d.deadline_s(5) == 3  # 8 x 0.05 s is under the floor: a hung stage costs ~3 s, not 60
    d.observe(1.0, 5)  # a slow round (a loaded machine): the deadline grows with it
    assert d.deadline_s(5) == pytest.approx(8.0)
    assert d.deadline_s(400) == 60  # a replay 10x larger than any measured round: scaled, capped
    assert AdaptiveDeadline(cap_s=60, floor_s=3, factor=8, window=2).deadline_s() == 60
    w = AdaptiveDeadline(cap_s=60, floor_s=1, factor=2, window=2)
    for s in (5.0, 0.1, 0.1):  # the window forgets old rounds
        w.observe(s)
    assert w.deadline_s() == 1


def _gateway(route: list[Hop]) -> GatewayService:
    return GatewayService("127.0.0.1:1", Channels(), GatewayConfig(route, tokenizer=None, drafter=None))


ROUTE = [Hop(f"127.0.0.1:{free_port()}", 0, 3), Hop(f"127.0.0.1:{free_port()}", 3, 5),
         Hop(f"127.0.0.1:{free_port()}", 5, 8)]  # nothing listens there
A, B, C = (h.address for h in ROUTE)


async def test_blame_names_the_deepest_stage_and_never_excludes_overload():
    gw = _gateway(ROUTE)
    relayed = GenerationError(f"pipeline failed: UNAVAILABLE: next stage {B} failed: UNAVAILABLE: "
                              f"next stage {C} failed: UNAVAILABLE: Socket closed")
    assert await gw._blame(relayed, ROUTE) == [C]
    assert gw.cfg.exclusions.excluded() == {C}
    assert [e.address for e in gw.excluded()] == [C] and "Socket closed" in gw.excluded()[0].reason
    full = GenerationError(f"pipeline failed: UNAVAILABLE: next stage {B} failed: RESOURCE_EXHAUSTED: 64 sessions open")
    assert await gw._blame(full, ROUTE) == []  # back-pressure: nobody excluded
    assert gw.cfg.exclusions.excluded() == {C}


async def test_blame_probes_when_no_stage_is_named():
    # nothing listens on these ports: the Info probes fail, so every stage of the route is a culprit
    gw = _gateway(ROUTE)
    stuck = GenerationError("no verdict within the round deadline (3.0 s)", ErrorCode.DEADLINE_EXCEEDED)
    assert sorted(await gw._blame(stuck, ROUTE)) == sorted([A, B, C])
    assert all(e.failures == 1 for e in gw.excluded())
    await gw.channels.close()
