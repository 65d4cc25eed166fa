"""Route selection: a chain of stage nodes covering all layers of a model, at the lowest cost.

Pure code (no networking). As in Petals, layer boundaries are the vertices of a DAG and each
stage record hosting layers [a, b) is an edge a -> b; the cheapest path 0 -> num_layers is the
route. Cost of a hop (milliseconds): the link RTT to the node plus its compute time per token,
``1000 / tokens_per_s`` scaled up by its load ``sessions / max_sessions`` (a full node costs a
large penalty, so it is used only when there is no alternative).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsd_node.p2p.records import NodeRecord

FULL_PENALTY_MS = 10_000.0
UNKNOWN_SPEED_TOKENS_PER_S = 1.0


class RouteError(ValueError):
    """No complete chain of stages covers the model's layers."""


def _load(rec: NodeRecord) -> float:
    return rec.sessions / rec.max_sessions if rec.max_sessions > 0 else 0.0


def hop_cost(rec: NodeRecord, rtt_ms: Mapping[str, float] | None = None) -> float:
    """Estimated cost in ms of routing one token through ``rec``."""
    speed = rec.tokens_per_s if rec.tokens_per_s > 0 else UNKNOWN_SPEED_TOKENS_PER_S
    cost = (rtt_ms or {}).get(rec.peer_id, 0.0) + 1000.0 / speed * (1.0 + _load(rec))
    if rec.max_sessions > 0 and rec.sessions >= rec.max_sessions:
        cost += FULL_PENALTY_MS
    return cost


def _gaps(intervals: Iterable[tuple[int, int]], num_layers: int) -> list[tuple[int, int]]:
    """Half-open ranges of [0, num_layers) not covered by any interval."""
    gaps, covered = [], 0
    for start, end in sorted(intervals):
        if start > covered:
            gaps.append((covered, start))
        covered = max(covered, end)
    if covered < num_layers:
        gaps.append((covered, num_layers))
    return gaps


def _layers(a: int, b: int) -> str:
    """Human form of the half-open range [a, b): 'layer 4' or 'layers 4-5'."""
    return f"layer {a}" if b - a == 1 else f"layers {a}-{b - 1}"


def build_route(
    records: list[NodeRecord],
    num_layers: int,
    *,
    rtt_ms: Mapping[str, float] | None = None,
    exclude: Iterable[str] = frozenset(),
    model_id: str | None = None,
) -> list[NodeRecord]:
    """The cheapest chain of stage records covering [0, num_layers) contiguously.

    Each hop's ``layer_start`` equals the previous hop's ``layer_end``. Records that are not
    stages, that describe a different layer count, or whose peer is in ``exclude`` are ignored.
    Raises :class:`RouteError` naming the missing layer ranges when no complete route exists.
    """
    excluded = set(exclude)
    usable = [
        r for r in records
        if r.role == "stage" and r.num_layers == num_layers and r.peer_id not in excluded
        and 0 <= r.layer_start < r.layer_end <= num_layers
    ]  # fmt: skip
    by_start: dict[int, list[NodeRecord]] = {}
    for r in usable:
        by_start.setdefault(r.layer_start, []).append(r)
    # best[b] = (cost, peer ids along the path for deterministic ties, path) to reach boundary b
    best: dict[int, tuple[float, tuple[str, ...], list[NodeRecord]]] = {0: (0.0, (), [])}
    for b in sorted({0, *by_start}):  # edges only go forward, so ascending order is a topological order
        if b not in best:
            continue
        cost, ids, path = best[b]
        for r in by_start.get(b, []):
            cand = (cost + hop_cost(r, rtt_ms), (*ids, r.peer_id), [*path, r])
            if r.layer_end not in best or cand[:2] < best[r.layer_end][:2]:
                best[r.layer_end] = cand
    if num_layers in best and num_layers > 0:
        return best[num_layers][2]

    model = model_id or (records[0].model_id if records else "the model")
    gaps = _gaps(((r.layer_start, r.layer_end) for r in usable), num_layers)
    if gaps:
        missing = ", ".join(_layers(a, b) for a, b in gaps)
        raise RouteError(f"no stage hosts {missing} of model {model} ({num_layers} layers)")
    reach = max((b for b in best if b < num_layers), default=0)
    raise RouteError(
        f"stages cover every layer of model {model} but no chain of them meets at shared boundaries "
        f"past layer {reach} (no stage starts at layer {reach})"
    )


def format_route_table(records: list[NodeRecord], rtt_ms: Mapping[str, float] | None = None) -> str:
    """A fixed-width table of records (peer, role, layers, address, RTT, load) for ``dsd route``."""
    rtt = rtt_ms or {}
    header = ("PEER", "ROLE", "LAYERS", "ADDRESS", "RTT", "LOAD", "TOK/S")
    rows = [header]
    for r in sorted(records, key=lambda r: (r.layer_start, r.layer_end, r.peer_id)):
        rows.append((
            r.peer_id, r.role, f"{r.layer_start}:{r.layer_end}", r.grpc_address,
            f"{rtt[r.peer_id]:.1f} ms" if r.peer_id in rtt else "-",
            f"{r.sessions}/{r.max_sessions}", f"{r.tokens_per_s:.1f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
