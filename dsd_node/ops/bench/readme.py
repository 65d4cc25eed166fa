"""The README's benchmark table and plots, and docs/bench.md's adaptive table, from the committed results files.

    python -m dsd_node.ops.bench.readme            # rewrite them from docs/results/ (after `dsd bench --out docs/results`)
    python -m dsd_node.ops.bench.readme --check    # exit 1 if a table differs from its results file or a plot is missing

Each table sits between two HTML comments (`<!-- bench-table:begin -->` ... `end`) in its Markdown file; only
the text between them is replaced. The plots are drawn again from results.json (matplotlib, dsd[bench]).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsd_node.ops.bench.plan import BenchConfig, Cell
from dsd_node.ops.bench.report import HEADLINE_T1_MS, write_plots

README_MARKS = ("<!-- bench-table:begin -->", "<!-- bench-table:end -->")
ADAPTIVE_MARKS = ("<!-- adaptive-table:begin -->", "<!-- adaptive-table:end -->")  # adaptive/results.json


def adaptive_marks(stem: str) -> tuple[str, str]:
    """The marks of the table of adaptive/STEM.json (results.json: ADAPTIVE_MARKS)."""
    return ADAPTIVE_MARKS if stem == "results" else (f"<!-- adaptive-table:{stem}:begin -->",
                                                      f"<!-- adaptive-table:{stem}:end -->")


def _f(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def readme_table(results: dict, t1_ms: float = HEADLINE_T1_MS) -> str:
    """The README's table: every cell at link delay t1, by N, then ar, then each drafter's si and dsi."""
    cells = [Cell(**c) for c in results["cells"]]
    drafters = results["config"]["drafters"]
    order = {("ar", None): 0} | {(m, d): 1 + 2 * i + j for i, d in enumerate(drafters) for j, m in
                                  enumerate(("si", "dsi"))}
    rows = sorted((c for c in cells if c.t1_ms == t1_ms and c.ms_per_token is not None and (c.mode, c.drafter) in order),
                  key=lambda c: (c.stages, order[(c.mode, c.drafter)], c.k or 0))
    lines = ["| N | t1 | drafter | mode | ms/token | tokens/s | tau | predicted savings | measured savings | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        measured = c.measured_savings_link if c.measured_savings_link is not None else c.measured_savings_raw
        err = "" if c.error_pct is None else f"{c.error_pct:.1f} %"
        lines.append(f"| {c.stages} | {c.t1_ms:g} | {c.drafter or '-'} | {c.mode} | {c.ms_per_token:.1f} | "
                     f"{c.tokens_per_s:.1f} | {c.tau:.2f} | {_f(c.predicted_savings)} | {_f(measured)} | {err} |")
    return "\n".join(lines)


def adaptive_table(results: dict) -> str:
    from dsd_node.ops.bench.adaptive import AdaptiveRow, table_lines

    rows = [AdaptiveRow(**r) for r in results["rows"]]
    return "\n".join(table_lines(rows, results["stages"], results["t1_ms"], results["bound"]))


def splice(text: str, marks: tuple[str, str], body: str) -> str:
    """text with what lies between the two marks replaced by body; ValueError if the marks are missing."""
    a, b = text.find(marks[0]), text.find(marks[1])
    if a < 0 or b < a:
        raise ValueError(f"no {marks[0]} ... {marks[1]} in the file")
    return text[: a + len(marks[0])] + "\n" + body + "\n" + text[b:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsd_node.ops.bench.readme", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("docs/results"), help="the bench's results folder")
    ap.add_argument("--readme", type=Path, default=Path("README.md"))
    ap.add_argument("--bench-doc", type=Path, default=Path("docs/bench.md"))
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of date")
    ap.add_argument("--no-plots", dest="plots", action="store_false", help="rewrite the tables only")
    args = ap.parse_args(argv)
    results = json.loads((args.results / "results.json").read_text())
    targets = [(args.readme, README_MARKS, readme_table(results))]
    for adaptive in sorted((args.results / "adaptive").glob("*.json")):  # each one whose marks the doc has
        marks = adaptive_marks(adaptive.stem)
        if marks[0] in args.bench_doc.read_text() or adaptive.stem == "results":
            targets.append((args.bench_doc, marks, adaptive_table(json.loads(adaptive.read_text()))))
    stale = []
    for path, marks, body in targets:
        old = path.read_text()
        new = splice(old, marks, body)
        if new != old:
            stale.append(str(path))
            if not args.check:
                path.write_text(new)
    if args.check:
        stale += [f"{args.results / p} (missing)" for p in results.get("plots", []) if not (args.results / p).exists()]
        if stale:
            print("out of date: " + ", ".join(stale) + " (run python -m dsd_node.ops.bench.readme)", file=sys.stderr)
            return 1
        return 0
    cfg = BenchConfig(**{k: v for k, v in results["config"].items() if k != "out"})
    plots = write_plots(args.results, [Cell(**c) for c in results["cells"]], cfg) if args.plots else []
    print(f"updated {', '.join(str(p) for p, _, _ in targets)}; plots {', '.join(plots) or 'not drawn'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
