"""`dsd bench`: check the communication-savings formula of speculative decoding on a real multi-process network.

One concern per module (the method is in cli.py's docstring and docs/bench.md):

    formula   tau, link latency per token, predicted savings L*t1*(1 - 1/tau), the check of measured cells
    plan      BenchConfig and the --quick preset, cells, their grouping into testnets, the prompts
    run       running the groups on local testnets, the speed probe, progress, HF baseline, run_bench
    report    headline figures, Markdown table and report, noise summary, explanations of misses, plots
    cli       the flags, `dsd bench` (register) and `python -m dsd_node.ops.bench` (main)
    adaptive  adaptive (lossy) verification against greedy: `python -m dsd_node.ops.bench.adaptive`
"""

from dsd_node.ops.bench.cli import (
    add_arguments,
    build_config,
    build_parser,
    cmd_bench,
    config_from_args,
    main,
    register,
)
from dsd_node.ops.bench.formula import (
    MIN_CHECKED_T1_MS,
    bytes_per_token,
    check,
    components,
    link_ms_per_token,
    oracle_tau,
    predicted_savings,
    relative_error,
    serialization_ms_per_token,
    summarize,
    tau_from_accepted,
)
from dsd_node.ops.bench.plan import (
    DRAFTERS,
    MODES,
    QUICK,
    TOLERANCE,
    BenchConfig,
    Cell,
    Group,
    all_cells,
    load_prompts,
    plan_groups,
)
from dsd_node.ops.bench.report import explain_misses, headline, headline_lines, markdown_table, noise_summary
from dsd_node.ops.bench.run import hf_baseline, machine_info, run_bench

__all__ = [
    "DRAFTERS", "MIN_CHECKED_T1_MS", "MODES", "QUICK", "TOLERANCE", "BenchConfig", "Cell", "Group", "add_arguments",
    "all_cells", "build_config", "build_parser", "bytes_per_token", "check", "cmd_bench", "components",
    "config_from_args", "explain_misses", "headline", "headline_lines", "hf_baseline", "link_ms_per_token",
    "load_prompts", "machine_info", "main", "markdown_table", "noise_summary", "oracle_tau", "plan_groups",
    "predicted_savings", "register", "relative_error", "run_bench", "serialization_ms_per_token", "summarize",
    "tau_from_accepted",
]
