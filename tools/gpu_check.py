"""One-GPU check: dsd's stage processes against Hugging Face on the same GPU, offline, in a few minutes.

Builds a Llama-3.2-1B-shaped target and a 2-layer drafter with RANDOM weights (no download), saves them
(safetensors, bf16) with a word-level tokenizer of the same vocabulary, then measures:

  hf generate / hf assisted   ms per token in this process (bf16), and the reference tokens (bf16, fp32)
  net N=.. ar / si            N `dsd-node` stage processes sharing the GPU (+ a drafter and a head), ms per token
                              after one warm-up generation; the drafter is the target itself ("self": every
                              draft is accepted under greedy), since random weights draft nothing useful
  equality                    fp32: network tokens == HF generate tokens, exactly; bf16: same-position agreement
                              and how many prompts diverge at all (near-ties flip in bf16: measured, not assumed)

Every cell runs under a hard time budget; a failed cell is reported in the table, the rest go on. Progress lines
go to stderr with timestamps; the table is printed at the end and written with the JSON to --out.

    bash tools/gpu_check.sh --out gpu_check_out          # the real run: --device cuda, real shapes (< 8 min)
    python tools/gpu_check.py --smoke --out /tmp/smoke    # tiny shapes on the CPU, every code path
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

REAL = dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=8192)
# initializer_range 0.2: a layer's output relative to the embeddings is about as large as in the real shape at 0.02
# (it grows with std^2 * hidden), so the tiny model's greedy text is not one token repeated (tied embeddings)
SMOKE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, initializer_range=0.2)
DEFAULTS = {  # option: (real run, --smoke)
    "device": ("cuda", "cpu"), "stages": ("1,2,4", "1,2"), "fp32_stages": (None, "2"), "tokens": (64, 8),
    "prompt_len": (32, 8), "prompts": (2, 2), "repeats": (3, 1), "cell_s": (150.0, 100.0), "budget_s": (420.0, 240.0),
}
T0 = time.monotonic()
LOG: list = []  # the open progress log under --out, once there is one


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {msg}"
    print(line, file=sys.stderr, flush=True)
    for f in LOG:
        f.write(line + "\n")
        f.flush()


class CellTimeout(Exception):
    pass


@contextmanager
def hard_limit(seconds: float):
    """Raise CellTimeout in this (main) thread after `seconds`, wherever it is."""
    def fire(*_):
        raise CellTimeout(f"over its {seconds:.0f} s budget")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json, gpu_check.md and node logs")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, a few tokens (tests every code path)")
    p.add_argument("--device", help="cuda | cuda:N | cpu | mps (default cuda; --smoke: cpu)")
    p.add_argument("--stages", help="stage counts of the bf16 timing cells (default 1,2,4; --smoke: 1,2)")
    p.add_argument("--fp32-stages", help="stage counts of the fp32 equality cells (default: the largest of --stages)")
    p.add_argument("--tokens", type=int, help="new tokens per generation (default 64; --smoke: 8)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 32; --smoke: 8)")
    p.add_argument("--prompts", type=int, help="random prompts (default 2)")
    p.add_argument("--repeats", type=int, help="timed generations per prompt and cell (default 3; --smoke: 1)")
    p.add_argument("--draft-k", type=int, default=4, help="draft tokens per round (si; HF assisted) (4)")
    p.add_argument("--net-drafter", choices=["self", "small"], default="self",
                   help="drafter of the network's si cells: the target itself (oracle) or the 2-layer drafter")
    p.add_argument("--cell-s", type=float, help="hard time budget of one cell (default 150 s)")
    p.add_argument("--budget-s", type=float, help="time budget of the whole run; later cells are skipped (420 s)")
    p.add_argument("--workdir", help="where the random models are saved (default: a temp folder, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for k, (real, smoke) in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, smoke if a.smoke else real)
    try:
        a.stages = [int(s) for s in str(a.stages).split(",")]
        a.fp32_stages = [int(s) for s in str(a.fp32_stages).split(",")] if a.fp32_stages else [max(a.stages)]
    except ValueError:
        p.error("--stages / --fp32-stages: comma-separated integers, e.g. 1,2,4")
    a.shape = {**(SMOKE if a.smoke else REAL), "max_position_embeddings": 4096}
    layers = a.shape["num_hidden_layers"]
    if any(not 1 <= n <= layers for n in a.stages + a.fp32_stages):
        p.error(f"stage counts must be between 1 and the target's {layers} layers")
    for k in ("tokens", "prompt_len", "prompts", "repeats", "draft_k"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    if a.draft_k > 64:
        p.error("--draft-k must be at most 64")
    if a.prompt_len + a.tokens + a.draft_k + 1 > a.shape["max_position_embeddings"]:
        p.error("--prompt-len + --tokens do not fit the model's 4096 positions")
    if min(a.cell_s, a.budget_s) <= 0:
        p.error("--cell-s and --budget-s must be positive")
    return a


def check_environment(a: argparse.Namespace) -> None:
    """Everything that can be known before spending time: device, dtypes, node flags, disk, output folder."""
    from dsd_node.engine.device import DeviceError, resolve_device

    try:
        a.dev = resolve_device(a.device)
    except DeviceError as e:
        raise SystemExit(f"gpu_check: {e}") from None
    if a.dev.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise SystemExit(f"gpu_check: {torch.cuda.get_device_name(a.dev)} does not support bfloat16")
        free, total = torch.cuda.mem_get_info(a.dev)
        log(f"{torch.cuda.get_device_name(a.dev)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        if free < (24 << 30) and not a.smoke:  # fp32: HF's target, or the drafter's and the stages' copies (~15 GiB)
            log("WARNING: under 24 GiB free on the GPU; the fp32 cells may run out of memory")
    helptext = subprocess.run([sys.executable, "-m", "dsd_node.node_cli", "--help"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120).stdout
    missing = [f for f in ("--device", "--dtype", "bfloat16", "float32") if f not in helptext]
    if missing:
        raise SystemExit(f"gpu_check: `dsd-node --help` does not offer {', '.join(missing)}: this checkout cannot "
                         "place nodes on a device")
    a.own_workdir = not a.workdir
    a.workdir = Path(a.workdir or tempfile.mkdtemp(prefix="dsd-gpu-check-"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    s = a.shape
    params = s["vocab_size"] * s["hidden_size"] + s["num_hidden_layers"] * (
        4 * s["hidden_size"] ** 2 + 3 * s["hidden_size"] * s["intermediate_size"])
    need = int(params * 2 * 1.3) + (200 << 20)  # bf16 target + 2-layer drafter + tokenizers
    free = shutil.disk_usage(a.workdir).free
    if free < need:
        raise SystemExit(f"gpu_check: {a.workdir} has {free >> 20} MiB free, the models need ~{need >> 20} MiB "
                         "(use --workdir)")


# ---------------------------------------------------------------- models


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer "t0 t1 ..." with exactly vocab_size entries: prompts are sent as token ids anyway."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t1").save_pretrained(path)


def build_models(a: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = {}
    for name, layers in (("target", a.shape["num_hidden_layers"]), ("drafter", 2)):
        path = a.workdir / name
        cfg = LlamaConfig(**{**a.shape, "num_hidden_layers": layers}, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)
        torch.manual_seed(a.seed + layers)
        t = time.monotonic()
        with torch.device(a.dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(path)
        save_tokenizer(path, cfg.vocab_size)
        n = sum(p.numel() for p in model.parameters())
        del model
        log(f"  {name}: {layers} layers, {n / 1e6:.1f} M parameters, saved in {time.monotonic() - t:.1f} s to {path}")
        out[name] = {"path": str(path), "layers": layers, "parameters": n}
    free_memory()
    return out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------- rows and comparisons


class Rows:
    """The table: one row per measured cell, planned up front so that a skipped or failed cell still shows."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def plan(self, name: str, **facts) -> str:
        self.rows[name] = {"cell": name, **facts, "status": "skipped", "ms_per_token": None,
                           "tokens_per_round": None, "check": ""}
        return name

    def done(self, name: str, ms: list[float], check: str = "", tokens_per_round: float | None = None, **extra):
        self.rows[name].update(status="ok", ms_per_token=round(statistics.median(ms), 3),
                               runs_ms_per_token=[round(m, 3) for m in ms], check=check,
                               tokens_per_round=tokens_per_round, **extra)
        r = self.rows[name]
        log(f"  {name}: {r['ms_per_token']:.2f} ms/token {check}")

    def fail(self, names: list[str], status: str, error: str) -> None:
        for n in names:
            if self.rows[n]["status"] == "skipped":
                self.rows[n].update(status=status, error=error)

    def markdown(self) -> str:
        """ms/token, and hf generate's ms/token (same dtype) divided by it: above 1 is faster than HF."""
        lines = ["| cell | ms/token | x hf generate | tokens/round | check | status |", "|---|---|---|---|---|---|"]
        for r in self.rows.values():
            ms = f"{r['ms_per_token']:.2f}" if r["ms_per_token"] is not None else "-"
            hf = self.rows.get(f"hf generate {r.get('dtype')}", {}).get("ms_per_token")
            speed = f"{hf / r['ms_per_token']:.2f}" if hf and r["ms_per_token"] else "-"
            tpr = f"{r['tokens_per_round']:.2f}" if r["tokens_per_round"] is not None else "-"
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"[:160]
            lines.append(f"| {r['cell']} | {ms} | {speed} | {tpr} | {r['check']} | {status.replace('|', '/')} |")
        return "\n".join(lines)


def compare(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Same-position agreement over all prompts, and where each prompt first diverges (None: never)."""
    same = sum(x == y for r, g in zip(ref, got, strict=True) for x, y in zip(r, g, strict=False))
    total = sum(len(r) for r in ref)
    firsts = [next((i for i, (x, y) in enumerate(zip(r, g, strict=False)) if x != y),
                   None if len(r) == len(g) else min(len(r), len(g))) for r, g in zip(ref, got, strict=True)]
    return {"agreement": same / max(1, total), "first_divergence": firsts, "exact": all(f is None for f in firsts)}


def agreement_text(c: dict) -> str:
    div = [f for f in c["first_divergence"] if f is not None]
    at = f" (first at {', '.join(map(str, div))})" if div else ""
    return f"agree {100 * c['agreement']:.1f}%, {len(div)}/{len(c['first_divergence'])} prompts diverge{at}"


def equality_text(c: dict) -> str:
    return "exact" if c["exact"] else "MISMATCH: " + agreement_text(c)


# ---------------------------------------------------------------- Hugging Face in this process


def hf_generate(model, ids: list[int], a, **kw):
    x = torch.tensor([ids], device=a.dev)
    sync(a.dev)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=a.tokens,
                             pad_token_id=0, **kw)
    seq = out.sequences if hasattr(out, "sequences") else out
    toks = seq[0, len(ids):].tolist()
    return toks, (time.perf_counter() - t) * 1e3 / max(1, len(toks)), out


def hf_cells(a, rows: Rows, names: dict, dtype: torch.dtype, models: dict, refs: dict, box: dict) -> None:
    """Reference tokens (with the top-2 logit gap of each step), then timed generate and assisted generation."""
    from transformers import AutoModelForCausalLM

    key = str(dtype).removeprefix("torch.")
    box["phase"] = "loading the models"
    target = AutoModelForCausalLM.from_pretrained(models["target"]["path"], dtype=dtype).to(a.dev).eval()
    drafter = AutoModelForCausalLM.from_pretrained(models["drafter"]["path"], dtype=dtype).to(a.dev).eval() \
        if "assisted_small" in names else None
    try:
        box["phase"] = "generating"
        hf_generate(target, a.prompt_ids[0], a)  # warm-up
        ref, gaps, distinct = [], [], []
        for ids in a.prompt_ids:
            toks, _, out = hf_generate(target, ids, a, output_logits=True, return_dict_in_generate=True)
            ref.append(toks)
            distinct.append(len(set(toks)) / max(1, len(toks)))
            top2 = torch.stack(out.logits).float().topk(2, dim=-1).values
            gaps.append(float((top2[..., 0] - top2[..., 1]).min()))
        refs[key] = ref
        log(f"  hf {key}: reference tokens of {len(ref)} prompts, smallest top-2 logit gap {min(gaps):.2e}")
        ms, agree = [], []
        for _ in range(a.repeats):
            for ids, r in zip(a.prompt_ids, ref, strict=True):
                toks, m, _ = hf_generate(target, ids, a)
                ms.append(m)
                agree.append(toks == r)
        check = (f"reference: {100 * statistics.mean(distinct):.0f}% distinct tokens, smallest top-2 logit gap "
                 f"{min(gaps):.1e}" + ("" if all(agree) else "; NONDETERMINISTIC"))
        rows.done(names["generate"], ms, check, 1.0, min_top2_gap=min(gaps), distinct_tokens=statistics.mean(distinct),
                  deterministic=all(agree), tokens=ref)
        for kind, assistant in (("assisted_small", drafter), ("assisted_self", target)):
            if kind not in names:
                continue
            box["phase"] = f"generating ({kind})"
            gc_ = assistant.generation_config  # HF's defaults are 20 tokens, adaptive: pin them to draft_k
            gc_.num_assistant_tokens, gc_.num_assistant_tokens_schedule = a.draft_k, "constant"
            gc_.assistant_confidence_threshold = 0.0
            hf_generate(target, a.prompt_ids[0], a, assistant_model=assistant)  # warm-up
            ms, got = [], []
            for rep in range(a.repeats):
                for ids in a.prompt_ids:
                    toks, m, _ = hf_generate(target, ids, a, assistant_model=assistant)
                    ms.append(m)
                    if rep == 0:
                        got.append(toks)
            rows.done(names[kind], ms, agreement_text(compare(ref, got)) + " vs hf generate")
    finally:
        del target, drafter
        free_memory()


# ---------------------------------------------------------------- the network


async def net_cells(a, rows: Rows, names: dict, n: int, dtype: str, models: dict, ref: list[list[int]] | None,
                    box: dict) -> None:
    from dsd_node.engine.config import GenerationConfig
    from dsd_node.net.client import DsdClient
    from dsd_node.ops import testnet

    drafter = models["target" if a.net_drafter == "self" else "drafter"]["path"]
    specs = testnet.plan(n, model=models["target"]["path"], drafter=drafter, threads=1,
                         extra=["--device", str(a.dev), "--dtype", dtype])
    net = box["net"] = testnet.Testnet(specs, log_dir=Path(a.out) / "logs" / f"N{n}-{dtype}")
    try:
        box["phase"] = f"starting the nodes (logs in {net.log_dir})"
        await net.up(timeout_s=a.cell_s, progress=log)
        async with DsdClient(net.gateway, timeout_s=a.cell_s) as client:
            for mode, name in names.items():
                box["phase"] = f"generating in mode {mode} (logs in {net.log_dir})"
                cfg = GenerationConfig(mode=mode, max_new_tokens=a.tokens, draft_k=a.draft_k, ignore_eos=True)
                await client.generate(a.prompt_ids[0], cfg)  # warm-up
                ms, got, tokens, rounds = [], [], 0, 0
                for rep in range(a.repeats):
                    for ids in a.prompt_ids:
                        r = await client.generate(ids, cfg)
                        ms.append(r.stats.ms_per_token)
                        tokens, rounds = tokens + r.stats.new_tokens, rounds + r.stats.rounds
                        if rep == 0:
                            got.append(r.tokens)
                c = compare(ref, got) if ref is not None else None
                check = "" if c is None else equality_text(c) if dtype == "float32" else agreement_text(c)
                rows.done(name, ms, check, tokens / max(1, rounds), comparison=c, tokens=got)
    finally:
        net.down()


# ---------------------------------------------------------------- the run


def run_cell(a, rows: Rows, names: list[str], title: str, fn, deadline: float) -> None:
    """Run one cell under its hard budget (never past the run's deadline); failures land in the table."""
    left = deadline - time.monotonic()
    if left < 15:
        log(f"skipping {title}: the run's time budget is spent")
        rows.fail(names, "skipped", "time budget of the run spent")
        return
    budget = min(a.cell_s, left)
    log(f"{title} (budget {budget:.0f} s)")
    box: dict = {"phase": "starting"}
    try:
        with hard_limit(budget + 20):  # the backstop; async cells stop themselves at `budget`
            fn(budget, box)
    except (Exception, CellTimeout) as e:
        if isinstance(e, (CellTimeout, TimeoutError)):
            kind, msg = "TIMEOUT", f"over {budget:.0f} s while {box['phase']}"
        else:
            kind, msg = "FAIL", f"{type(e).__name__} while {box['phase']}: {e}"
            log(traceback.format_exc())
        log(f"  {title}: {kind} {msg.splitlines()[0] if msg else ''}")
        rows.fail(names, kind, msg[:3000])
    finally:
        if box.get("net") is not None:
            box["net"].down()
        free_memory()


def machine(a) -> dict:
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(a.dev), "cpu_count": os.cpu_count(),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if a.dev.type == "cuda":
        p = torch.cuda.get_device_properties(a.dev)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                            timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; the node processes inherit this
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # nodes
    Path(a.out).mkdir(parents=True, exist_ok=True)
    LOG.append(open(Path(a.out) / "gpu_check.log", "w"))  # noqa: SIM115 (open for the whole run)
    hf_logging.set_verbosity_error()  # assisted generation's deprecation notes
    hf_logging.disable_progress_bar()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the node processes
    log(f"gpu_check {'--smoke ' if a.smoke else ''}device={a.device} stages={a.stages} fp32 stages={a.fp32_stages} "
        f"tokens={a.tokens} prompts={a.prompts}x{a.prompt_len} repeats={a.repeats} k={a.draft_k}")
    check_environment(a)
    if a.dev.type == "cpu":
        torch.set_num_threads(1)  # as each node process: on shared cores, more threads only wait for each other
    deadline = T0 + a.budget_s
    out = Path(a.out)
    gen = torch.Generator().manual_seed(a.seed)
    a.prompt_ids = torch.randint(0, a.shape["vocab_size"], (a.prompts, a.prompt_len), generator=gen).tolist()
    rows, models, refs = Rows(), {}, {}
    result = {"args": {k: v for k, v in vars(a).items() if k not in ("dev", "prompt_ids", "workdir")},
              "machine": machine(a), "models": models, "rows": rows.rows}

    def save() -> None:
        result["wall_s"] = round(time.monotonic() - T0, 1)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "gpu_check.md").write_text(rows.markdown() + "\n")

    k = a.draft_k
    hf = {"bf16": {"generate": rows.plan("hf generate bf16", kind="hf", dtype="bf16"),
                   "assisted_small": rows.plan(f"hf assisted bf16 (2-layer drafter, k={k})", kind="hf", dtype="bf16"),
                   "assisted_self": rows.plan(f"hf assisted bf16 (self, k={k})", kind="hf", dtype="bf16")},
          "fp32": {"generate": rows.plan("hf generate fp32", kind="hf", dtype="fp32")}}
    nets = [(n, dt, {"ar": rows.plan(f"net N={n} ar {short}", kind="net", n=n, mode="ar", dtype=short),
                     "si": rows.plan(f"net N={n} si k={k} {short}", kind="net", n=n, mode="si", dtype=short)})
            for dt, short, ns in (("float32", "fp32", a.fp32_stages), ("bfloat16", "bf16", a.stages)) for n in ns]
    try:
        log("building the random-weight target and drafter")
        try:
            with hard_limit(min(a.cell_s, a.budget_s)):
                models.update(build_models(a))
        except (Exception, CellTimeout) as e:
            log(traceback.format_exc())
            rows.fail(list(rows.rows), "FAIL", f"building the models failed: {type(e).__name__}: {e}")
            return finish(rows, save, out)
        for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            run_cell(a, rows, list(hf[dt].values()), f"hugging face {dt} in this process",
                     lambda budget, box, dt=dt, dtype=dtype: hf_cells(a, rows, hf[dt], dtype, models, refs, box), deadline)
            save()
        for n, dtype, names in sorted(nets, key=lambda x: (x[1] != "float32", -x[0])):  # equality, then the largest N
            ref = refs.get(dtype)
            run_cell(a, rows, list(names.values()), f"network N={n} {dtype} ({n} stage processes + drafter + head)",
                     lambda budget, box, n=n, dtype=dtype, names=names, ref=ref: asyncio.run(asyncio.wait_for(
                         net_cells(a, rows, names, n, dtype, models, ref, box), budget)), deadline)
            save()
    finally:
        if a.own_workdir:
            shutil.rmtree(a.workdir, ignore_errors=True)
    return finish(rows, save, out)


def finish(rows: Rows, save, out: Path) -> int:
    save()
    print(rows.markdown(), flush=True)
    bad = [r["cell"] for r in rows.rows.values() if r["status"] != "ok"]
    log(f"done in {time.monotonic() - T0:.0f} s: {len(rows.rows) - len(bad)}/{len(rows.rows)} cells ok; "
        f"results in {out / 'gpu_check.json'} and {out / 'gpu_check.md'}, progress in {out / 'gpu_check.log'}, "
        f"node logs in {out / 'logs'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
