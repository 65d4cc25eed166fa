"""The Docker testnet for real: tools/compose_check.sh builds the image, starts docker-compose.yml, waits for every
health check, generates through the `client` service, compares the text with `dsd generate --local` and tears the
project down (containers, network, volumes).

Marked `docker` and left out of the default run (it takes minutes: the first run builds the image):

    python -m pytest -q -m docker tests/test_docker.py

Skipped where no Docker engine can run (the script exits 77: no engine, and not root with apt-get to install
and start one).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "compose_check.sh"
SKIP = 77


@pytest.mark.docker
@pytest.mark.slow  # so that -m "not slow" (which replaces the default -m) leaves it out too
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_compose_testnet_end_to_end() -> None:
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    report = proc.stderr[-6000:]
    if proc.returncode == SKIP:
        pytest.skip(next((ln for ln in proc.stderr.splitlines() if "SKIP:" in ln), "no Docker engine here"))
    assert proc.returncode == 0, report
    assert "OK: identical to dsd generate --local" in proc.stderr, report
    assert "compose_check: summary:" in proc.stderr, report


def test_compose_check_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.slow
def test_install_script_makes_a_venv_and_names_missing_build_tools(tmp_path: Path) -> None:
    """Outside a venv, .ci/install.sh creates one (never pip into the system Python); before pip would compile
    fastecdsa (no wheel reachable) it names the missing compiler and the apt-get line."""
    import os
    import sys

    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PIP_FIND_LINKS", "PIP_INDEX_URL")}
    env.update(PYTHON=sys.executable, DSD_VENV=str(venv), CC="no-such-cc", PIP_NO_INDEX="1",
               PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=str(tmp_path))
    if sys.prefix != sys.base_prefix:  # the venv's python: create the new venv from the base interpreter
        env["PYTHON"] = str(Path(sys.base_prefix) / "bin" / "python3")
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "install.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    if "cannot create a virtual environment" in proc.stderr:
        pytest.skip("this Python has no venv/ensurepip module")
    assert proc.returncode == 1, proc.stderr
    assert (venv / "bin" / "python").exists(), proc.stderr
    assert "missing: gcc" in proc.stderr and "apt-get install -y gcc libgmp-dev" in proc.stderr, proc.stderr
