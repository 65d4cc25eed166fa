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

from dsd_node.engine.config import DrafterSpec
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
        return out + ([f"--api-key={self.api_key}"] if head and self.api_key else [])  # = : a key may begin with "-"

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
         http: str | None = None, trust: Trust | None = None, key_dir: Path | None = None) -> list[NodeSpec]:
    """N stages (layers split evenly), a drafter and a head wired by address, the head routing through the stages in order.

    colocate: the head runs in the first stage's process with the drafter beside it (one laptop as
    head + drafter + stage 0), so a round crosses N links: N-1 between stages and the verdict's return.
    link_delay_ms: every node puts the userspace link emulator in front of its port, so each link
    into a node adds that one-way delay.
    http: the head also serves the OpenAI-compatible API there (HOST:PORT, or auto: a free port on 127.0.0.1).
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
            specs.append(_drafter(drafter, model, threads=threads, extra=extra))
            head_args += ["--drafter-addr", specs[-1].address]
    head_args += ["--route", ",".join(route), *http_args(http)]
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


def http_args(http: str | None) -> list[str]:
    """The head's --http flag; auto becomes a free port chosen now, so the testnet knows its URL."""
    if not http:
        return []
    return ["--http", f"127.0.0.1:{free_port()}" if http == "auto" else http]


def plan_discovery(stages: int, replicas: int = 1, model: str = "embedded:target", drafter: str | None = "embedded:drafter",
                   threads: int = 1, extra: list[str] | None = None, key_dir: Path | None = None,
                   announce_ttl: float = 30.0, http: str | None = None, bootstraps: int = 1,
                   trust: Trust | None = None) -> list[NodeSpec]:
    """`bootstraps` bootstrap peers, `replicas` copies of each of N shards and of the drafter announcing
    themselves, and a head that finds its route and its drafters through libp2p discovery (nobody is wired
    by address). Every node is given every bootstrap peer, so any one of them may die."""

    key_dir = Path(key_dir or tempfile.mkdtemp(prefix="dsd-keys-"))
    boots: list[NodeSpec] = []
    multiaddrs: list[str] = []
    for b in range(bootstraps):
        name = "bootstrap" + (str(b + 1) if b else "")
        port, key = free_port(), key_dir / f"{name}.key"
        multiaddrs.append(f"/ip4/127.0.0.1/tcp/{port}/p2p/{load_or_create_identity(key).peer_id}")
        addr = f"127.0.0.1:{free_port()}"
        boots.append(NodeSpec(name, ["--role", "bootstrap", "--identity", str(key), "--listen-p2p",
                                     f"/ip4/127.0.0.1/tcp/{port}", "--listen", addr,
                                     *[a for m in multiaddrs[:-1] for a in ("--bootstrap", m)]], addr))

    def p2p(name: str) -> list[str]:
        return ["--identity", str(key_dir / f"{name}.key"), "--listen-p2p", f"/ip4/127.0.0.1/tcp/{free_port()}",
                *[a for m in multiaddrs for a in ("--bootstrap", m)], "--announce-ttl", str(announce_ttl)]

    extra = extra or []
    specs = list(boots)
    for i, (a, b) in enumerate(split_layers(model_num_layers(model), stages)):
        for r in range(replicas):
            name = f"stage{i}" + (f"r{r}" if replicas > 1 else "")
            specs.append(_stage(name, model, a, b, threads, [*extra, *p2p(name)], {}))
    head_args = ["--role", "head"]
    if drafter:
        for r in range(replicas):
            name = "drafter" + (str(r) if replicas > 1 else "")
            specs.append(_drafter(drafter, model, threads=threads, extra=[*extra, *p2p(name)], name=name))
        head_args += ["--drafter-model", DrafterSpec.parse(drafter, model).source]
    specs.append(_head([*head_args, *p2p("head"), *http_args(http)], model, threads, extra, {}))
    return _with_trust(specs, trust or Trust(), key_dir, static=False)


def _stage(name: str, model: str, a: int, b: int, threads: int, extra: list[str], env: dict[str, str]) -> NodeSpec:
    addr = f"127.0.0.1:{free_port()}"
    return NodeSpec(name, ["--role", "stage", "--model", model, "--layers", f"{a}:{b}", "--listen", addr,
                           "--threads", str(threads), *extra], addr, env)


def _drafter(drafter: str, target: str, threads: int, extra: list[str], name: str = "drafter") -> NodeSpec:
    """A drafter node running `drafter`; self / oracle:ALPHA run the target itself as the oracle."""
    addr = f"127.0.0.1:{free_port()}"
    model = ["--model", target, "--drafter", drafter] if DrafterSpec.parse(drafter, target).is_target else ["--model", drafter]
    return NodeSpec(name, ["--role", "drafter", *model, "--listen", addr, "--threads", str(threads), *extra], addr)


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
        return self._head().address

    @property
    def http_url(self) -> str | None:
        """The head's OpenAI-compatible API base URL (http://HOST:PORT/v1), if it serves one."""
        args = self._head().args
        if "--http" not in args:
            return None
        host, _, port = args[args.index("--http") + 1].rpartition(":")
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/v1"

    def _head(self) -> NodeSpec:
        for s in self.specs:
            if "--role" in s.args and "head" in s.args[s.args.index("--role") + 1].split(","):
                return s
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
                p.send_signal(signal.SIGCONT)  # a frozen (SIGSTOPped) node could not act on SIGTERM
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
