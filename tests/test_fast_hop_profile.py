"""The per-hop breakdown of hop_profile, from marks written by HopTrace (DSD_HOP_TRACE) with known times."""

from __future__ import annotations

import pytest

from dsd_node.engine.hop_trace import HopTrace
from dsd_node.ops.bench.hop_profile import breakdown

STAGE = ["recv", "decoded", "dequeued", "handle", "checked", "committed", "mask", "forward"]


def write_round(folder, sid: str, rid: int, t0: float, stages: list[str]) -> float:
    """One round: the head's marks and every stage's, each phase 1 ms long; returns the verdict's time."""
    head = HopTrace(folder, "head")
    t = t0
    for ev in ("send", "encoded"):
        head.mark(sid, rid, ev, t)
        t += 0.001
    for i, where in enumerate(stages):
        tr = HopTrace(folder, where)
        t += 0.002  # transport: 2 ms after the encode above (1 ms) ended
        for ev in STAGE + (["verified"] if i == len(stages) - 1 else []) + ["handled", "encoded"]:
            tr.mark(sid, rid, ev, t)
            t += 0.001
        tr.mark(sid, rid, "written", t + 0.005)  # a write's end is not on the path: ignored
        tr.flush()
    t += 0.002
    head.mark(sid, rid, "verdict_in", t)
    head.mark(sid, rid, "verdict", t + 0.001)
    head.flush()
    return t + 0.001


def test_breakdown_splits_each_hop_into_its_phases(tmp_path):
    stages = ["stage0:2", "stage2:4"]
    t = 100.0
    for rid in range(4):
        t = write_round(tmp_path, "s1", rid, t + 0.003, stages)  # the head works 3 ms between rounds
    b = breakdown(tmp_path, [(0.0, 1e9)], 2)
    assert b["stages"] == stages and b["rounds"] == 2  # rounds 0 (prompt) and 1 are left out
    hop = b["per_hop_ms"]
    assert hop["transport"] == pytest.approx([3.0, 3.0, 3.0])  # encode's 1 ms was counted as encode
    assert hop["forward"] == pytest.approx([1.0, 1.0, 0.0])
    assert hop["verify"] == pytest.approx([0.0, 1.0, 0.0])
    assert hop["thread out"] == pytest.approx([1.0, 1.0, 0.0])
    assert hop["head work"][0] == pytest.approx(3.0)
    s = b["summary_ms"]
    assert s["shard forward"] == pytest.approx(2.0) and s["verify"] == pytest.approx(1.0)
    phases = sum(v for k, v in s.items() if k != "round trip + head work")
    assert phases == pytest.approx(s["round trip + head work"])  # the phases add up to the round
    assert breakdown(tmp_path, [(0.0, 1.0)], 2) is None  # no round in the timed windows
    assert breakdown(tmp_path, [(0.0, 1e9)], 3) is None  # not the stages asked for


def test_a_disabled_trace_keeps_nothing(tmp_path):
    tr = HopTrace.from_env("head", environ={})
    tr.mark("s", 0, "send")
    tr.flush()
    assert not tr.enabled and list(tmp_path.iterdir()) == []
