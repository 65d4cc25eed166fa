"""Where a round's time goes: `python -m dsd_node.ops.bench.hop_profile`.

Starts N-stage testnets at t1 = 0 (head, drafter and stage 0 in one process, as in `dsd bench`), one with
direct loopback links and one behind the zero-delay link emulator, with DSD_HOP_TRACE set so that every node
process notes per-round timestamps (dsd_node.engine.hop_trace). Generations run interleaved with Hugging Face
`generate` in this process; the marks of the timed generations are joined into one timeline per round and
split into phases per hop: transport (gRPC write to the next process's reader, through the emulator where
there is one), protobuf <-> Python decode, queueing, the thread hop to the forward, checks, KV commits, mask
and positions, the shard's forward, verification, encode and write, and the head's own work between a verdict
and the next round. `--compare-with DIR` adds a testnet running the code tree DIR (e.g. an older commit's
`git archive`), timed side by side. Prints the tables and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.hop_trace import ENV
from dsd_node.net.client import DsdClient
from dsd_node.ops import testnet
from dsd_node.ops.bench.plan import BUILTIN_PROMPTS

# phase name -> (event it starts after, event it ends at), within one process's part of a round
STAGE_PHASES = [("decode", "recv", "decoded"), ("queue", "decoded", "dequeued"), ("thread in", "dequeued", "handle"),
                ("check", "handle", "checked"), ("kv commit", "checked", "committed"), ("mask+kv", "committed", "mask"),
                ("forward", "mask", "forward"), ("verify", "forward", "verified"),
                ("encode", "handled", "encoded")]
HEAD_PHASES = [("head encode", "send", "encoded"), ("verdict wake", "verdict_in", "verdict")]
CATEGORIES = {  # summary rows: phases summed over every hop of a round
    "transport (write to the next reader: gRPC, wake-ups, relay)": ["transport"],
    "protobuf <-> Python (decode, encode)": ["decode", "encode", "head encode"],
    "queue + thread hops": ["queue", "thread in", "thread out", "verdict wake"],
    "checks": ["check"],
    "KV commit": ["kv commit"],
    "mask, positions, KV begin": ["mask+kv"],
    "shard forward": ["forward"],
    "verify": ["verify"],
    "head's own work (commit, stream, draft)": ["head work"],
}


@dataclass
class Variant:
    name: str
    emulator: bool
    tree: str | None = None  # PYTHONPATH of the node processes (None: this tree)
    net: testnet.Testnet | None = None
    client: DsdClient | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)  # mode -> ms/token
    cpu: dict[str, list[float]] = field(default_factory=dict)  # mode -> CPU ms/token, all node processes
    windows: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # mode -> timed perf_counter spans


def _cpu_ms(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total * 1e3 / ticks


def load_events(folder: Path) -> dict[tuple[str, int], list[dict]]:
    rounds: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for f in folder.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            rounds[(e["sid"], e["rid"])].append(e)
    return rounds


def round_phases(events: list[dict], stages: list[str]) -> dict[str, list[float]] | None:
    """Per-hop phase durations (ms) of one round: {phase: [hop 0 .. hop N]} (hop N: the verdict's return)."""
    at: dict[tuple[str, str], float] = {}
    for e in events:
        at.setdefault((e["where"], e["ev"]), e["t"])
    need = [("head", "send"), ("head", "encoded"), ("head", "verdict_in"), ("head", "verdict")]
    if any(k not in at for k in need) or any((s, "encoded") not in at for s in stages):
        return None  # a commit-only message, or a round of a warm-up / another variant
    out: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(stages) + 1))

    def span(where: str, a: str, b: str) -> float:
        return (at[(where, b)] - at[(where, a)]) * 1e3 if (where, a) in at and (where, b) in at else 0.0

    prev = ("head", "encoded")  # a transport starts where the sender's write starts
    for i, s in enumerate(stages):
        out["transport"][i] = (at[(s, "recv")] - at[prev]) * 1e3
        for name, a, b in STAGE_PHASES:
            out[name][i] = span(s, a, b)
        last = "verified" if (s, "verified") in at else "forward"
        out["thread out"][i] = span(s, last, "handled")
        prev = (s, "encoded")
    out["transport"][len(stages)] = (at[("head", "verdict_in")] - at[prev]) * 1e3
    for name, a, b in HEAD_PHASES:
        out[name][0 if name != "verdict wake" else len(stages)] = span("head", a, b)
    out["round"][0] = (at[("head", "verdict")] - at[("head", "send")]) * 1e3
    return out


def breakdown(folder: Path, windows: list[tuple[float, float]], n_stages: int) -> dict | None:
    """Median per-hop phases over the rounds whose send lies in a timed window; the head's work between rounds."""
    rounds = load_events(folder)
    stages = sorted({e["where"] for evs in rounds.values() for e in evs if e["where"] != "head"},
                    key=lambda w: int(w[5:].split(":")[0]))
    if len(stages) != n_stages:
        return None
    by_sid: dict[str, list[tuple[int, list[dict]]]] = defaultdict(list)
    for (sid, rid), evs in rounds.items():
        by_sid[sid].append((rid, evs))
    per: dict[str, list[list[float]]] = defaultdict(list)
    for rs in by_sid.values():
        rs.sort()
        prev_verdict = None
        for rid, evs in rs:
            sent = next((e["t"] for e in evs if e["where"] == "head" and e["ev"] == "send"), None)
            ph = round_phases(evs, stages)
            if ph is not None and sent is not None and any(a <= sent <= b for a, b in windows):
                ph["head work"][0] = (sent - prev_verdict) * 1e3 if prev_verdict is not None and rid > 1 else 0.0
                if rid > 1:  # round 0 is the prompt, round 1 follows the prompt's long pass
                    for name, hops in ph.items():
                        per[name].append(hops)
            prev_verdict = next((e["t"] for e in evs if e["where"] == "head" and e["ev"] == "verdict"), prev_verdict)
    if not per:
        return None
    hops = {name: [round(statistics.mean(r[i] for r in rows), 3) for i in range(n_stages + 1)]
            for name, rows in per.items()}
    totals = {name: round(sum(v), 3) for name, v in hops.items()}
    summary = {cat: round(sum(totals.get(p, 0.0) for p in phases), 3) for cat, phases in CATEGORIES.items()}
    summary["round trip + head work"] = round(totals["round"] + totals.get("head work", 0.0), 3)
    return {"rounds": len(per["round"]), "stages": stages, "per_hop_ms": hops, "summary_ms": summary}


async def _run(args, variants: list[Variant], prompt_ids: list[list[int]], hf_model) -> list[float]:
    from dsd_node.ops.bench.run import hf_generate_ms_per_token
    modes = args.modes.split(",")
    ups = []
    for v in variants:
        specs = testnet.plan(args.stages, colocate=True, threads=args.threads,
                             drafter="embedded:drafter" if modes != ["ar"] else None)
        trace = args.out / "trace" / v.name
        trace.mkdir(parents=True, exist_ok=True)
        for s in specs:
            s.env[ENV] = str(trace)
            if v.tree:  # that tree's code, not the working directory's (`python -m` puts the cwd first)
                s.env.update({"PYTHONPATH": v.tree, "PYTHONSAFEPATH": "1"})
            if v.emulator:
                s.env.update({"DSD_LINK_EMULATOR": "1", "DSD_LINK_DELAY_MS": "0"})
        v.net = testnet.Testnet(specs, log_dir=args.out / "logs" / v.name)
        ups.append(v.net.up())
    await asyncio.gather(*ups)
    hf: list[float] = []
    for v in variants:
        v.client = DsdClient(v.net.gateway, timeout_s=600)
    for mode in modes:  # warm-up: one full generation per mode and testnet
        for v in variants:
            await v.client.generate(max(prompt_ids, key=len), _cfg(args, mode))
    turn = 0
    for _ in range(args.repeats):
        for ids in prompt_ids:
            hf.append(hf_generate_ms_per_token(hf_model, ids, args.tokens, {}))
            for mode in modes:
                for v in variants if turn % 2 == 0 else variants[::-1]:
                    pids = [p.pid for p in v.net.procs.values()]
                    cpu0, t0 = _cpu_ms(pids), time.perf_counter()
                    stats = (await v.client.generate(ids, _cfg(args, mode))).as_dict()["stats"]
                    v.windows.setdefault(mode, []).append((t0, time.perf_counter()))
                    v.runs.setdefault(mode, []).append(stats["wall_ms"] / max(1, stats["new_tokens"]))
                    v.cpu.setdefault(mode, []).append((_cpu_ms(pids) - cpu0) / max(1, stats["new_tokens"]))
                turn += 1
    for v in variants:
        await v.client.close()
    await asyncio.sleep(0.5)  # the stages flush their marks as their streams end
    return hf


def _cfg(args, mode: str) -> GenerationConfig:
    return GenerationConfig(mode=mode, max_new_tokens=args.tokens, draft_k=args.k, ignore_eos=True)


def format_tables(result: dict) -> str:
    lines = [f"HF generate: {result['hf_ms_per_token']:.2f} ms/token (median)", "",
             "| variant | mode | ms/token | / HF generate | CPU ms/token (all nodes) |", "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        for mode, r in v["modes"].items():
            lines.append(f"| {name} | {mode} | {r['ms_per_token']:.2f} | {r['vs_hf']:.2f}x | {r['cpu_ms_per_token']:.2f} |")
    modes = dict.fromkeys(m for v in result["variants"].values() for m in v["modes"])
    for mode in modes:  # the variants side by side, one column each
        traced = {n: v["breakdown"][mode] for n, v in result["variants"].items() if v["breakdown"].get(mode)}
        if len(traced) > 1:
            cats = next(iter(traced.values()))["summary_ms"]
            lines += ["", f"{mode}: ms per round, side by side", "",
                      "| cost | " + " | ".join(traced) + " |", "|---" * (len(traced) + 1) + "|"]
            lines += [f"| {c} | " + " | ".join(f"{b['summary_ms'][c]:.3f}" for b in traced.values()) + " |" for c in cats]
    for name, v in result["variants"].items():
        for mode, b in v.get("breakdown", {}).items():
            if b is None:
                continue
            lines += ["", f"{name}, {mode}: ms per round ({b['rounds']} rounds; mean over rounds)", "",
                      "| cost | ms per round |", "|---|---|"]
            lines += [f"| {cat} | {ms:.3f} |" for cat, ms in b["summary_ms"].items()]
            ends = ["head", *b["stages"], "head"]
            hops = [f"{a}->{b2}" for a, b2 in zip(ends, ends[1:], strict=False)]
            lines += ["", "| phase | " + " | ".join(hops) + " |", "|---" * (len(hops) + 1) + "|"]
            for phase, vals in b["per_hop_ms"].items():
                if phase != "round" and any(vals):
                    lines.append(f"| {phase} | " + " | ".join(f"{x:.3f}" for x in vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsd_node.ops.bench.hop_profile", description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--modes", default="ar,si", help="ar, si (ar,si)")
    ap.add_argument("--k", type=int, default=4, help="draft depth of si (4)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per generation (48)")
    ap.add_argument("--prompts", type=int, default=2, help="built-in prompts (2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per node and for HF (1)")
    ap.add_argument("--variants", default="direct,emulator", help="direct, emulator (both)")
    ap.add_argument("--compare-with", action="append", default=[], metavar="NAME=DIR",
                    help="also time a direct testnet running the code tree DIR (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("results") / f"hop-profile-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from dsd_node.engine.models import load_tokenizer, resolve_model_path
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [Variant(n, n == "emulator") for n in args.variants.split(",") if n]
    for spec in args.compare_with:
        name, _, tree = spec.partition("=")
        variants.append(Variant(name, False, str(Path(tree).resolve())))
    tok = load_tokenizer("embedded:target")
    prompt_ids = [tok(p)["input_ids"] for p in BUILTIN_PROMPTS[: args.prompts]]
    torch.set_num_threads(args.threads)
    hf_model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:target"), dtype=torch.float32).eval()
    try:
        hf = asyncio.run(_run(args, variants, prompt_ids, hf_model))
    finally:
        for v in variants:
            if v.net is not None:
                v.net.down()
    hf_ms = statistics.median(hf)
    result = {"stages": args.stages, "tokens": args.tokens, "k": args.k, "prompts": args.prompts,
              "repeats": args.repeats, "loadavg": list(os.getloadavg()), "hf_ms_per_token": round(hf_ms, 3),
              "hf_runs": [round(x, 3) for x in hf], "variants": {}}
    for v in variants:
        modes = {m: {"ms_per_token": round(statistics.median(r), 3), "vs_hf": round(statistics.median(r) / hf_ms, 3),
                     "cpu_ms_per_token": round(statistics.median(v.cpu[m]), 3), "runs": [round(x, 2) for x in r]}
                 for m, r in v.runs.items()}
        bd = {m: breakdown(args.out / "trace" / v.name, v.windows[m], args.stages) for m in v.runs}
        result["variants"][v.name] = {"tree": v.tree or "this", "emulator": v.emulator, "modes": modes, "breakdown": bd}
    text = format_tables(result)
    print(text)
    (args.out / "hop_profile.json").write_text(json.dumps(result, indent=1))
    (args.out / "hop_profile.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
