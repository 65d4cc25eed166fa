"""Load on the OpenAI-compatible HTTP API: concurrent streaming clients (the official `openai` package) per mode and
concurrency level, with time to first token, inter-token latency and tokens/s, as a table and as JSON.

    python -m dsd_node.ops.http_bench --stages 4 --link-delay-ms 25          # starts its own testnet
    python -m dsd_node.ops.http_bench --url http://127.0.0.1:8000/v1          # an endpoint already running

Every request streams `--max-tokens` tokens greedily with `ignore_eos` (all the same length); each client sends
`--requests` requests one after another. TTFT: request sent to its first text; ITL: (last text - first text) /
(tokens - 1) per request; tokens/s: all tokens of a level over its wall time.
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

from dsd_node.ops.generation_flags import DEFAULT_PROMPT

PROMPTS = [DEFAULT_PROMPT, "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n",
           "for i in range(10):\n    if i % 2 == 0:\n", "# Parse the command line arguments\n"]


@dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p90: float
    itl_ms_p50: float
    itl_ms_p90: float
    tau: float


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


async def _one(client, model: str, prompt: str, mode: str, max_tokens: int) -> tuple[float, float, int, float]:
    """One streamed request: (ttft s, itl s, tokens, tau)."""
    t0 = time.perf_counter()
    first = last = None
    tokens, tau = 0, 0.0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"mode": mode, "ignore_eos": True})
    async for ch in stream:
        if ch.choices and ch.choices[0].text:
            now = time.perf_counter()
            first = first or now
            last = now
        if ch.choices and ch.choices[0].finish_reason:
            tau = (ch.model_extra or {}).get("dsd", {}).get("tau", 0.0)
        if ch.usage:
            tokens = ch.usage.completion_tokens
    first = first or time.perf_counter()
    return first - t0, ((last or first) - first) / max(1, tokens - 1), tokens, tau


async def run_level(url: str, key: str, model: str, mode: str, concurrency: int, requests: int,
                    max_tokens: int) -> Level:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key=key or "none", max_retries=0, timeout=600) as client:
        await _one(client, model, PROMPTS[0], mode, 4)  # warm-up (first calls pay for connections and allocation)

        async def worker(w: int) -> list[tuple[float, float, int, float]]:
            return [await _one(client, model, PROMPTS[(w + i) % len(PROMPTS)], mode, max_tokens) for i in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    ttft, itl = [r[0] * 1e3 for r in results], [r[1] * 1e3 for r in results]
    tokens = sum(r[2] for r in results)
    return Level(mode, concurrency, len(results), tokens, round(wall, 2), round(tokens / wall, 2),
                 round(_pct(ttft, 0.5), 1), round(_pct(ttft, 0.9), 1), round(_pct(itl, 0.5), 1),
                 round(_pct(itl, 0.9), 1), round(statistics.mean(r[3] for r in results), 2))


def table(levels: list[Level]) -> str:
    rows = ["| mode | users | requests | tokens/s | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms | tau |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {x.mode} | {x.concurrency} | {x.requests} | {x.tokens_per_s} | {x.ttft_ms_p50} | {x.ttft_ms_p90} | "
             f"{x.itl_ms_p50} | {x.itl_ms_p90} | {x.tau} |" for x in levels]
    return "\n".join(rows)


async def bench(args: argparse.Namespace) -> list[Level]:
    levels = []
    for mode in args.modes.split(","):
        for c in (int(x) for x in args.concurrency.split(",")):
            lv = await run_level(args.url, args.api_key, args.model, mode, c, args.requests, args.max_tokens)
            print(f"{mode} x{c}: {lv.tokens_per_s} tokens/s, TTFT p50 {lv.ttft_ms_p50} ms, ITL p50 {lv.itl_ms_p50} ms",
                  file=sys.stderr, flush=True)
            levels.append(lv)
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsd_node.ops.http_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an OpenAI-compatible base URL (default: start a local testnet)")
    ap.add_argument("--api-key", default="", help="the endpoint's API key, if it has one")
    ap.add_argument("--model", default="embedded:target")
    ap.add_argument("--stages", type=int, default=4, help="own testnet: stage processes (default 4)")
    ap.add_argument("--link-delay-ms", type=float, default=0.0, help="own testnet: one-way delay into every node")
    ap.add_argument("--modes", default="ar,si,dsi")
    ap.add_argument("--concurrency", default="1,4,16", help="concurrent users per level (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=2, help="requests per user per level (default 2)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", dest="json_path", help="write the levels here as JSON")
    args = ap.parse_args(argv)
    net = None
    if args.url is None:
        from dsd_node.ops.testnet import Testnet, plan

        net = Testnet(plan(args.stages, args.model, link_delay_ms=args.link_delay_ms, http="auto",
                           extra=["--max-sessions", "128"]))
        print(f"starting a testnet: {args.stages} stages, {args.link_delay_ms:g} ms links (logs in {net.log_dir})",
              file=sys.stderr)
    try:
        if net is not None:
            asyncio.run(net.up())
            args.url = net.http_url
        levels = asyncio.run(bench(args))
    finally:
        if net is not None:
            net.down()
            net.remove_temp_dirs()
    print(table(levels))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"url": args.url, "stages": args.stages,
                                                    "link_delay_ms": args.link_delay_ms, "max_tokens": args.max_tokens,
                                                    "levels": [asdict(x) for x in levels]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
