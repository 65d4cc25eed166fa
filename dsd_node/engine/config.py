"""What a generation is asked to do (GenerationConfig, TreeShape), what it reports (Stats), and how it fails.

These types are the same in one process and across the network: dsd_node.net.wire converts them to
and from protobuf generically, field by field, so a new TreeShape field needs only the dataclass
field here and its twin in proto/dsd.proto (the CLI flag is made from the field's metadata).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

from dsd_node.engine.verify import SamplingParams

MODES = ("ar", "si", "dsi")


class ErrorCode(enum.Enum):
    """Why a generation failed; names match gRPC status codes (the gateway maps one to the other)."""

    UNAVAILABLE = "UNAVAILABLE"  # a stage or drafter is down or unreachable: try another route
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the request (or a peer's message) is malformed
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # a node is full (sessions, KV memory)
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # no verdict in time: a stage is stuck
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # this node cannot serve the request as asked (e.g. no drafter)


class GenerationError(RuntimeError):
    """A generation that cannot go on (a stage failed, a protocol error), with a readable reason and a code."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.UNAVAILABLE):
        super().__init__(message)
        self.code = code


@dataclass
class TreeShape:
    """The shape of each round's draft tree beyond its main chain of draft_k tokens."""

    branch: int = field(default=1, metadata={"help": "draft tree: alternatives per level at the first levels (1)"})
    branch_depth: int = field(default=1, metadata={"help": "draft tree: levels that get alternatives (1)"})
    max_nodes: int = field(default=0, metadata={"help": "draft tree: total nodes per round (default 0: no cap)"})

    def validate(self) -> None:
        bad = [f.name for f in fields(self) if getattr(self, f.name) < 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be negative")


@dataclass
class GenerationConfig:
    mode: str = "si"
    max_new_tokens: int = 64
    draft_k: int = 4
    tree: TreeShape = field(default_factory=TreeShape)
    max_inflight: int = 0  # dsi: most rounds in flight; 0 = one per pipeline stage
    min_valid_prob: float = 0.35  # dsi: send a round past the chain only if this likely to be used (and it pays); 0: always
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.mode != "ar" and not 1 <= self.draft_k <= 64:
            raise ValueError("draft_k must be between 1 and 64")
        if self.max_inflight < 0:
            raise ValueError("max_inflight cannot be negative")
        if not 0.0 <= self.min_valid_prob <= 1.0:  # NaN fails too
            raise ValueError("min_valid_prob must be between 0 and 1")
        self.tree.validate()


@dataclass
class Stats:
    """What one generation did; the same type from `--local`, from the gateway, and from DsdClient."""

    mode: str
    rounds: int = 0
    rounds_wasted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    inflight: list[int] = field(default_factory=list)
    new_tokens: int = 0
    wall_ms: float = 0.0
    draft_ms: float = 0.0
    failovers: int = 0  # times the gateway re-routed around a failed stage
    drafter_failures: int = 0  # drafts no drafter could give (each round then goes without one)
    fallback_rounds: int = 0  # rounds sent without a draft, as in ar, because no drafter answered

    def add(self, other: Stats) -> None:
        """Fold in the rounds of another session of the same generation (after a failover)."""
        self.rounds += other.rounds
        self.rounds_wasted += other.rounds_wasted
        self.draft_ms += other.draft_ms
        self.accepted_per_round += other.accepted_per_round
        self.inflight += other.inflight
        self.drafter_failures += other.drafter_failures
        self.fallback_rounds += other.fallback_rounds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.wall_ms / 1e3) if self.wall_ms else 0.0

    @property
    def ms_per_token(self) -> float:
        return self.wall_ms / self.new_tokens if self.new_tokens else 0.0

    @property
    def tokens_per_round(self) -> float:
        apr = self.accepted_per_round
        return sum(apr) / len(apr) if apr else 0.0

    def as_dict(self) -> dict:
        return {"mode": self.mode, "rounds": self.rounds, "rounds_wasted": self.rounds_wasted,
                "accepted_per_round": list(self.accepted_per_round), "inflight": list(self.inflight),
                "new_tokens": self.new_tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                "ms_per_token": round(self.ms_per_token, 3), "draft_ms": round(self.draft_ms, 2),
                "wall_ms": round(self.wall_ms, 2), "failovers": self.failovers,
                "drafter_failures": self.drafter_failures, "fallback_rounds": self.fallback_rounds}


@dataclass(frozen=True)
class DrafterSpec:
    """What `--drafter` names: a model (hub id, path, embedded:drafter) or the target as a calibrated oracle."""

    source: str
    oracle_alpha: float | None = None  # the target as an oracle (self = 1.0); None: `source` as it is

    @staticmethod
    def parse(name: str, target: str) -> DrafterSpec:
        """'self' / 'oracle' -> the target as it is; 'oracle:0.7' -> the target, each token kept with p = 0.7."""
        if name in ("self", "oracle"):
            return DrafterSpec(target, 1.0)
        if name.startswith("oracle:"):
            try:
                alpha = float(name.removeprefix("oracle:"))
            except ValueError:
                alpha = -1.0
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"bad drafter {name!r}: oracle:ALPHA needs 0 <= ALPHA <= 1 (e.g. oracle:0.7)")
            return DrafterSpec(target, alpha)
        return DrafterSpec(name)

    @property
    def is_target(self) -> bool:
        """Drafts with the target itself (self, oracle, oracle:ALPHA)."""
        return self.oracle_alpha is not None
