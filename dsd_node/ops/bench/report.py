"""Reading a `dsd bench` sweep: the headline figures, the Markdown table and report, the noise summary, the
explanation of each cell that misses the prediction, and the plots."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from dsd_node.ops.bench.formula import (
    MIN_CHECKED_T1_MS,
    dsi_over_si_bound,
    expected_tau,
    link_ms_per_token,
    oracle_alpha,
    paired_speedup,
    predicted_dsi_over_si,
)
from dsd_node.ops.bench.plan import SLOW_THRESHOLD, BenchConfig, Cell

HEADLINE_STAGES, HEADLINE_T1_MS, HEADLINE_DRAFTER = 4, 25.0, "embedded"
GOALS = {"si_over_ar_tokens_per_s": 2.5, "dsi_over_si_tokens_per_s": 1.3, "ar_over_hf_generate_ms_per_token": 1.5}


# ---------------------------------------------------------------------------------------------------------------------
# Headline


def _find(cells: Iterable[Cell], **want) -> list[Cell]:
    return [c for c in cells if c.ms_per_token is not None and all(getattr(c, k) == v for k, v in want.items())]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline(cells: list[Cell], baseline: dict | None, cfg: BenchConfig) -> dict:
    """The figures the project aims at (reported, never asserted); None where the sweep lacks the cell."""
    n, t1, d = HEADLINE_STAGES, HEADLINE_T1_MS, HEADLINE_DRAFTER
    ar = _find(cells, stages=n, t1_ms=t1, mode="ar")
    si = _find(cells, stages=n, t1_ms=t1, mode="si", drafter=d)
    best = max(si, key=lambda c: c.tokens_per_s, default=None)
    dsi = _find(cells, stages=n, t1_ms=t1, mode="dsi", drafter=d, k=best.k) if best else []
    h: dict = {"goals": GOALS, "where": f"N={n}, t1={t1:g} ms, drafter {d}, best k for si",
               "k": best.k if best else None,
               "si_over_ar_tokens_per_s": _ratio(best.tokens_per_s, ar[0].tokens_per_s) if best and ar else None,
               "dsi_over_si_tokens_per_s": _ratio(dsi[0].tokens_per_s, best.tokens_per_s) if best and dsi else None,
               "dsi_over_si_paired": _paired(best, dsi)}
    checked = [c for c in cells if c.passed is not None]
    h["formula_cells_passed"] = f"{sum(c.passed for c in checked)}/{len(checked)}"
    h["overhead_vs_hf"] = overhead_vs_hf(cells, baseline, cfg)
    big = h["overhead_vs_hf"].get(f"N={max(cfg.stages)}", {})
    h["ar_over_hf_generate_ms_per_token"] = big.get("ar_over_hf_generate")
    return h


def _paired(si: Cell | None, dsi: list[Cell]) -> dict | None:
    p = paired_speedup(si, dsi[0]) if si is not None and dsi else None
    return asdict(p) if p is not None else None


def overhead_vs_hf(cells: list[Cell], baseline: dict | None, cfg: BenchConfig) -> dict:
    """Our ms/token at t1 = 0 over Hugging Face's (N=2 and the largest N): ar vs generate, si/dsi vs assisted."""
    if not baseline:
        return {}
    gen, asst = baseline["hf_generate"]["ms_per_token"], baseline["hf_assisted"]["ms_per_token"]
    out = {}
    for n in sorted({2, max(cfg.stages)} & set(cfg.stages)):
        row: dict = {}
        ar = _find(cells, stages=n, t1_ms=0.0, mode="ar")
        row["ar_over_hf_generate"] = _ratio(ar[0].ms_per_token, gen) if ar else None
        for mode in ("si", "dsi"):
            spec = _find(cells, stages=n, t1_ms=0.0, mode=mode, drafter="embedded")
            best = min(spec, key=lambda c: c.ms_per_token, default=None)
            row[f"{mode}_over_hf_assisted"] = _ratio(best.ms_per_token, asst) if best else None
            row[f"{mode}_k"] = best.k if best else None
        out[f"N={n}"] = row
    return out


def theory(cells: list[Cell], cfg: BenchConfig) -> list[dict]:
    """For each calibrated drafter (oracle:ALPHA) and link delay: measured tau and dsi/si against the predictions
    (formula.expected_tau, formula.predicted_dsi_over_si and the bound formula.dsi_over_si_bound, from si's measured
    round time and drafting time per token)."""
    rows = []
    for si in cells:
        alpha = oracle_alpha(si.drafter)
        if si.mode != "si" or alpha is None or si.ms_per_token is None or not si.tau:
            continue
        dsi = _find(cells, stages=si.stages, t1_ms=si.t1_ms, mode="dsi", drafter=si.drafter, k=si.k)
        round_ms = si.ms_per_token * si.tau
        drafted = sum(r["rounds"] for r in si.runs) * si.k
        draft_ms = sum(r["draft_ms"] for r in si.runs) / drafted if drafted else 0.0
        rows.append({"stages": si.stages, "t1_ms": si.t1_ms, "alpha": alpha, "k": si.k,
                     "tau_expected": expected_tau(alpha, si.k), "tau_measured": si.tau,
                     "draft_ms_per_token": draft_ms, "round_ms": round_ms,
                     "dsi_over_si_predicted": predicted_dsi_over_si(alpha, si.k, si.stages, round_ms, draft_ms,
                                                                    cfg.max_inflight or si.stages),
                     "dsi_over_si_bound": dsi_over_si_bound(alpha, si.k, round_ms, draft_ms),
                     "dsi_over_si_measured": _ratio(dsi[0].tokens_per_s, si.tokens_per_s) if dsi else None,
                     "dsi_over_si_paired": _paired(si, dsi)})
    return rows


def theory_lines(rows: list[dict]) -> list[str]:
    """The theory table in Markdown."""
    head = ["N", "t1 ms", "ALPHA", "k", "tau expected", "tau measured", "draft ms/tok", "si round ms",
            "dsi/si predicted", "dsi/si bound", "dsi/si measured", "dsi/si paired (range)", "same rounds (range)"]
    out = ["Theory (calibrated drafters, oracle:ALPHA): tau = (1 - ALPHA^(k+1)) / (1 - ALPHA); dsi/si from the head's "
           "cost model, and the bound for any schedule when misses are never rescued (docs/bench.md). Measured: the "
           "cells' medians; paired: the median of run-by-run ratios (same prompt, timed side by side); same rounds: "
           "how many pairs had dsi send exactly si's rounds, and their ratios (the machine's noise on a true 1.00x)",
           "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append(f"| {r['stages']} | {r['t1_ms']:g} | {r['alpha']:g} | {r['k']} | {r['tau_expected']:.2f} | "
                   f"{r['tau_measured']:.2f} | {r['draft_ms_per_token']:.1f} | {r['round_ms']:.0f} | "
                   f"{_f(r['dsi_over_si_predicted'], 2, 'x')} | {_f(r['dsi_over_si_bound'], 2, 'x')} | "
                   f"{_f(r['dsi_over_si_measured'], 2, 'x')} | {' | '.join(_paired_parts(r.get('dsi_over_si_paired')))} |")
    return out


def _paired_parts(p: dict | None) -> tuple[str, str]:
    """("1.02x (0.91-1.12)", "3 (0.95-1.04)"): the paired median and range, then the same-schedule pairs."""
    if not p:
        return "-", "-"
    same = f"{p['same_schedule']}" + (f" ({p['same_low']:.2f}-{p['same_high']:.2f})" if p["same_schedule"] else "")
    return f"{p['median']:.2f}x ({p['low']:.2f}-{p['high']:.2f})", same


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def _f(x: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


TABLE_HEADER = ["N", "t1 ms", "drafter", "k", "mode", "ms/token", "tokens/s", "tau", "wasted", "link ms/tok",
                "compute ms/tok", "pred. savings", "meas. savings (link)", "meas. savings (raw)", "error %", "pass"]


def markdown_table(cells: list[Cell]) -> str:
    """Every cell as a Markdown table row (savings in ms per token; error and pass use the link savings)."""
    rows = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for c in cells:
        ok = "-" if c.passed is None else ("yes" if c.passed else "**no**")
        if c.error:
            ok = f"error: {c.error[:60]}"
        vals = [str(c.stages), f"{c.t1_ms:g}", c.drafter or "-", str(c.k or "-"), c.mode, _f(c.ms_per_token, 2),
                _f(c.tokens_per_s, 1), _f(c.tau, 2), _f(c.rounds_wasted, 1) if c.mode == "dsi" else "-",
                _f(c.link_ms_per_token, 2), _f(c.compute_ms_per_token, 2), _f(c.predicted_savings, 2),
                _f(c.measured_savings_link, 2), _f(c.measured_savings_raw, 2), _f(c.error_pct, 1), ok]
        rows.append("| " + " | ".join(vals) + " |")
    return "\n".join(rows)


def explain_misses(cells: list[Cell]) -> list[str]:
    """One paragraph per failed cell: the measured components of ar and si, per token."""
    lines = []
    for c in cells:
        if c.passed is not False or not c.components:
            continue
        parts = []
        for mode, d in c.components.items():
            parts.append(f"{mode}: compute at t1=0 {_f(d.get('compute_t1_0'), 2)} (of which serialization "
                         f"{d['serialization']:.2f}), link predicted {d['link_predicted']:.2f}, measured "
                         f"{_f(d.get('link_measured'), 2)}, queueing/overlap residual {_f(d.get('residual'), 2, ' ms')} "
                         f"(machine up to {_f(d.get('slowdown_max'), 2, 'x')} slower during these runs)")
        lines.append(f"- {c.label()}: measured {_f(c.measured_savings_link, 2)} vs predicted "
                     f"{c.predicted_savings:.2f} ms/token ({c.error_pct:.1f} % off). " + "; ".join(parts) + ".")
    return lines


def noise_summary(cells: list[Cell], info: dict) -> dict:
    """How quiet the machine was: load averages and how many timed runs began while the speed probe read slow."""
    slow = [r["slowdown"] for c in cells for r in c.runs if r.get("slowdown") is not None]
    return {"cpu_count": info.get("cpu_count"), "loadavg_start": (info.get("loadavg") or [None])[0],
            "loadavg_end": (info.get("loadavg_end") or [None])[0], "runs": len(slow),
            "runs_slowed": sum(x > SLOW_THRESHOLD for x in slow), "worst_slowdown": max(slow, default=None)}


def headline_lines(h: dict, baseline: dict | None) -> list[str]:
    g = h["goals"]
    lines = [f"Headline ({h['where']}, k={h['k']}):",
             f"  si / ar tokens/s:  {_f(h['si_over_ar_tokens_per_s'], 2, 'x')}  (goal >= {g['si_over_ar_tokens_per_s']}x)",
             f"  dsi / si tokens/s: {_f(h['dsi_over_si_tokens_per_s'], 2, 'x')}  (goal >= {g['dsi_over_si_tokens_per_s']}x)"
             + _paired_headline(h.get("dsi_over_si_paired")),
             f"  formula cells passed (t1 >= {MIN_CHECKED_T1_MS:g} ms): {h['formula_cells_passed']}"]
    if baseline:
        lines.append(f"  HF generate {baseline['hf_generate']['ms_per_token']:.2f} ms/token, HF assisted "
                     f"{baseline['hf_assisted']['ms_per_token']:.2f} ms/token (this process, t1=0)")
    for n, row in h["overhead_vs_hf"].items():
        lines.append(f"  {n}, t1=0: ar / HF generate {_f(row['ar_over_hf_generate'], 2, 'x')} (goal <= "
                     f"{g['ar_over_hf_generate_ms_per_token']}x); si(k={row['si_k']}) / HF assisted "
                     f"{_f(row['si_over_hf_assisted'], 2, 'x')}; dsi(k={row['dsi_k']}) / HF assisted "
                     f"{_f(row['dsi_over_hf_assisted'], 2, 'x')}  (ms per token)")
    if nz := h.get("noise"):
        lines.append(f"  machine: {nz['cpu_count']} cores, 1-min load average {_f(nz['loadavg_start'])} at the start, "
                     f"{_f(nz['loadavg_end'])} at the end; {nz['runs_slowed']}/{nz['runs']} timed runs began while the "
                     f"speed probe read > {SLOW_THRESHOLD}x slower (worst {_f(nz['worst_slowdown'], 2, 'x')})")
    return lines


def _paired_headline(p: dict | None) -> str:
    if not p:
        return ""
    median, same = _paired_parts(p)
    return f"; run by run {median}, pairs in which dsi sent si's rounds: {same}"


def write_markdown(path: Path, cells: list[Cell], h: dict, baseline: dict | None, cfg: BenchConfig) -> None:
    misses = explain_misses(cells)
    text = [f"# dsd bench {datetime.now():%Y-%m-%d %H:%M}", "",
            f"Prompts: {cfg.prompts} ({cfg.prompt_set}, seed {cfg.seed}), {cfg.max_new_tokens} new tokens, greedy, "
            f"ignore_eos; medians over prompts. Links per round L = N; times in ms per token; "
            f"pass: |measured link savings - predicted| / predicted <= {cfg.tolerance:.0%} for t1 >= "
            f"{MIN_CHECKED_T1_MS:g} ms.", "", markdown_table(cells), "", "```", *headline_lines(h, baseline), "```"]
    if rows := theory(cells, cfg):
        text += ["", "## Theory", "", *theory_lines(rows)]
    if misses:
        text += ["", "## Cells that miss the prediction", "", *misses]
    path.write_text("\n".join(text) + "\n")


def write_plots(out: Path, cells: list[Cell], cfg: BenchConfig) -> list[str]:
    """The PNGs (matplotlib, Agg); [] without matplotlib."""
    try:  # matplotlib is optional (dsd[bench]), so it loads only when plotting
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    _plot_ms_per_token(plt, out / "ms_per_token.png", cells, cfg)
    _plot_savings(plt, out / "savings.png", cells, cfg)
    return ["ms_per_token.png", "savings.png"]


def _plot_ms_per_token(plt, path: Path, cells: list[Cell], cfg: BenchConfig) -> None:
    """ms/token against t1, a panel per N, a line per mode and drafter; dashed: the t1 = 0 time + L*t1/tau."""
    k_plot = 4 if 4 in cfg.ks else cfg.ks[len(cfg.ks) // 2]
    fig, axes = plt.subplots(1, len(cfg.stages), figsize=(4.5 * len(cfg.stages), 4), squeeze=False, sharey=True)
    series = [("ar", None, None)] + [(m, d, k_plot) for d in cfg.drafters for m in ("si", "dsi") if m in cfg.modes]
    for ax, n in zip(axes[0], cfg.stages, strict=True):
        for mode, d, k in series:
            found = sorted(_find(cells, stages=n, mode=mode, drafter=d, k=k), key=lambda c: c.t1_ms)
            if not found:
                continue
            line, = ax.plot([c.t1_ms for c in found], [c.ms_per_token for c in found], marker="o",
                            label=mode if d is None else f"{mode} {d}")
            if mode != "dsi" and found[0].t1_ms == 0:
                base = found[0]
                ax.plot([c.t1_ms for c in found], [base.ms_per_token + link_ms_per_token(n, c.t1_ms, c.tau)
                                                   for c in found], ls="--", lw=1, color=line.get_color())
        ax.set(title=f"N={n} (k={k_plot}; dashed: t1=0 + L·t1/tau)", xlabel="t1 (ms one-way per link)",
               ylabel="ms per token")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_savings(plt, path: Path, cells: list[Cell], cfg: BenchConfig) -> None:
    """Measured (link) against predicted savings for every si cell with a prediction, y = x and the band."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for d in cfg.drafters:
        found = [c for c in _find(cells, mode="si", drafter=d) if c.predicted_savings]
        ys = [c.measured_savings_link if c.measured_savings_link is not None else c.measured_savings_raw
              for c in found]
        if found:
            ax.scatter([c.predicted_savings for c in found], ys, label=d)
            for c, y in zip(found, ys, strict=True):
                ax.annotate(f"N{c.stages} t{c.t1_ms:g} k{c.k}", (c.predicted_savings, y), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    top = max([c.predicted_savings or 0 for c in cells] + [1.0]) * 1.15
    ax.plot([0, top], [0, top], "k-", lw=1, label="y = x")
    ax.fill_between([0, top], [0, top * (1 - cfg.tolerance)], [0, top * (1 + cfg.tolerance)], color="gray",
                    alpha=0.2, label=f"±{cfg.tolerance:.0%}")
    ax.set(xlabel="predicted savings L·t1·(1-1/tau) (ms/token)", ylabel="measured link savings (ms/token)",
           title="si vs ar: link latency saved per token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
