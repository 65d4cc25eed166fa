"""`dsd bench`: check the communication-savings formula of speculative decoding on a real multi-process network.

For every cell of a sweep (stages N, one-way link delay t1, draft depth k, mode, drafter) the harness
runs real local testnets (head + drafter colocated with stage 0, so one round crosses L = N links:
N-1 between stages and the verdict's return to the head; every node behind the link emulator),
generates greedily from a fixed set of HumanEval prompts with `ignore_eos` (every run has the same
length) and measures ms per token and tokens per round tau. The testnets of one (N, drafter), one per
t1, run side by side and take turns, so that load from elsewhere on the machine hits all t1 alike.

The check: speculative inference (si) commits tau tokens per round, so it pays the link latency
L*t1 once per tau tokens instead of once per token (ar). Predicted savings per token:

    L * t1 * (1 - 1/tau)        (oracle drafter: tau = k + 1, so L * t1 * k / (k + 1))

compared with the measured link part of the savings, which removes compute with the t1 = 0 runs
of the same cell:

    [ms/tok(ar, t1) - ms/tok(ar, 0)] - [ms/tok(si, t1) - ms/tok(si, 0)]

A cell with t1 >= 10 ms passes when the two agree within the tolerance (10 %). A peer baseline (Hugging
Face generate and assisted generation, in this process, same models, prompts and lengths) gives
the protocol overhead at t1 = 0. See docs/bench.md for how to run it and read the results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from dsd_node.ops.bench.plan import ALPHA_SWEEP, QUICK, BenchConfig, Cell
from dsd_node.ops.bench.report import explain_misses, headline_lines, markdown_table, theory_lines
from dsd_node.ops.bench.run import Progress, run_bench


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The bench flags; a flag left unset takes the --quick preset's value (with --quick) or the default."""
    d = BenchConfig()
    ap.add_argument("--quick", action="store_true",
                    help="a short sweep (N 2,4; t1 0,25; k 4; oracle+embedded; 2 prompts; 32 tokens): a few minutes")
    ap.add_argument("--alpha-sweep", action="store_true",
                    help="the calibrated-drafter sweep (N 4; t1 0,25; k 4; drafters oracle:0.5 ... oracle:0.9; "
                         "2 prompts; 32 tokens): measured tau and dsi/si against the theory table's predictions")
    ap.add_argument("--stages", type=_ints, help=f"pipeline stage counts N (default {_csv(d.stages)})")
    ap.add_argument("--t1", type=_floats, dest="t1_ms", help=f"one-way link delays in ms (default {_csv(d.t1_ms)})")
    ap.add_argument("--k", type=_ints, dest="ks", help=f"draft depths: drafts per round (default {_csv(d.ks)})")
    ap.add_argument("--modes", type=_names, help=f"modes (default {_csv(d.modes)})")
    ap.add_argument("--drafters", type=_names, help="embedded (the embedded drafter or --draft-model), oracle (the "
                                                    "target drafts for itself: tau = k+1), oracle:ALPHA (the target's "
                                                    "token kept with probability ALPHA) (default embedded,oracle)")
    ap.add_argument("--prompts", type=int, help=f"HumanEval prompts, a seeded subset (default {d.prompts})")
    ap.add_argument("--prompt-set", choices=["humaneval", "builtin"], help="prompt source (default humaneval)")
    ap.add_argument("--repeats", type=int, help="generations per prompt and cell (default 1)")
    ap.add_argument("--max-new-tokens", type=int, help=f"tokens per generation (default {d.max_new_tokens})")
    ap.add_argument("--max-inflight", type=int, help=f"dsi: most rounds in flight (default {d.max_inflight})")
    ap.add_argument("--seed", type=int, help="prompt subset seed (default 0)")
    ap.add_argument("--threads", type=int, help="torch threads per node process and for the HF baseline (default 1)")
    ap.add_argument("--device", help="every node's and the HF baseline's device: cpu, cuda, cuda:N, mps, auto (default cpu)")
    ap.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="compute dtype (default float32)")
    ap.add_argument("--model", help="target model (default embedded:target)")
    ap.add_argument("--draft-model", help="the 'embedded' drafter's model (default embedded:drafter)")
    ap.add_argument("--link-rate", help="also limit each link's bandwidth, tc syntax (e.g. 100mbit; default unlimited)")
    ap.add_argument("--tolerance", type=float, help=f"pass threshold on the relative error (default {d.tolerance})")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", default=None,
                    help="skip the Hugging Face peer baseline")
    ap.add_argument("--no-emulator-at-zero", dest="emulator_at_zero", action="store_false", default=None,
                    help="at t1 = 0 connect nodes directly instead of through the zero-delay link emulator")
    ap.add_argument("--settle-s", type=float, help="before each timed generation, wait up to this long for the "
                                                   "machine to be at its usual speed (default 2; 0: never wait)")
    ap.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plots")
    ap.add_argument("--out", type=Path, help="results folder (default results/bench-<timestamp>/)")


def _csv(xs: Iterable) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(**(ALPHA_SWEEP if getattr(args, "alpha_sweep", False) else QUICK if args.quick else {}))
    for name in BenchConfig.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


def cmd_bench(args: argparse.Namespace) -> int:
    """`dsd bench`: run the sweep, print the table and the headline; exit 0 even when cells miss (it reports)."""
    cfg = config_from_args(args)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"dsd bench: {e}", file=sys.stderr)
        return 2
    results = run_bench(cfg)
    cells = [Cell(**c) for c in results["cells"]]
    print(markdown_table(cells))
    print()
    print("\n".join(headline_lines(results["headline"], results["baseline"])))
    if theory := results.get("theory"):
        print("\n" + "\n".join(theory_lines(theory)))
    misses = explain_misses(cells)
    if misses:
        print("\nCells that miss the prediction:\n" + "\n".join(misses))
    print(f"\nresults in {cfg.out}/ (results.json, results.md{''.join(', ' + p for p in results['plots'])}); "
          f"wall time {Progress.clock(results['wall_s'])}")
    return 1 if all(c.error for c in cells) else 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object (`dsd bench ...`)."""
    ap = subparsers.add_parser("bench", help="check the communication-savings formula on a local multi-process network",
                               description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.set_defaults(func=cmd_bench)
    return ap


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dsd_node.ops.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return ap


def build_config(argv: list[str] | None = None) -> BenchConfig:
    """The BenchConfig that `python -m dsd_node.ops.bench ARGV` would run."""
    return config_from_args(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return cmd_bench(build_parser().parse_args(argv))

