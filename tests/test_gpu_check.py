"""tools/gpu_check.py --smoke: every code path of the one-GPU check, on the CPU with tiny random models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.extended  # about 70 s: the GPU check's code paths on a CPU
def test_gpu_check_smoke(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    names = set(rows)
    assert {"hf generate bf16", "hf generate fp32", "hf assisted bf16 (2-layer drafter, k=4)",
            "hf assisted bf16 (self, k=4)"} <= names
    for n in (1, 2):
        assert {f"net N={n} ar bf16", f"net N={n} si k=4 bf16"} <= names
    assert {"net N=2 ar fp32", "net N=2 si k=4 fp32"} <= names
    for r in rows.values():
        assert r["status"] == "ok", r
        assert isinstance(r["ms_per_token"], float) and r["ms_per_token"] > 0, r
        if r["kind"] == "net":
            # fp32: the network's tokens are HF generate's, exactly; bf16: agreement measured
            assert r["check"] == "exact" if r["dtype"] == "fp32" else r["check"].startswith("agree "), r
            if r["mode"] == "si" and r["dtype"] == "fp32":
                assert r["tokens_per_round"] >= 2, r  # the target drafts for itself: every draft accepted
        if r["cell"].startswith("hf generate"):
            assert r["distinct_tokens"] > 0.5, r  # the reference is not one token repeated: the checks mean something
    table = [line for line in p.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| cell | ms/token |") and len(table) == len(rows) + 2
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d+", cells[1]), line  # every cell has a number
        if " fp32" in cells[0] and cells[0].startswith("net "):
            assert cells[4] == "exact", line
    assert (tmp_path / "gpu_check.md").read_text().strip() == "\n".join(table)
    assert "net N=2 si" in (tmp_path / "gpu_check.log").read_text()
