"""A local testnet: stage, drafter and head node processes on 127.0.0.1, started, health-checked and stopped together."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsd_node.engine.models import model_num_layers, split_layers
from dsd_node.net.grpc_util import wait_healthy
from dsd_node.p2p.identity import load_or_create_identity
from netem.link_emulator import emulator_requested


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Trust:
    """How a testnet's nodes trust each other: plain text (--insecure, the default for local testnets), or TLS
    bound to each node's identity, optionally a private swarm (swarm key) and a gateway API key."""

    tls: bool = False
    swarm_key: Path | None = None
    api_key: str | None = None

    @classmethod
    def private(cls, key_dir: Path, api_key: str | None = None) -> Trust:
        """TLS, a fresh swarm key in key_dir and (unless given) a fresh API key."""
        key_dir.mkdir(parents=True, exist_ok=True)
        swarm = key_dir / "swarm.key"
        swarm.write_text(secrets.token_hex(32) + "\n")
        swarm.chmod(0o600)
        return cls(True, swarm, api_key or secrets.token_urlsafe(24))

    def args(self, head: bool = False) -> list[str]:
        out = [] if self.tls else ["--insecure"]
        out += ["--swarm-key", str(self.swarm_key)] if self.swarm_key else []
        return out + (["--api-key", self.api_key] if head and self.api_key else [])

    def describe(self) -> str:
        if not self.tls:
            return "plain text (--insecure): links are not encrypted and callers are not authenticated"
        swarm = "private swarm (swarm key)" if self.swarm_key else "open swarm (any peer may join)"
        key = "gateway needs an API key" if self.api_key else "gateway open to any client"
        return f"TLS, mutually authenticated (libp2p peer ids); {swarm}; {key}"


@dataclass
class NodeSpec:
    name: str
    args: list[str]  # dsd-node arguments
    address: str  # where the node's gRPC server listens (a bootstrap without gRPC: its libp2p TCP port)
    env: dict[str, str] = field(default_factory=dict)
    health: str = "grpc"  # "grpc": the gRPC health service says SERVING; "tcp": the port accepts connections


def plan(stages: int, model: str = "embedded:target", drafter: str | None = "embedded:drafter", threads: int = 1,
         extra: list[str] | None = None, link_delay_ms: float = 0.0, colocate: bool = False,
         trust: Trust | None = None, key_dir: Path | None = None) -> list[NodeSpec]:
    """N stages (layers split evenly), a drafter and a head wired by address, the head routing through the stages in order.

    colocate: the head runs in the first stage's process with the drafter beside it (one laptop as
    head + drafter + stage 0), so a round crosses N links: N-1 between stages and the verdict's return.
    link_delay_ms: every node puts the userspace link emulator in front of its port, so each link
    into a node adds that one-way delay.
    trust: plain text by default; with TLS every node gets its own identity in key_dir and stages may dial
    only the testnet's own addresses (--dial-allow).
    """
    extra = extra or []
    env = {"DSD_LINK_EMULATOR": "1", "DSD_LINK_DELAY_MS": str(link_delay_ms)} if link_delay_ms > 0 else {}
    ranges = split_layers(model_num_layers(model), stages)
    specs = [_stage(f"stage{i}", model, a, b, threads, extra, env) for i, (a, b) in enumerate(ranges) if not (colocate and i == 0)]
    route = [s.address for s in specs]
    if colocate:
        head_args = ["--role", "head,drafter,stage" if drafter else "head,stage", "--layers", f"{ranges[0][0]}:{ranges[0][1]}",
                     *(["--drafter", drafter] if drafter else [])]
        route = ["self", *route]
    else:
        head_args = ["--role", "head"]
        if drafter:
            specs.append(_drafter(model=drafter, threads=threads, extra=extra))
            head_args += ["--drafter-addr", specs[-1].address]
    head_args += ["--route", ",".join(route)]
    specs.append(_head(head_args, model, threads, extra, env))
    return _with_trust(specs, trust or Trust(), key_dir, static=True)


def _with_trust(specs: list[NodeSpec], trust: Trust, key_dir: Path | None, static: bool) -> list[NodeSpec]:
    """Add each node's trust flags (and, wired by address with TLS, an identity of its own and --dial-allow)."""
    addrs = [s.address for s in specs]
    for s in specs:
        head = "head" in s.args[s.args.index("--role") + 1].split(",")
        s.args += trust.args(head)
        if static and trust.tls:
            key_dir = Path(key_dir or tempfile.mkdtemp(prefix="dsd-keys-"))
            s.args += ["--identity", str(key_dir / f"{s.name}.key")]
            s.args += [a for addr in addrs for a in ("--dial-allow", addr)]
    return specs


def plan_discovery(stages: int, replicas: int = 1, model: str = "embedded:target", drafter: str | None = "embedded:drafter",
                   threads: int = 1, extra: list[str] | None = None, key_dir: Path | None = None,
                   announce_ttl: float = 30.0, trust: Trust | None = None) -> list[NodeSpec]:
    """A bootstrap peer, `replicas` copies of each of N shards and a drafter announcing themselves, and a head
    that finds its route through libp2p discovery (nobody is wired by address)."""

    key_dir = Path(key_dir or tempfile.mkdtemp(prefix="dsd-keys-"))
    boot_port = free_port()
    boot_key = key_dir / "bootstrap.key"
    boot = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{load_or_create_identity(boot_key).peer_id}"

    def p2p(name: str) -> list[str]:
        return ["--identity", str(key_dir / f"{name}.key"), "--listen-p2p", f"/ip4/127.0.0.1/tcp/{free_port()}",
                "--bootstrap", boot, "--announce-ttl", str(announce_ttl)]

    extra = extra or []
    addr = f"127.0.0.1:{free_port()}"
    specs = [NodeSpec("bootstrap", ["--role", "bootstrap", "--identity", str(boot_key), "--listen-p2p",
                                    f"/ip4/127.0.0.1/tcp/{boot_port}", "--listen", addr], addr)]
    for i, (a, b) in enumerate(split_layers(model_num_layers(model), stages)):
        for r in range(replicas):
            name = f"stage{i}" + (f"r{r}" if replicas > 1 else "")
            specs.append(_stage(name, model, a, b, threads, [*extra, *p2p(name)], {}))
    head_args = ["--role", "head"]
    if drafter:
        specs.append(_drafter(model=drafter, threads=threads, extra=[*extra, *p2p("drafter")]))
        head_args += ["--drafter-addr", specs[-1].address]
    specs.append(_head([*head_args, *p2p("head")], model, threads, extra, {}))
    return _with_trust(specs, trust or Trust(), key_dir, static=False)


def _stage(name: str, model: str, a: int, b: int, threads: int, extra: list[str], env: dict[str, str]) -> NodeSpec:
    addr = f"127.0.0.1:{free_port()}"
    return NodeSpec(name, ["--role", "stage", "--model", model, "--layers", f"{a}:{b}", "--listen", addr,
                           "--threads", str(threads), *extra], addr, env)


def _drafter(model: str, threads: int, extra: list[str]) -> NodeSpec:
    addr = f"127.0.0.1:{free_port()}"
    return NodeSpec("drafter", ["--role", "drafter", "--model", model, "--listen", addr, "--threads", str(threads),
                                *extra], addr)


def _head(args: list[str], model: str, threads: int, extra: list[str], env: dict[str, str]) -> NodeSpec:
    addr = f"127.0.0.1:{free_port()}"
    return NodeSpec("head", [*args, "--model", model, "--listen", addr, "--threads", str(threads), *extra], addr, env)


class Testnet:
    """Start the planned nodes as child processes; `gateway` is the head's address once `up()` returns."""

    __test__ = False  # not a pytest test class

    def __init__(self, specs: list[NodeSpec], log_dir: Path | None = None, quiet: bool = True,
                 temp_dirs: list[Path] | None = None, tls: bool | None = None):
        """temp_dirs: folders remove_temp_dirs() deletes (e.g. plan_discovery's key_dir), with the log folder
        when it is a temporary one (no log_dir given)."""
        self.specs = specs
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="dsd-testnet-"))
        self.temp_dirs = [Path(d) for d in temp_dirs or []] + ([] if log_dir else [self.log_dir])
        self.quiet = quiet
        # TLS health checks unless every node is --insecure (tls=None: read it from the specs)
        self.tls = tls if tls is not None else not all(_insecure(s) for s in specs if s.health == "grpc")
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def gateway(self) -> str:
        """The address of the node with the head role."""
        for s in self.specs:
            if "--role" in s.args and "head" in s.args[s.args.index("--role") + 1].split(","):
                return s.address
        raise RuntimeError("this testnet has no head node")

    def start(self, spec: NodeSpec) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{spec.name}.log", "w")  # noqa: SIM115 (owned by the child)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        # a node whose links are emulated runs behind the userspace link emulator (the daemon knows nothing of it)
        module = "netem.emulated_node" if emulator_requested(env) else "dsd_node.node_cli"
        p = subprocess.Popen([sys.executable, "-m", module, *spec.args], stdout=log,
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
                    if spec.health == "tcp":
                        await _wait_tcp(spec.address)
                    else:
                        await wait_healthy(spec.address, timeout=2, tls=self.tls and not _insecure(spec))
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

    def remove_temp_dirs(self) -> None:
        """Delete the temporary folders (logs, private keys); call after down()."""
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)

    async def __aenter__(self) -> Testnet:
        try:
            await self.up()
        except BaseException:
            self.down()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.down()
        self.remove_temp_dirs()


def _insecure(spec: NodeSpec) -> bool:
    """Whether the node runs with plain-text links (--insecure, or DSD_INSECURE in its environment or ours)."""
    env = spec.env.get("DSD_INSECURE", os.environ.get("DSD_INSECURE", ""))
    return "--insecure" in spec.args or env.lower() in ("1", "true", "yes", "on")


async def _wait_tcp(address: str, timeout: float = 2.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection(host, int(port))
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} does not accept connections") from None
            await asyncio.sleep(0.2)
