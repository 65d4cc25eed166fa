"""What adaptive (lossy) verification buys and costs: the speed/quality curve over its margins.

    python -m dsd_node.ops.bench.adaptive [--prompts 8] [--max-new-tokens 48] [--out docs/results/adaptive]
                                          [--testnet]

For each setting of (adaptive_margin, adaptive_tie_margin), generates from the same HumanEval prompts
(greedy, k drafts, ignore_eos) with the in-process engine and reports:

- speed: tokens per round (tau); ms per token in this process (t1 = 0); and tokens/s modelled for N
  stages at link delay t1: ms/token = (R + L*t1) / tau, with L = N links per round (the savings
  formula `dsd bench` checks on real testnets, docs/bench.md) and R one round's compute, the median
  over every generation of the sweep (the rule does not change a round's work: same tree, same
  passes; one median keeps the machine's noise out of the comparison);
- quality (dsd_node.ops.bench.quality): the target's mean log-probability of the generated text
  against greedy's on the same prompts (delta, nats/token) and its perplexity ratio exp(-delta); the
  mean regret (log p of each generated token minus the target's top log p there) and exp(-regret);
  the share of tokens equal to greedy's at the same position, and the common prefix.

With --testnet every setting is also timed through a real N-stage testnet at t1 (processes on 127.0.0.1 behind
the link emulator, head + drafter + stage 0 in one process, as `dsd bench` runs them), the settings interleaved
prompt by prompt: the measured tokens/s beside the modelled ones.

The bound is on the regret ratio (local, 1.0 for greedy, grows with every relaxed token); the
sequence-level perplexity ratio is reported beside it but is not monotone in the margins (a lossy
text can be likelier than greedy's) and swings with the prompt set. Each run names the fastest
setting within QUALITY_BOUND; the defaults (dsd_node.engine.verify) are discussed in docs/bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.local import LocalEngine
from dsd_node.engine.verify import DEFAULT_ADAPTIVE_MARGIN, DEFAULT_ADAPTIVE_TIE_MARGIN, SamplingParams
from dsd_node.net.client import DsdClient
from dsd_node.ops import testnet
from dsd_node.ops.bench.plan import BenchConfig, load_prompts
from dsd_node.ops.bench.quality import ContinuationScorer, QualityGap
from dsd_node.ops.bench.run import testnet_specs

QUALITY_BOUND = 1.10  # most regret ratio (exp of minus the mean regret, nats/token) a chosen setting may have
SETTINGS = [(0.0, 0.0), (0.0, 0.005), (0.0, 0.01), (0.0, 0.02), (0.0, 0.05), (0.05, 0.005),
            (0.05, 0.01), (0.1, 0.01), (0.15, 0.02), (0.3, 0.05), (0.5, 0.1)]


@dataclass
class AdaptiveRow:
    adaptive_margin: float | None  # None: plain greedy (the reference)
    adaptive_tie_margin: float | None
    tokens_per_round: float
    ms_per_token: float  # in this process, t1 = 0
    modelled_tokens_per_s: float  # N stages at t1 (compute + L*t1/tau)
    speedup: float  # modelled tokens/s over greedy's (= tau over greedy's: the same round time)
    agreement_pct: float
    mean_common_prefix: float
    mean_logprob: float
    delta_logprob: float
    ppl_ratio: float
    mean_regret: float
    regret_ratio: float
    within_bound: bool
    measured_tokens_per_s: float | None = None  # --testnet: through N real stages at t1
    measured_tokens_per_round: float | None = None

    @property
    def label(self) -> str:
        return "greedy" if self.adaptive_margin is None else f"{self.adaptive_margin:g} / {self.adaptive_tie_margin:g}"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def choose(rows: list[AdaptiveRow]) -> AdaptiveRow | None:
    """The fastest adaptive setting within the quality bound (None if none is)."""
    ok = [r for r in rows if r.adaptive_margin is not None and r.within_bound]
    return max(ok, key=lambda r: (r.tokens_per_round, -r.ppl_ratio)) if ok else None


def run(prompts: list[tuple[str, str]], max_new: int, draft_k: int, stages: int, t1_ms: float,
        bound: float = QUALITY_BOUND, settings=SETTINGS) -> list[AdaptiveRow]:
    eng = LocalEngine(stages=stages, threads=1)
    scorer = ContinuationScorer()
    ids = {pid: eng.encode(text) for pid, text in prompts}
    base = GenerationConfig(max_new_tokens=max_new, draft_k=draft_k, ignore_eos=True)
    eng.generate(ids[prompts[0][0]], base)  # warm-up

    links = stages  # head beside stage 0: N-1 links between stages and the verdict's return

    per_round: list[float] = []  # ms of one round, per generation, over the whole sweep

    def sweep(sampling: SamplingParams | None):
        out, wall, tokens, rounds = {}, 0.0, 0, 0
        for pid, _ in prompts:
            cfg = GenerationConfig(**{**base.__dict__, "sampling": sampling or SamplingParams()})
            t0 = time.perf_counter()
            r = eng.generate(ids[pid], cfg)
            wall += time.perf_counter() - t0
            per_round.append(r.stats.wall_ms / r.stats.rounds)
            out[pid] = r.tokens
            tokens += len(r.tokens)
            rounds += r.stats.rounds
        return out, 1e3 * wall / tokens, tokens / rounds

    def modelled(tau: float) -> float:
        return 1e3 * tau / (statistics.median(per_round) + links * t1_ms)

    greedy, g_ms, g_tau = sweep(None)
    g_mean = sum(scorer.score(ids[p], greedy[p])[0] for p in greedy) / len(greedy)
    rows = [AdaptiveRow(None, None, round(g_tau, 3), round(g_ms, 2), 0.0, 1.0, 100.0,
                        float(max_new), round(g_mean, 4), 0.0, 1.0, 0.0, 1.0, True)]
    for margin, tie in settings:
        got, ms, tau = sweep(SamplingParams.create(adaptive=True, adaptive_margin=margin, adaptive_tie_margin=tie))
        same = sum(sum(x == y for x, y in zip(got[p], greedy[p], strict=False)) for p in got)
        total = sum(len(t) for t in got.values())
        scores = [scorer.score(ids[p], got[p]) for p in got]
        gap = QualityGap(sum(s[0] for s in scores) / len(scores), g_mean, sum(s[1] for s in scores) / len(scores))
        prefix = sum(common_prefix(got[p], greedy[p]) for p in got) / len(got)
        rows.append(AdaptiveRow(margin, tie, round(tau, 3), round(ms, 2), 0.0, round(tau / g_tau, 3),
                                round(100 * same / total, 1), round(prefix, 1), round(gap.mean_logprob, 4),
                                round(gap.delta, 4), round(gap.ppl_ratio, 4), round(gap.mean_regret, 4),
                                round(gap.regret_ratio, 4), gap.regret_ratio <= bound))
        r = rows[-1]
        print(f"  margin {margin:4.2f} tie {tie:5.3f}: tau {r.tokens_per_round:.2f}, x{r.speedup:.2f} tokens/s, "
              f"{r.agreement_pct:5.1f}% equal to greedy, perplexity x{r.ppl_ratio:.3f}, regret x{r.regret_ratio:.3f}",
              file=sys.stderr, flush=True)
    for r in rows:  # the modelled speed, once every round of the sweep has been timed
        r.modelled_tokens_per_s = round(modelled(r.tokens_per_round), 2)
    return rows


async def time_on_testnet(rows: list[AdaptiveRow], prompt_ids: list[list[int]], max_new: int, draft_k: int,
                          stages: int, t1_ms: float, log_dir: Path) -> None:
    """Fill each row's measured tokens/s and tau: every setting generates from every prompt through a real testnet
    (settings interleaved prompt by prompt, after one warm-up generation)."""
    def config(r: AdaptiveRow) -> GenerationConfig:
        s = SamplingParams() if r.adaptive_margin is None else SamplingParams.create(
            adaptive=True, adaptive_margin=r.adaptive_margin, adaptive_tie_margin=r.adaptive_tie_margin)
        return GenerationConfig(max_new_tokens=max_new, draft_k=draft_k, ignore_eos=True, sampling=s)

    net = testnet.Testnet(testnet_specs(BenchConfig(), stages, t1_ms, "embedded"), log_dir=log_dir)
    print(f"  timing {len(rows)} settings x {len(prompt_ids)} prompts through a testnet: N={stages}, "
          f"t1={t1_ms:g} ms (logs in {log_dir})", file=sys.stderr, flush=True)
    wall = {id(r): 0.0 for r in rows}
    tokens, rounds = dict.fromkeys(wall, 0), dict.fromkeys(wall, 0)
    try:
        await net.up()
        async with DsdClient(net.gateway, timeout_s=600) as client:
            await client.generate(max(prompt_ids, key=len), config(rows[0]))  # warm-up
            for i, ids in enumerate(prompt_ids):
                for r in rows if i % 2 == 0 else rows[::-1]:
                    stats = (await client.generate(ids, config(r))).stats
                    wall[id(r)] += stats.wall_ms
                    tokens[id(r)] += stats.new_tokens
                    rounds[id(r)] += len(stats.accepted_per_round)
                print(f"  prompt {i + 1}/{len(prompt_ids)} timed", file=sys.stderr, flush=True)
    finally:
        net.down()
    for r in rows:
        r.measured_tokens_per_s = round(1e3 * tokens[id(r)] / wall[id(r)], 2)
        r.measured_tokens_per_round = round(tokens[id(r)] / max(1, rounds[id(r)]), 3)


def table_lines(rows: list[AdaptiveRow], stages: int, t1_ms: float, bound: float) -> list[str]:
    chosen = choose(rows)
    timed = rows[0].measured_tokens_per_s is not None
    lines = [f"| margin / tie margin | tau | tokens/s at N={stages}, t1={t1_ms:g} ms (modelled) | "
             + (f"tokens/s through a testnet N={stages}, t1={t1_ms:g} ms (measured; tau) | " if timed else "")
             + "vs greedy | mean log p | delta (nats/tok) | perplexity vs greedy | regret (nats/tok) | regret ratio | "
             "equal to greedy | common prefix |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if timed else "")]
    for r in rows:
        mark = " (default)" if (r.adaptive_margin, r.adaptive_tie_margin) == (
            DEFAULT_ADAPTIVE_MARGIN, DEFAULT_ADAPTIVE_TIE_MARGIN) else ""
        mark += " (chosen)" if r is chosen else ""
        mark += "" if r.within_bound else f" (> {bound:g}x)"
        measured = (f" {r.measured_tokens_per_s:.1f} ({r.measured_tokens_per_s / rows[0].measured_tokens_per_s:.2f}x; "
                    f"{r.measured_tokens_per_round:.2f}) |" if timed else "")
        lines.append(f"| {r.label}{mark} | {r.tokens_per_round:.2f} | {r.modelled_tokens_per_s:.1f} |{measured} {r.speedup:.2f}x | {r.mean_logprob:.3f} | {r.delta_logprob:+.3f} | "
                     f"{r.ppl_ratio:.3f}x | {r.mean_regret:+.3f} | {r.regret_ratio:.3f}x | {r.agreement_pct:.1f}% | "
                     f"{r.mean_common_prefix:.1f} |")
    return lines


def _settings(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        margin, _, tie = item.partition(":")
        out.append((float(margin), float(tie or 0)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsd_node.ops.bench.adaptive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="HumanEval prompts, a seeded subset (8)")
    ap.add_argument("--prompt-set", choices=["humaneval", "builtin"], default="humaneval")
    ap.add_argument("--seed", type=int, default=0, help="prompt subset seed (0)")
    ap.add_argument("--settings", type=_settings, default=SETTINGS,
                    help="MARGIN:TIE,... the adaptive settings to sweep (default: the 11 of the committed table)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--draft-k", type=int, default=4)
    ap.add_argument("--stages", type=int, default=4, help="in-process shards, and N of the modelled speed (4)")
    ap.add_argument("--t1", type=float, default=25.0, dest="t1_ms", help="link delay of the modelled speed (25 ms)")
    ap.add_argument("--bound", type=float, default=QUALITY_BOUND,
                    help=f"quality bound: most regret ratio a chosen setting may have ({QUALITY_BOUND})")
    ap.add_argument("--testnet", action="store_true",
                    help="also time every setting through a real testnet of --stages stages at --t1 (a few minutes)")
    ap.add_argument("--out", type=Path, default=Path("results/adaptive"))
    args = ap.parse_args(argv)
    prompts = load_prompts(BenchConfig(prompts=args.prompts, prompt_set=args.prompt_set, seed=args.seed))
    t0 = time.perf_counter()
    rows = run(prompts, args.max_new_tokens, args.draft_k, args.stages, args.t1_ms, args.bound, args.settings)
    if args.testnet:
        from dsd_node.engine.models import load_tokenizer

        tok = load_tokenizer(BenchConfig().model)
        asyncio.run(time_on_testnet(rows, [tok(text)["input_ids"] for _, text in prompts], args.max_new_tokens,
                                    args.draft_k, args.stages, args.t1_ms, args.out / "logs"))
    lines = table_lines(rows, args.stages, args.t1_ms, args.bound)
    chosen = choose(rows)
    summary = (f"chosen (fastest with a regret ratio within x{args.bound:g}): "
               + (f"--adaptive-margin {chosen.adaptive_margin:g} --adaptive-tie-margin {chosen.adaptive_tie_margin:g}"
                  if chosen else "none"))
    print("\n".join(lines) + "\n\n" + summary)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"prompts": [pid for pid, _ in prompts], "seed": args.seed, "max_new_tokens": args.max_new_tokens, "draft_k": args.draft_k,
            "stages": args.stages, "t1_ms": args.t1_ms, "bound": args.bound, "wall_s": round(time.perf_counter() - t0),
            "defaults_at_run": [DEFAULT_ADAPTIVE_MARGIN, DEFAULT_ADAPTIVE_TIE_MARGIN], "drafter": "embedded:drafter",
            "chosen": [chosen.adaptive_margin, chosen.adaptive_tie_margin] if chosen else None,
            "testnet": args.testnet}
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    (args.out / "results.md").write_text(
        f"# Adaptive verification: speed against quality\n\n`python -m dsd_node.ops.bench.adaptive` "
        f"({len(prompts)} {args.prompt_set} prompts, {args.max_new_tokens} tokens, k={args.draft_k}, greedy, "
        f"ignore_eos; in one process with {args.stages} shards; tokens/s modelled for N={args.stages}, "
        f"t1={args.t1_ms:g} ms as tau / (R + N*t1), R one round's median compute"
        + ("; and measured through a real testnet of the same N and t1" if args.testnet else "") + ")\n\n" + "\n".join(lines) + f"\n\n{summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
