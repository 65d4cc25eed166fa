"""What output verification costs and what it catches, through real node processes on 127.0.0.1.

    python tools/trust_bench.py                     # both parts; table on stdout, JSON in docs/results/trust/
    python tools/trust_bench.py --part overhead     # or --part detection

One shard (all 8 layers of the embedded target) served by 2 honest replicas over TLS links, found through
discovery, and one head per verification setting, all in one network so that the settings are measured side
by side (each prompt goes to every head in turn; ratios, the machine is noisy):

- overhead: heads with --verify-fraction 0, 0.05, 0.25 and 1; tokens/s of greedy si generations, and the share
  of rounds each head re-ran on the other replica (from its /metrics: dsd_verification_rounds).
- detection: the same plus a rogue replica (tests/rogue_stage.py) that claims to be very fast, so every head
  routes through it, computes honestly until every head has vetted and vouched for it, then biases every
  verdict towards one token. Per head: the rounds that reached the client with the rogue's token
  before the head caught it, and when it banned the rogue. A cheating round is caught exactly when it is
  checked (replays are deterministic), so the detection rate per cheating round is the share of rounds checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.models import load_tokenizer
from dsd_node.net.client import DsdClient
from dsd_node.net.grpc_util import wait_healthy
from dsd_node.ops.http_bench import PROMPTS
from dsd_node.ops.testnet import NodeSpec, Testnet, Trust, free_port, plan_discovery

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = (0.0, 0.05, 0.25, 1.0)


def heads(head: NodeSpec, fractions: tuple[float, ...], key_dir: Path) -> list[NodeSpec]:
    """Copies of the planned head, one per verification fraction, each with its own address, identity and metrics."""
    out = []
    for f in fractions:
        args, name = list(head.args), f"head-f{f:g}"
        addr = f"127.0.0.1:{free_port()}"
        args[args.index("--listen") + 1] = addr
        args[args.index("--identity") + 1] = str(key_dir / f"{name}.key")
        args[args.index("--listen-p2p") + 1] = f"/ip4/127.0.0.1/tcp/{free_port()}"
        args += ["--verify-fraction", f"{f:g}", "--metrics", f"127.0.0.1:{free_port()}"]
        out.append(NodeSpec(name, args, addr))
    return out


def verification(spec: NodeSpec) -> dict[str, float]:
    """A head's dsd_verification_rounds by result, and dsd_banned_peers, from its /metrics."""
    url = f"http://{spec.args[spec.args.index('--metrics') + 1]}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "dsd_verification_rounds_total":
                out[s.labels["result"]] = s.value
            elif s.name == "dsd_banned_peers":
                out["banned"] = s.value
    return out


async def generate(spec: NodeSpec, prompt: str, tokens: int) -> tuple[list[int], float]:
    async with DsdClient(spec.address) as c:
        t0 = time.perf_counter()
        r = await c.generate(prompt, GenerationConfig(mode="si", max_new_tokens=tokens, ignore_eos=True))
        return r.tokens, time.perf_counter() - t0


async def overhead(args, key_dir: Path, log_dir: Path) -> list[dict]:
    specs = plan_discovery(1, replicas=2, key_dir=key_dir, trust=Trust(tls=True), bootstraps=1)
    hs = heads(specs[-1], FRACTIONS, key_dir)
    net = Testnet([*specs[:-1], *hs], log_dir=log_dir / "overhead")
    rows = {h.name: {"fraction": float(h.args[h.args.index("--verify-fraction") + 1]), "tokens": 0, "seconds": 0.0}
            for h in hs}
    try:
        await net.up(progress=lambda m: print(m, file=sys.stderr), timeout_s=600)
        for h in hs:  # warm-up, and the vetting of the replicas (first rounds) before anything is timed
            await generate(h, PROMPTS[0], 8)
        for rep in range(args.repeats):
            for p in PROMPTS[: args.prompts]:
                for h in hs:
                    toks, s = await generate(h, p, args.tokens)
                    rows[h.name]["tokens"] += len(toks)
                    rows[h.name]["seconds"] += s
            print(f"overhead: pass {rep + 1}/{args.repeats} done", file=sys.stderr)
        out = []
        for h in hs:
            r, v = rows[h.name], verification(h)
            rounds = sum(v.get(k, 0.0) for k in ("skipped", "agree", "mismatch", "unverifiable"))
            checked = rounds - v.get("skipped", 0.0)
            out.append({**r, "tokens_per_s": r["tokens"] / r["seconds"], "rounds": rounds, "checked": checked,
                        "checked_share": checked / rounds if rounds else 0.0, "mismatches": v.get("mismatch", 0.0)})
        base = out[0]["tokens_per_s"]
        for r in out:
            r["speed_vs_off"] = r["tokens_per_s"] / base
        return out
    finally:
        net.down()


async def detection(args, key_dir: Path, log_dir: Path, hack: int) -> list[dict]:
    specs = plan_discovery(1, replicas=2, key_dir=key_dir, trust=Trust(tls=True), bootstraps=1)
    hs = heads(specs[-1], FRACTIONS[1:], key_dir)
    honest = next(s for s in specs if s.name == "stage0r0")
    rogue_args = list(honest.args)
    rogue_addr = f"127.0.0.1:{free_port()}"
    rogue_args[rogue_args.index("--listen") + 1] = rogue_addr
    rogue_args[rogue_args.index("--identity") + 1] = str(key_dir / "rogue.key")
    rogue_args[rogue_args.index("--listen-p2p") + 1] = f"/ip4/127.0.0.1/tcp/{free_port()}"
    boot, net = Testnet(specs[:1], log_dir=log_dir / "detection"), Testnet([*specs[1:-1], *hs], log_dir=log_dir / "detection")
    (log_dir / "detection").mkdir(parents=True, exist_ok=True)
    rogue_log = open(log_dir / "detection" / "rogue.log", "w")  # noqa: SIM115 (owned by the child)
    rogue = None
    try:
        await boot.up()
        flag = key_dir / "cheat-now"
        rogue = subprocess.Popen([sys.executable, str(ROOT / "tests" / "rogue_stage.py"), str(hack), *rogue_args],
                                 stdout=rogue_log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "DSD_ROGUE_FLAG": str(flag)})
        await wait_healthy(rogue_addr, 180, tls=True)
        await net.up(progress=lambda m: print(m, file=sys.stderr), timeout_s=600)
        for h in hs:  # vetting while the rogue is honest: every head vouches for it
            await generate(h, PROMPTS[0], 8)
        flag.touch()  # from now on the rogue biases every verdict
        out = []
        for h in hs:
            f = float(h.args[h.args.index("--verify-fraction") + 1])
            escaped, gens, t0 = 0, 0, time.monotonic()
            while gens < args.max_generations and not verification(h).get("banned"):
                toks, _ = await generate(h, PROMPTS[gens % len(PROMPTS)], args.tokens)
                escaped += sum(t == hack for t in toks)
                gens += 1
            v = verification(h)
            out.append({"fraction": f, "banned": bool(v.get("banned")), "generations": gens,
                        "rogue_tokens_delivered": escaped, "mismatches": v.get("mismatch", 0.0),
                        "expected_escaped_rounds": (1 - f) / f, "seconds": time.monotonic() - t0})
            print(f"detection: F={f:g}: banned={out[-1]['banned']} after {escaped} rogue tokens reached the client",
                  file=sys.stderr)
        return out
    finally:
        net.down()
        boot.down()
        if rogue is not None:
            rogue.kill()
        rogue_log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="trust_bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=["overhead", "detection", "both"], default="both")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per generation (default 32)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per pass (default 4)")
    ap.add_argument("--repeats", type=int, default=2, help="overhead: passes over the prompts (default 2)")
    ap.add_argument("--max-generations", type=int, default=30, help="detection: per head, at most (default 30)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "trust"), help="where results.json goes")
    args = ap.parse_args(argv)
    hack = load_tokenizer("embedded:target")(" HACKED")["input_ids"][-1]
    key_dir = Path(tempfile.mkdtemp(prefix="dsd-trust-bench-"))
    log_dir = key_dir / "logs"
    result: dict[str, list[dict]] = {}
    if args.part in ("overhead", "both"):
        result["overhead"] = asyncio.run(overhead(args, key_dir, log_dir))
        print("\nverify-fraction | tokens/s | vs off | rounds | checked (share)")
        for r in result["overhead"]:
            print(f"{r['fraction']:>15g} | {r['tokens_per_s']:8.1f} | {r['speed_vs_off']:6.2f} | {r['rounds']:6.0f} | "
                  f"{r['checked']:.0f} ({r['checked_share']:.3f})")
    if args.part in ("detection", "both"):
        result["detection"] = asyncio.run(detection(args, key_dir, log_dir, hack))
        print("\nverify-fraction | banned | generations | rogue tokens delivered | expected escaped rounds (1-F)/F")
        for r in result["detection"]:
            print(f"{r['fraction']:>15g} | {str(r['banned']):6} | {r['generations']:11d} | "
                  f"{r['rogue_tokens_delivered']:22d} | {r['expected_escaped_rounds']:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out / 'results.json'} (logs in {log_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
