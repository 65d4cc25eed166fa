"""Per-round timestamps of one process, for the per-hop cost breakdown (`python -m dsd_node.ops.bench.hop_profile`).

Off unless DSD_HOP_TRACE names a folder: then every mark is (time.perf_counter(), session, round, where, event)
kept in memory, and `flush()` (called when a session's stream ends) appends them as JSON lines to
`<folder>/<pid>-<where>.jsonl`. perf_counter is CLOCK_MONOTONIC on Linux, one clock for every process of the
machine, so marks from the processes of a testnet line up into one timeline per round. A disabled trace
costs one attribute test per mark.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "DSD_HOP_TRACE"


class HopTrace:
    def __init__(self, folder: str | Path | None, where: str):
        self.folder = Path(folder) if folder else None
        self.where = where
        self.events: list[tuple[float, str, int, str]] | None = [] if self.folder else None

    @classmethod
    def from_env(cls, where: str, environ=os.environ) -> HopTrace:
        return cls(environ.get(ENV) or None, where)

    @property
    def enabled(self) -> bool:
        return self.events is not None

    def mark(self, session_id: str, round_id: int, event: str, t: float | None = None) -> None:
        """Note `event` of a round now (or at `t`, an earlier perf_counter reading)."""
        if self.events is not None:
            self.events.append((time.perf_counter() if t is None else t, session_id, round_id, event))

    def flush(self) -> None:
        if not self.events:
            return
        events, self.events = self.events, []
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{self.where.replace(':', '_')}.jsonl"
        with open(self.folder / name, "a") as f:
            for t, sid, rid, ev in events:
                f.write(json.dumps({"t": t, "sid": sid, "rid": rid, "where": self.where, "ev": ev}) + "\n")
