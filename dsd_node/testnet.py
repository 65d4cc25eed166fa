"""A local testnet: stage, drafter and head node processes on 127.0.0.1, started, health-checked and stopped together."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .models import model_num_layers, split_layers
from .node_server import wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class NodeSpec:
    name: str
    args: list[str]  # dsd-node arguments
    address: str  # where the node's gRPC server listens
    env: dict[str, str] = field(default_factory=dict)


def plan(stages: int, model: str = "embedded:target", drafter: str = "embedded:drafter", threads: int = 1,
         extra: list[str] | None = None) -> list[NodeSpec]:
    """N stages (layers split evenly), a drafter, and a head that routes through the stages in order."""
    extra = extra or []
    specs = []
    for i, (a, b) in enumerate(split_layers(model_num_layers(model), stages)):
        addr = f"127.0.0.1:{free_port()}"
        specs.append(NodeSpec(f"stage{i}", ["--role", "stage", "--model", model, "--layers", f"{a}:{b}",
                                            "--listen", addr, "--threads", str(threads), *extra], addr))
    drafter_args: list[str] = []
    if drafter:
        addr = f"127.0.0.1:{free_port()}"
        specs.append(NodeSpec("drafter", ["--role", "drafter", "--model", drafter, "--listen", addr,
                                          "--threads", str(threads), *extra], addr))
        drafter_args = ["--drafter-addr", addr]
    addr = f"127.0.0.1:{free_port()}"
    route = ",".join(s.address for s in specs if s.name.startswith("stage"))
    specs.append(NodeSpec("head", ["--role", "head", "--model", model, "--route", route, "--listen", addr,
                                   "--threads", str(threads), *drafter_args, *extra], addr))
    return specs


class Testnet:
    """Start the planned nodes as child processes; `gateway` is the head's address once `up()` returns."""

    def __init__(self, specs: list[NodeSpec], log_dir: Path | None = None, quiet: bool = True):
        self.specs = specs
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="dsd-testnet-"))
        self.quiet = quiet
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def gateway(self) -> str:
        return next(s.address for s in self.specs if s.name == "head")

    def start(self, spec: NodeSpec) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{spec.name}.log", "w")  # noqa: SIM115 (owned by the child)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        p = subprocess.Popen([sys.executable, "-m", "dsd_node.node_cli", *spec.args], stdout=log,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[spec.name] = p
        return p

    async def up(self, timeout_s: float = 180.0, progress=None) -> None:
        for spec in self.specs:
            self.start(spec)
        deadline = time.monotonic() + timeout_s
        for spec in self.specs:
            while True:
                p = self.procs[spec.name]
                if p.poll() is not None:
                    raise RuntimeError(f"{spec.name} exited with code {p.returncode}:\n{self.tail(spec.name)}")
                try:
                    await wait_healthy(spec.address, timeout=2)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{spec.name} not healthy after {timeout_s:.0f} s:\n{self.tail(spec.name)}") from None
            if progress:
                progress(f"  {spec.name:8s} healthy at {spec.address}")

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)

    def down(self, timeout_s: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    async def __aenter__(self) -> Testnet:
        try:
            await self.up()
        except BaseException:
            self.down()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.down()


def run_testnet_blocking(net: Testnet, body) -> None:
    """Bring the net up, run `body(net)` (a coroutine function), always bring it down."""

    async def main() -> None:
        async with net:
            await body(net)

    asyncio.run(main())
