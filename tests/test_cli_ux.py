"""What a new user meets first: the README's Python examples, Ctrl-C and SIGTERM, bad addresses and paths."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import running

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.models import ModelError, resolve_model_path
from dsd_node.net.client import parse_gateway_address
from dsd_node.ops.testnet import plan

ROOT = Path(__file__).resolve().parent.parent
DSD = [sys.executable, "-m", "dsd_node.cli"]


@pytest.mark.parametrize("address", ["127.0.0.1:6000", "localhost:1", "[::1]:6000", "gateway:6000"])
def test_gateway_address_accepted(address):
    assert parse_gateway_address(address) == address


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1", "the port is required"), ("http://127.0.0.1:6000", "without a scheme"), ("::1", "HOST:PORT"),
    (":6000", "HOST:PORT"), ("[::1:6000", "HOST:PORT"), ("h:0", "1 to 65535"), ("h:port", "1 to 65535"),
])
def test_gateway_address_refused(address, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_gateway_address(address)


@pytest.mark.parametrize("source", ["./missing-dir", "../missing-dir", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_model_directory(source):
    with pytest.raises(ModelError, match=f"^no such directory: {re.escape(source)}$"):
        resolve_model_path(source)


def _run_dsd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*DSD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_bad_gateway_address_is_one_line_exit_2():
    r = _run_dsd("generate", "--gateway", "127.0.0.1", "PROMPT")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "port is required" in r.stderr
    assert r.stdout == ""


@pytest.mark.slow
def test_prompt_not_echoed_before_a_connection_error():
    r = _run_dsd("generate", "--gateway", "127.0.0.1:1", "PROMPT")
    assert r.returncode == 1 and "PROMPT" not in r.stdout and "generation failed" in r.stderr


@pytest.mark.slow
@pytest.mark.extended  # 15 s; the gateway and testnet variants stay in the default run
def test_ctrl_c_during_local_generation():
    # --json prints nothing until the end. Loading takes ~5 s on the 2-core machine and the 2000 tokens ~9 s more on
    # a quiet one (a fixed 20 s from the start was already past the end there): interrupt 7 s after the note that
    # dsd prints before it loads anything
    cmd = [*DSD, "generate", "--local", "def f(", "--mode", "dsi", "--max-new-tokens", "2000", "--ignore-eos", "--json"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any("note: --local" in line for line in lines) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(7)
    assert p.poll() is None, "".join(lines)
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)
    reader.join(timeout=5)
    err = "".join(lines)
    assert p.returncode == 130, err
    assert time.monotonic() - t < 10
    assert "Traceback" not in err and "dsd: interrupted" in err
    assert "Loading weights" not in err and "FutureWarning" not in err


@pytest.mark.slow
def test_ctrl_c_while_dsd_is_still_importing_is_one_line():
    """The console script imports torch, transformers and libp2p first (seconds): a Ctrl-C then is no traceback."""
    script = Path(sys.executable).with_name("dsd")
    if not script.exists():
        pytest.skip(f"no dsd console script next to {sys.executable} (the package is not installed in this venv)")
    p = subprocess.Popen([str(script), "generate", "--local", "def f("], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(0.5)  # importing takes ~3 s on the 2-core machine
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip() == "dsd: interrupted" and out == "", err


@pytest.mark.slow
def test_local_engine_generate_inside_a_running_loop(local_engine):
    cfg = GenerationConfig(mode="si", max_new_tokens=8)
    expected = local_engine.generate("import os", cfg).tokens

    async def in_loop():
        assert local_engine.generate("import os", cfg).tokens == expected  # e.g. Jupyter, python -m asyncio
        assert (await local_engine.generate_async("import os", cfg)).tokens == expected

    asyncio.run(in_loop())


@pytest.fixture(scope="module")
def local_engine():
    from dsd_node.engine.local import LocalEngine

    return LocalEngine(stages=2)


@pytest.mark.slow
def test_no_future_warning_from_the_layers(local_engine):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        local_engine.generate("def f(", GenerationConfig(mode="dsi", max_new_tokens=8))


@pytest.fixture(scope="module")
def net():
    with running(plan(2, http="auto")) as n:  # the README's OpenAI example runs against its HTTP API
        yield n


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_examples_run_as_written(net):
    blocks = _readme_python_blocks()
    assert len(blocks) >= 3 and any("DsdClient" in b for b in blocks) and any("LocalEngine" in b for b in blocks)
    assert any("from openai import OpenAI" in b for b in blocks)
    for code in blocks:
        code = code.replace("127.0.0.1:6000", net.gateway).replace("http://127.0.0.1:8000/v1", net.http_url)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.strip(), f"{code}\n{r.stderr}"


@pytest.mark.slow
def test_stage_address_is_not_a_gateway(net):
    stage = next(s for s in net.specs if s.name == "stage0")
    r = _run_dsd("generate", "--gateway", stage.address, "PROMPT")
    assert r.returncode == 1 and r.stdout == ""
    assert f"{stage.address} is not a dsd gateway (it answers gRPC but has no Gateway service" in r.stderr


@pytest.mark.slow
def test_ctrl_c_during_gateway_generation(net):
    cmd = [*DSD, "generate", "--gateway", net.gateway, "def f(", "--max-new-tokens", "2000", "--ignore-eos",
           "--mode", "ar"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.read(6) == "def f("  # streaming has begun
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=30)[1]
    assert p.returncode == 130 and "Traceback" not in err and err.strip() == "dsd: interrupted", err


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "dsd_node" in line and int(line.split()[1]) == pid]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.extended)],
                         ids=["TERM", "INT"])  # INT (30 s) in the extended tier: the same path as TERM
def test_signal_stops_testnet_and_removes_temp_dirs(sig, code):
    keys_before = set(Path(tempfile.gettempdir()).glob("dsd-keys-*"))
    cmd = [*DSD, "testnet", "up", "--stages", "2", "--no-discovery"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    err = ""
    while "gateway:" not in err:
        line = p.stderr.readline()
        assert line, f"exited early ({p.poll()}):\n{err}"
        err += line
    nodes = _children(p.pid)
    log_dir = Path(re.search(r"\(logs in (.*?)\)", err).group(1))
    assert len(nodes) == 4 and log_dir.is_dir()  # 2 stages, drafter, head
    p.send_signal(sig)
    err += p.communicate(timeout=60)[1]
    assert p.returncode == code and "Traceback" not in err, err
    for pid in nodes:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], pid
    assert not log_dir.exists()
    assert set(Path(tempfile.gettempdir()).glob("dsd-keys-*")) <= keys_before  # this run's key dir is gone
