"""The theory `dsd bench` checks: tokens per round tau, the link latency per token, the predicted savings
L*t1*(1 - 1/tau), and the check of each measured cell against them (see the package docstring, docs/bench.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from dsd_node.engine.speculation import DsiPolicy, Ewma
from dsd_node.ops.bench.plan import Cell

MIN_CHECKED_T1_MS = 10.0  # cells below this are reported but not judged (the savings are within the noise)


def tau_from_accepted(accepted_per_round: Sequence[int]) -> float:
    """Tokens committed per round: the mean of the verdicts' committed-token counts (0 for no rounds)."""
    return sum(accepted_per_round) / len(accepted_per_round) if accepted_per_round else 0.0


def oracle_tau(k: int) -> float:
    """Tokens per round of a drafter that is always right: k accepted drafts plus the target's own next token."""
    return float(k + 1)


def oracle_alpha(drafter: str | None) -> float | None:
    """ALPHA of a calibrated drafter name ('oracle' = 1.0, 'oracle:0.7' = 0.7); None for any other drafter."""
    if drafter == "oracle":
        return 1.0
    if drafter and drafter.startswith("oracle:"):
        return float(drafter.removeprefix("oracle:"))
    return None


def expected_tau(alpha: float, k: int) -> float:
    """Tokens per round when each of k drafts is right with probability alpha (stopping at the first miss),
    plus the target's own token: 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def predicted_dsi_over_si(alpha: float, k: int, stages: int, round_ms: float, draft_ms_per_token: float,
                          max_inflight: int, min_valid_prob: float = 0.35) -> float:
    """Our dsi against si, from the head's own cost model (dsd_node.engine.speculation) fed the measured figures.

    si spends round_ms per round: k drafted tokens (draft_ms_per_token each, D) and the wait W for the verdict.
    dsi sends the same chain of k drafts as [y, d1..dj] + the rest when that makes the expected time to the
    verdict that ends the chain, T(j), shorter than si's k*D + W; same tokens, so dsi / si = (k*D + W) / T(j).
    Where no split pays, a round past the chain (usable with p = alpha^(k+1)) is sent when the policy says
    so; then, as in the DSI paper's analysis, along a chain of usable rounds a verdict comes every
    max(round_ms / m, (k+1)*D) (drafting the next round cannot overlap itself), m rounds in flight while
    p^(m-1) >= min_valid_prob, and after a wasted one a whole round again."""
    if max_inflight < 2 or round_ms <= 0:
        return 1.0
    d = max(0.0, draft_ms_per_token)
    w = max(0.0, round_ms - k * d)
    pol = DsiPolicy(min_valid_prob, stages, min(alpha, 1.0) * 1e9, 1e9, Ewma(w, 0.0), Ewma(d, 0.0))
    j = pol.model_split(k)
    if j < k:
        return round_ms / pol.chain_time(j, k)
    if not pol.speculate(k + 1, k + 1, w):
        return 1.0
    p = min(alpha, 1.0) ** (k + 1)
    m = max_inflight if p >= 1.0 else 1 + math.floor(math.log(min_valid_prob) / math.log(p))
    m = max(2, min(max_inflight, m))
    return round_ms / (p * max(round_ms / m, (k + 1) * d) + (1.0 - p) * round_ms)


def dsi_over_si_bound(alpha: float, k: int, round_ms: float, draft_ms_per_token: float) -> float:
    """The most any pipelined schedule can gain over si when a miss is never rescued (oracle:ALPHA: at a miss the
    drafter never proposes the target's token, so no tree holds it).

    After each miss the token that follows is known only from a verdict, so each run of accepted drafts ends
    with a whole wait W; it holds 1/(1 - alpha) tokens on average (geometric, the correction included), and
    its m tokens must be drafted one after another first (m*D). si commits tau = (1 - alpha^(k+1)) / (1 - alpha)
    tokens per k*D + W. Bound: (k*D + W) / ((W + D / (1 - alpha)) * (1 - alpha^(k+1)))."""
    if alpha >= 1.0:
        return float("inf")
    d = max(0.0, draft_ms_per_token)
    w = max(0.0, round_ms - k * d)
    return round_ms / ((w + d / (1.0 - alpha)) * (1.0 - alpha ** (k + 1)))


@dataclass
class Paired:
    """dsi's speed over si's, run by run: run i of each cell is the same prompt and repeat, timed next to each other
    (the sweep interleaves modes), so a slow spell of the machine weighs on both sides of most pairs.
    `same_*`: the pairs in which dsi sent exactly si's rounds (same count, none wasted): their spread is what the
    machine's noise alone does to a ratio whose true value is 1."""

    median: float
    low: float
    high: float
    pairs: int
    same_schedule: int
    same_low: float | None
    same_high: float | None


def paired_speedup(si: Cell, dsi: Cell) -> Paired | None:
    """Per pair, si's ms/token over dsi's (> 1: dsi faster); None without pairs."""
    ratios, same = [], []
    for a, b in zip(si.runs, dsi.runs, strict=False):  # a cell whose testnet failed has fewer
        if not a.get("new_tokens") or not b.get("new_tokens"):
            continue
        r = (a["wall_ms"] / a["new_tokens"]) / (b["wall_ms"] / b["new_tokens"])
        ratios.append(r)
        if b["rounds"] == a["rounds"] and not b.get("rounds_wasted"):
            same.append(r)
    if not ratios:
        return None
    return Paired(statistics.median(ratios), min(ratios), max(ratios), len(ratios), len(same),
                  min(same, default=None), max(same, default=None))


def link_ms_per_token(links: int, t1_ms: float, tau: float) -> float:
    """Link latency per generated token: one round crosses `links` links of t1 each and commits tau tokens."""
    return links * t1_ms / tau if tau > 0 else 0.0


def predicted_savings(links: int, t1_ms: float, tau: float) -> float:
    """Link latency saved per token by committing tau tokens per round instead of one: L*t1*(1 - 1/tau)."""
    return links * t1_ms * (1.0 - 1.0 / tau) if tau > 0 else 0.0


def relative_error(measured: float | None, predicted: float | None) -> float | None:
    """|measured - predicted| / predicted, or None where there is nothing to compare (no prediction or it is 0)."""
    if measured is None or predicted is None or predicted <= 0:
        return None
    return abs(measured - predicted) / predicted


def serialization_ms_per_token(bytes_per_token: float, rate_bps: float | None) -> float:
    """Time on the wire per token at a link rate (0 for unlimited links)."""
    return bytes_per_token * 8.0 / rate_bps * 1e3 if rate_bps else 0.0



# ---------------------------------------------------------------------------------------------------------------------
# Per-token figures of measured cells and the check against the prediction


def _medians(cell: Cell) -> None:
    """ms/token (median over prompts), tokens/s, tau (mean over prompts) and wasted rounds from the runs."""
    ms = [r["wall_ms"] / r["new_tokens"] for r in cell.runs if r["new_tokens"]]
    if not ms:
        return
    cell.ms_per_token = statistics.median(ms)
    cell.tokens_per_s = 1e3 / cell.ms_per_token
    cell.tau = statistics.mean(tau_from_accepted(r["accepted_per_round"]) for r in cell.runs)
    cell.rounds_wasted = statistics.mean(r["rounds_wasted"] for r in cell.runs)
    slow = [r["slowdown"] for r in cell.runs if r.get("slowdown") is not None]
    cell.slowdown_max = max(slow) if slow else None


def summarize(cell: Cell, hidden_size: int, prompt_len: float, rate_bps: float | None) -> None:
    """Fill a cell's per-token figures from its runs: medians, then the link / compute / serialization split."""
    _medians(cell)
    if cell.ms_per_token is None or cell.tau is None:
        return
    cell.link_ms_per_token = link_ms_per_token(cell.links, cell.t1_ms, cell.tau)
    cell.compute_ms_per_token = cell.ms_per_token - cell.link_ms_per_token
    cell.serialization_ms_per_token = serialization_ms_per_token(
        bytes_per_token(cell, hidden_size, prompt_len), rate_bps)


def bytes_per_token(cell: Cell, hidden_size: int, prompt_len: float) -> float:
    """Hidden-state bytes (float32) that cross the N-1 inter-stage links per generated token (verdicts are tiny).

    A round carries 1 + k tree nodes (the known next token and k drafts; ar: 1); the first also the prompt.
    """
    rounds = statistics.mean(r["rounds"] for r in cell.runs)
    tokens = statistics.mean(r["new_tokens"] for r in cell.runs)
    nodes = prompt_len + rounds * (1 + (cell.k or 0))
    return (cell.stages - 1) * nodes * hidden_size * 4 / max(1.0, tokens)


def check(cells: list[Cell], tolerance: float) -> None:
    """Savings of each si/dsi cell against ar in the same (N, t1); prediction and pass for si."""
    by_key = {c.key(): c for c in cells if c.ms_per_token is not None}
    for c in cells:
        if c.mode == "ar" or c.ms_per_token is None:
            continue
        ar_t, ar_0 = by_key.get((c.stages, c.t1_ms, None, None, "ar")), by_key.get((c.stages, 0.0, None, None, "ar"))
        spec_0 = by_key.get((c.stages, 0.0, c.drafter, c.k, c.mode))
        if ar_t is None:
            continue
        c.measured_savings_raw = ar_t.ms_per_token - c.ms_per_token
        if ar_0 is not None and spec_0 is not None:
            c.measured_savings_link = (ar_t.ms_per_token - ar_0.ms_per_token) - (c.ms_per_token - spec_0.ms_per_token)
        if c.mode != "si" or c.t1_ms <= 0:
            continue
        c.predicted_savings = predicted_savings(c.links, c.t1_ms, c.tau)
        measured = c.measured_savings_link if c.measured_savings_link is not None else c.measured_savings_raw
        err = relative_error(measured, c.predicted_savings)
        raw_err = relative_error(c.measured_savings_raw, c.predicted_savings)
        c.error_pct = None if err is None else 100 * err
        c.error_raw_pct = None if raw_err is None else 100 * raw_err
        if c.t1_ms >= MIN_CHECKED_T1_MS and err is not None:
            c.passed = err <= tolerance
        c.components = components(c, ar_t, ar_0, spec_0)


def components(c: Cell, ar_t: Cell, ar_0: Cell | None, si_0: Cell | None) -> dict:
    """Where the per-token time goes, for ar and si: compute (the t1 = 0 time, which holds the serialization
    too: a rate limit, when set, applies at every t1), predicted and measured link time, and the residual.

    residual = measured link part - predicted link part: queueing, wake-up latency and relay overhead when
    positive; work that overlaps the link wait (and so drops out of the critical path at t1 > 0) when negative,
    and in both directions the machine's own noise (`slowdown_max`: the worst speed-probe reading).
    """
    out = {}
    for name, at_t, at_0, tau in (("ar", ar_t, ar_0, 1.0), ("si", c, si_0, c.tau)):
        link_pred = link_ms_per_token(c.links, c.t1_ms, tau)
        d = {"ms_per_token": at_t.ms_per_token, "link_predicted": link_pred,
             "serialization": at_t.serialization_ms_per_token or 0.0, "slowdown_max": at_t.slowdown_max}
        if at_0 is not None:
            d["compute_t1_0"] = at_0.ms_per_token
            d["slowdown_max"] = max((x for x in (at_t.slowdown_max, at_0.slowdown_max) if x), default=None)
            d["link_measured"] = at_t.ms_per_token - at_0.ms_per_token
            d["residual"] = d["link_measured"] - link_pred
        out[name] = d
    return out
