"""The head's real si/dsi loop over a simulated pipeline: link delays and stage compute are timed sleeps.

`dsd bench --alpha-sweep` measures the whole system, but on a shared 2-core machine its dsi/si ratios move
by tens of percent with the load. This runs the same `Head` (the code that schedules rounds) against a
pipeline whose costs are set, not measured: N stages in a row, each a serial resource that spends
`stage_ms + node_ms * nodes` per round, a one-way delay t1 on each of the N links (the verdict's return
included), a drafter that spends `draft_ms` per drafted token, and a target that is a deterministic
next-token function with an oracle:ALPHA drafter (a coin per position, as dsd_node.engine.drafter's).
What it leaves out is what the machine adds: compute that competes for the same cores.

    python -m dsd_node.ops.bench.dsi_sim --t1 0,25 --alpha 0.5,0.6,0.7,0.8,0.9
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from dsd_node.engine.config import GenerationConfig, TreeShape
from dsd_node.engine.drafter import Draft, DraftRequest, _unit
from dsd_node.engine.head import Head
from dsd_node.engine.messages import RoundMsg, VerdictMsg
from dsd_node.engine.tree import TokenTree
from dsd_node.ops.bench.formula import dsi_over_si_bound, predicted_dsi_over_si

VOCAB = 1000


def target_next(seq: list[int]) -> int:
    return (sum(seq[-3:]) * 31 + len(seq) * 7 + 5) % VOCAB


@dataclass
class Costs:
    stages: int = 4
    t1_ms: float = 25.0
    stage_ms: float = 7.0  # per round and stage: the hop's fixed cost (measured ~2-9 ms on the 2-core machine)
    node_ms: float = 1.5  # per tree node and stage
    draft_ms: float = 11.0  # per drafted token (oracle:ALPHA drafts with the whole target: ~11 ms here)


class SimDrafter:
    def __init__(self, alpha: float, costs: Costs, seed: int):
        self.alpha, self.costs, self.seed = alpha, costs, seed

    async def draft(self, session_id: str, req: DraftRequest) -> Draft:
        await asyncio.sleep(self.costs.draft_ms * req.depth / 1e3)
        seq, tokens = list(req.context), []
        for _ in range(req.depth):
            right = target_next(seq)
            tok = right if _unit(self.seed, len(seq)) < self.alpha else (right + 1) % VOCAB
            tokens.append(tok)
            seq.append(tok)
        return Draft(TokenTree.chain(tokens), list(range(len(tokens))), self.costs.draft_ms * req.depth)


class SimPipeline:
    """Stages in a row (each one round at a time), links of t1, greedy verification at the last stage."""

    def __init__(self, costs: Costs):
        self.c = costs
        self.locks = [asyncio.Lock() for _ in range(costs.stages)]
        self.epochs = [0] * costs.stages
        self.verdicts: asyncio.Queue[VerdictMsg] = asyncio.Queue()
        self.text: list[int] = []
        self.trees: dict[int, TokenTree] = {}
        self.pending: dict[int, list[int]] = {}
        self.y: int | None = None
        self.tasks: set[asyncio.Task] = set()
        self.order = asyncio.Lock()

    async def send(self, msg: RoundMsg) -> None:
        t = asyncio.create_task(self._travel(msg))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        await asyncio.sleep(0)  # let it take its place in stage 0's queue before the next round

    async def recv(self) -> VerdictMsg:
        return await self.verdicts.get()

    async def _travel(self, msg: RoundMsg) -> None:
        c = self.c
        live = True
        for i, lock in enumerate(self.locks):
            if i:
                await asyncio.sleep(c.t1_ms / 1e3)
            async with lock:
                live = live and msg.epoch >= self.epochs[i]
                self.epochs[i] = max(self.epochs[i], msg.epoch)
                if live and msg.tree.tokens:
                    await asyncio.sleep((c.stage_ms + c.node_ms * len(msg.tree)) / 1e3)
                if i == len(self.locks) - 1:
                    v = self._verify(msg, live)
        if v is not None:
            await asyncio.sleep(c.t1_ms / 1e3)
            await self.verdicts.put(v)

    def _verify(self, msg: RoundMsg, live: bool) -> VerdictMsg | None:
        for rid, keep in msg.commits:
            self.pending.pop(rid, None)
            self.text += [self.trees[rid].tokens[i] for i in keep]
        self.trees = {rid: t for rid, t in self.trees.items() if rid in {b for b, _ in msg.base}}
        if not live or not msg.tree.tokens:
            return None
        tree = msg.tree
        self.trees[msg.round_id] = tree
        return scripted_verdict(self, msg, tree, target_next)


def scripted_verdict(p, msg: RoundMsg, tree: TokenTree, target: Callable[[list[int]], int]) -> VerdictMsg:
    """What a greedy target `target` (next token of a sequence) says of `tree`, for a scripted pipeline `p` that
    keeps `text` (committed), `trees` (live rounds), `pending` (round -> accepted path, not committed yet) and `y`
    (the last verdict's token): stale unless the round builds on exactly the pending rounds. Updates p.pending
    and p.y. Shared by this simulator and the fast head tests."""
    stale = VerdictMsg(msg.session_id, msg.round_id, msg.epoch, stale=True)
    if msg.base != list(p.pending.items()):
        return stale
    ctx = p.text + [p.trees[rid].tokens[i] for rid, path in msg.base for i in path]
    kids = tree.children()
    if tree.n_given:
        path = list(range(tree.n_given))
    else:
        roots = [r for r in kids.get(-1, []) if tree.tokens[r] == p.y]
        if p.y is None or not roots:
            return stale
        path = [roots[0]]
    tokens: list[int] = []
    while True:
        want = target(ctx + [tree.tokens[i] for i in path])
        tokens.append(want)
        child = next((ch for ch in kids.get(path[-1], []) if tree.tokens[ch] == want), None)
        if child is None:
            break
        path.append(child)
    p.y = tokens[-1]
    p.pending[msg.round_id] = path
    return VerdictMsg(msg.session_id, msg.round_id, msg.epoch, stale=False, accepted=path, tokens=tokens)


async def generate(mode: str, alpha: float, costs: Costs, seed: int, k: int = 4, n: int = 32,
                   max_inflight: int = 3) -> tuple[float, list[int]]:
    """ms per token of one generation, and its tokens."""
    cfg = GenerationConfig(mode=mode, max_new_tokens=n, draft_k=k, tree=TreeShape(branch=0), max_inflight=max_inflight,
                           ignore_eos=True)
    pipe = SimPipeline(costs)
    head = Head(f"sim{seed}", pipe, SimDrafter(alpha, costs, seed), cfg, pipeline_depth=costs.stages)
    prompt = [(seed * 13 + i * 7) % VOCAB for i in range(8)]
    out = await head.run(prompt)
    for t in list(pipe.tasks):
        t.cancel()
    seq = list(prompt)
    for _ in range(n):
        seq.append(target_next(seq))
    assert out == seq[len(prompt):], "the simulated dsi lost exactness"
    return head.stats.wall_ms / len(out), out


async def sweep(alphas: list[float], t1s: list[float], seeds: int, costs: Costs) -> list[dict]:
    rows = []
    for t1 in t1s:
        c = Costs(costs.stages, t1, costs.stage_ms, costs.node_ms, costs.draft_ms)
        for a in alphas:
            ms = {m: [] for m in ("si", "dsi")}
            for s in range(seeds):
                for m in ms:
                    ms[m].append((await generate(m, a, c, s))[0])
            si, dsi = statistics.median(ms["si"]), statistics.median(ms["dsi"])
            k = 4
            round_ms = k * c.draft_ms + c.stages * t1 + c.stages * (c.stage_ms + c.node_ms * (k + 1))
            rows.append({"t1_ms": t1, "alpha": a, "si_ms_per_token": si, "dsi_ms_per_token": dsi,
                         "dsi_over_si": si / dsi,
                         "predicted": predicted_dsi_over_si(a, k, c.stages, round_ms, c.draft_ms, 3),
                         "bound": dsi_over_si_bound(a, k, round_ms, c.draft_ms)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t1", default="0,25")
    ap.add_argument("--alpha", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--draft-ms", type=float, default=Costs.draft_ms)
    ap.add_argument("--stage-ms", type=float, default=Costs.stage_ms)
    ap.add_argument("--node-ms", type=float, default=Costs.node_ms)
    ap.add_argument("--stages", type=int, default=Costs.stages)
    args = ap.parse_args(argv)
    costs = Costs(args.stages, 0.0, args.stage_ms, args.node_ms, args.draft_ms)
    rows = asyncio.run(sweep([float(a) for a in args.alpha.split(",")], [float(t) for t in args.t1.split(",")],
                             args.seeds, costs))
    print(f"simulated pipeline: N={costs.stages}, stage {costs.stage_ms} ms + {costs.node_ms} ms/node, "
          f"draft {costs.draft_ms} ms/token, k=4, 32 tokens, median of {args.seeds} seeds")
    print("| t1 ms | ALPHA | si ms/tok | dsi ms/tok | dsi/si | predicted | bound |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['t1_ms']:g} | {r['alpha']:g} | {r['si_ms_per_token']:.1f} | {r['dsi_ms_per_token']:.1f} | "
              f"{r['dsi_over_si']:.2f}x | {r['predicted']:.2f}x | {r['bound']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
