"""Route selection over stage records (pure, no network)."""

from __future__ import annotations

import pytest

from dsd_node.p2p.records import NodeRecord
from dsd_node.p2p.routing import RouteError, build_route, format_route_table, hop_cost


def rec(peer: str, start: int, end: int, *, tps: float = 10.0, sessions: int = 0, role: str = "stage") -> NodeRecord:
    return NodeRecord(
        peer_id=peer, role=role, model_id="org/m", model_hash="h", layer_start=start, layer_end=end,
        num_layers=12, grpc_address=f"10.0.0.{len(peer)}:5005{start}", version="t", tokens_per_s=tps,
        sessions=sessions, max_sessions=4, expires_at=1e12,
    )  # fmt: skip


def peers(route: list[NodeRecord]) -> list[str]:
    return [r.peer_id for r in route]


def test_lowest_cost_replica_chosen() -> None:
    records = [
        rec("a-slow", 0, 4, tps=5), rec("a-fast", 0, 4, tps=50),
        rec("b-far", 4, 8), rec("b-near", 4, 8),
        rec("c-busy", 8, 12, sessions=3), rec("c-idle", 8, 12),
        rec("drafter", 0, 0, role="drafter"),
    ]  # fmt: skip
    route = build_route(records, 12, rtt_ms={"b-far": 80.0, "b-near": 2.0})
    assert peers(route) == ["a-fast", "b-near", "c-idle"]
    assert [(r.layer_start, r.layer_end) for r in route] == [(0, 4), (4, 8), (8, 12)]
    # one big span beats two hops when it is cheaper, and loses when it is not
    big = rec("big", 0, 8, tps=20)
    assert peers(build_route([*records, big], 12, rtt_ms={"b-near": 2.0})) == ["big", "c-idle"]
    far_big = {"big": 500.0, "b-far": 80.0, "b-near": 2.0}
    assert peers(build_route([*records, big], 12, rtt_ms=far_big)) == ["a-fast", "b-near", "c-idle"]
    assert hop_cost(rec("x", 0, 1, tps=10), {"x": 5.0}) == pytest.approx(105.0)


def test_gap_names_missing_layers() -> None:
    records = [rec("a", 0, 4), rec("c", 6, 12)]
    with pytest.raises(RouteError, match=r"no stage hosts layers 4-5 of model org/m"):
        build_route(records, 12)
    with pytest.raises(RouteError, match=r"layer 11 of model"):
        build_route([rec("a", 0, 11)], 12)
    with pytest.raises(RouteError, match="shared boundaries"):  # covered, but overlapping spans do not chain
        build_route([rec("a", 0, 6), rec("b", 4, 12)], 12)


def test_exclude_forces_replica() -> None:
    records = [rec("a", 0, 6), rec("b-good", 6, 12, tps=100), rec("b-spare", 6, 12, tps=1)]
    assert peers(build_route(records, 12)) == ["a", "b-good"]
    assert peers(build_route(records, 12, exclude={"b-good"})) == ["a", "b-spare"]
    with pytest.raises(RouteError, match="layers 6-11"):
        build_route(records, 12, exclude={"b-good", "b-spare"})


def test_route_table() -> None:
    table = format_route_table([rec("bbb", 6, 12, sessions=1), rec("aaa", 0, 6)], {"aaa": 1.25})
    lines = table.splitlines()
    assert lines[0].split() == ["PEER", "ROLE", "LAYERS", "ADDRESS", "RTT", "LOAD", "TOK/S"]
    assert lines[1].split()[:6] == ["aaa", "stage", "0:6", "10.0.0.3:50050", "1.2", "ms"]
    assert lines[2].split()[4:6] == ["-", "1/4"]
