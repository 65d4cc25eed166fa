"""Running a `dsd bench` sweep: the testnets of each group side by side, the speed probe, progress lines, the
Hugging Face peer baseline and the machine's description; `run_bench` runs it all and writes the results."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from dsd_node import __version__
from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.device import resolve_device, resolve_dtype, synchronize
from dsd_node.engine.models import load_tokenizer, resolve_model_path
from dsd_node.net.client import DsdClient
from dsd_node.ops import testnet
from dsd_node.ops.bench.formula import check, summarize, tau_from_accepted
from dsd_node.ops.bench.plan import SLOW_THRESHOLD, BenchConfig, Cell, Group, all_cells, load_prompts, plan_groups
from dsd_node.ops.bench.report import headline, noise_summary, theory, write_markdown, write_plots
from netem.link_emulator import parse_rate

WARMUP_TOKENS = 8  # the HF baseline's warm-up


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


def _gen_config(mode: str, k: int | None, tokens: int, max_inflight: int):
    return GenerationConfig(mode=mode, max_new_tokens=tokens, draft_k=k or 1, max_inflight=max_inflight,
                            ignore_eos=True)


def testnet_specs(cfg: BenchConfig, n: int, t1: float, drafter: str | None) -> list:
    """Head + drafter + stage 0 in one process (L = N links per round); every node behind the link emulator."""
    specs = testnet.plan(n, model=cfg.model, drafter=cfg.drafter_source(drafter) if drafter else None,
                         threads=cfg.threads, link_delay_ms=t1, colocate=True,
                         extra=["--device", cfg.device, "--dtype", cfg.dtype])
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
        self.threshold, self.max_wait_s = threshold, max_wait_s
        self.x = torch.randn(256, 256)
        self.best = float("inf")

    def sample(self) -> float:
        """The slowdown now: probe time / the fastest probe time seen (1.0 = as fast as ever). The best of three
        short loops, so that one preemption does not read as a slow machine."""
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
        self.cfg, self.group, self.prompt_ids, self.progress, self.probe = cfg, group, prompt_ids, progress, probe
        d = group.drafter or "none"
        self.nets = {t1: testnet.Testnet(testnet_specs(cfg, group.stages, t1, group.drafter),
                                 log_dir=cfg.out / "logs" / f"N{group.stages}-t{t1:g}-{d}") for t1 in group.cells}
        self.clients: dict = {}
        self.runs_per_cell = cfg.repeats * len(prompt_ids)

    async def start(self) -> None:
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
            return (await self.clients[t1].generate(ids, cfg)).as_dict()["stats"]  # the gateway's stats as a dict
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
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(cfg.threads)  # as many threads as each node process
    hf_logging.set_verbosity_error()  # min_new_tokens + assistant: harmless deprecation notes
    hf_logging.disable_progress_bar()
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device, None)
        target = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=dtype).to(device).eval()
        drafter = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.draft_model), dtype=dtype).to(device).eval()
        kinds = {"hf_generate": {}, "hf_assisted": {"assistant_model": drafter}}
        longest = max(prompt_ids, key=len)
        for extra in kinds.values():  # warm-up: full length, longest prompt (as on the testnets)
            hf_generate_ms_per_token(target, longest, cfg.max_new_tokens, extra)
        runs: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(cfg.repeats):
            for ids in prompt_ids:
                for name, extra in kinds.items():  # interleaved, like the testnet runs
                    runs[name].append(hf_generate_ms_per_token(target, ids, cfg.max_new_tokens, extra))
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


def hf_generate_ms_per_token(model, ids: list[int], tokens: int, extra: dict) -> float:
    """ms per token of one greedy HF generation of exactly `tokens` new tokens."""
    x = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=model.config.pad_token_id or 0, **extra)
        synchronize(model.device)
        wall = (time.perf_counter() - t0) * 1e3
    return wall / max(1, y.shape[1] - len(ids))


def machine_info() -> dict:
    """Where and with what the numbers were measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "versions": {"dsd": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "grpcio": grpc.__version__}, "git_commit": commit}


def _model_facts(cfg: BenchConfig, prompts: list[tuple[str, str]]) -> tuple[list[list[int]], int]:
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
               "theory": theory(cells, cfg),
               "cells": [asdict(c) for c in cells], "wall_s": round(time.monotonic() - t0, 1)}
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(cfg.out / "results.md", cells, h, baseline, cfg)
    results["plots"] = write_plots(cfg.out, cells, cfg) if cfg.plots else []
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    return results
