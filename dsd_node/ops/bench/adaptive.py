"""What adaptive (lossy) verification costs and buys: agreement with greedy output against tokens per round.

    python -m dsd_node.ops.bench.adaptive [--prompts 8] [--max-new-tokens 64] [--out results/adaptive.json]

For each setting of (adaptive_margin, adaptive_tie_margin), generates from the same prompts with the
in-process engine and reports: tokens per round (tau), the share of generated tokens equal to the
greedy output at the same position, and the length of the common prefix with greedy output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.local import LocalEngine
from dsd_node.engine.verify import SamplingParams

PROMPTS = [
    "def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n", "    return [x for x in", "# Parse the command line arguments\n",
    "def read_file(path):\n    with open(path) as f:\n", "if __name__ == '__main__':\n",
]
SETTINGS = [(0.0, 0.0), (0.05, 0.0), (0.05, 0.01), (0.15, 0.02), (0.3, 0.05), (0.5, 0.1)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run(prompts: int, max_new: int, draft_k: int) -> list[dict]:
    eng = LocalEngine(stages=2)
    rows = []
    greedy = {}
    for p in PROMPTS[:prompts]:
        greedy[p] = eng.generate(p, GenerationConfig(max_new_tokens=max_new, draft_k=draft_k, ignore_eos=True)).tokens
    for margin, tie in SETTINGS:
        same = total = prefix = rounds = 0
        t0 = time.perf_counter()
        for p in PROMPTS[:prompts]:
            cfg = GenerationConfig(max_new_tokens=max_new, draft_k=draft_k, ignore_eos=True, sampling=SamplingParams.create(
                adaptive=True, adaptive_margin=margin, adaptive_tie_margin=tie))
            r = eng.generate(p, cfg)
            same += sum(x == y for x, y in zip(r.tokens, greedy[p], strict=False))
            total += len(r.tokens)
            prefix += common_prefix(r.tokens, greedy[p])
            rounds += r.stats.rounds
        rows.append({"adaptive_margin": margin, "adaptive_tie_margin": tie, "tokens_per_round": round(total / rounds, 3),
                     "agreement_pct": round(100 * same / total, 1), "mean_common_prefix": round(prefix / prompts, 1),
                     "seconds": round(time.perf_counter() - t0, 2)})
        print(f"  margin {margin:4.2f} tie {tie:4.2f}: {rows[-1]['tokens_per_round']:.2f} tokens/round, "
              f"{rows[-1]['agreement_pct']:5.1f}% equal to greedy", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dsd_node.ops.bench.adaptive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-k", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/adaptive.json"))
    args = ap.parse_args(argv)
    rows = run(args.prompts, args.max_new_tokens, args.draft_k)
    print("| margin | tie margin | tokens/round | equal to greedy | common prefix |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['adaptive_margin']} | {r['adaptive_tie_margin']} | {r['tokens_per_round']} | "
              f"{r['agreement_pct']}% | {r['mean_common_prefix']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": rows, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                                    "draft_k": args.draft_k}, indent=2))


if __name__ == "__main__":
    main()
