"""docker-compose.yml as the one description of a DSD testnet: checks, a local-process mapping, container helpers.

    python -m dsd_node.ops.compose check [docker-compose.yml]   # list consistency problems, exit 1 if any
    python -m dsd_node.ops.compose specs [docker-compose.yml]   # the local processes `dsd testnet up --from` would run
    python -m dsd_node.ops.compose health [--tcp] HOST:PORT     # container health check: gRPC health service / TCP connect
    python -m dsd_node.ops.compose exec -- COMMAND [ARGS...]    # container entry: expand {hostname} / {ip}, then exec

Node services (every service but `client`) run `dsd-node ...` with container addresses (`0.0.0.0:6000`,
`stage1:6000`, `/dns4/bootstrap/tcp/4001/p2p/ID`, `/data/...`). `specs_from_compose` rewrites them onto
127.0.0.1 with a free port per (service, container port) and a temp dir per service, so the same commands run
as local processes. `{hostname}` / `{ip}` in an argument stand for the container's own hostname / address (so
`docker compose up --scale stage1=2` replicas advertise themselves); locally both mean 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dsd_node.ops.compose_check import NETEM_ENV, check_compose, check_compose_doc, peer_id_of_key
from dsd_node.ops.compose_file import (
    CLIENT,
    IMAGE_ROOT,
    NODE_COMMANDS,
    ROOT,
    command_of,
    environment_of,
    host_path,
    interpolate,
    load_compose,
    node_args,
    parse_node,
    split_address,
)
from netem.link_config import emulator_requested

if TYPE_CHECKING:
    from dsd_node.ops.testnet import NodeSpec

__all__ = [  # what outside code imports from here (the checks and the file reading live in their own modules)
    "CLIENT", "IMAGE_ROOT", "NETEM_ENV", "NODE_COMMANDS", "ROOT", "SELF_HOSTS", "check_compose", "check_compose_doc",
    "command_of", "environment_of", "expand_self", "health", "host_path", "interpolate", "load_compose", "main",
    "node_args", "parse_node", "peer_id_of_key", "specs_from_compose",
]

SELF_HOSTS = ("{hostname}", "{ip}", "0.0.0.0", "[::]")
_TCP_ADDR = re.compile(r"^/(?:dns4?|ip4)/([^/]+)/tcp/(\d+)(/.*)?$")


def _topological(services: Mapping[str, Mapping]) -> list[str]:
    """Service names, each after the services it depends_on (file order otherwise)."""
    out: list[str] = []

    def visit(name: str, stack: tuple[str, ...] = ()) -> None:
        if name in out or name in stack or name not in services:
            return
        deps = services[name].get("depends_on") or []
        for dep in deps if isinstance(deps, list) else list(deps):
            visit(dep, (*stack, name))
        out.append(name)

    for name in services:
        visit(name)
    return out


def specs_from_compose(path: Path | str, *, threads: int = 1, environ: Mapping[str, str] | None = None,
                       workdir: Path | None = None) -> list[NodeSpec]:
    """Every node service of the compose file as a local NodeSpec running the service's own dsd-node command.

    Addresses are rewritten onto 127.0.0.1 (a free port per service and container port), `/data/...` and other
    `--identity` paths become files in a per-service directory under `workdir` (default: a new temp dir; a key
    under /app/, e.g. the bootstrap's, is copied there from the repository with mode 0600). The service's
    environment is carried over; as there is no tc here, a requested link delay/jitter/rate turns on the userspace
    emulator (DSD_LINK_EMULATOR=1). `--threads` is added unless the command sets it. Spec names are the service
    names; a bootstrap-only service gets `health="tcp"` and its p2p address as `address`. ValueError if a node
    service's command is not a parseable dsd-node command with a --listen (bootstrap: --listen-p2p).
    """
    # lazy: dsd_node.ops.testnet imports torch (seconds), which `compose health` / `exec` must not pay for
    from dsd_node.ops.testnet import NodeSpec, free_port

    doc = load_compose(path, environ)
    services = {n: s for n, s in (doc.get("services") or {}).items() if n != CLIENT}
    workdir = Path(workdir or tempfile.mkdtemp(prefix="dsd-compose-"))
    ports: dict[tuple[str, int], int] = {}

    def local(service: str, port: int | str) -> int:
        return ports.setdefault((service, int(port)), free_port())

    def address(value: str, me: str) -> str:
        host, port = split_address(value)
        target = me if host in SELF_HOSTS else host if host in services else None
        return f"127.0.0.1:{local(target, port)}" if target else value

    def multiaddr(value: str, me: str) -> str:
        m = _TCP_ADDR.match(value)
        if not m:
            return value
        host = me if m.group(1) in SELF_HOSTS else m.group(1) if m.group(1) in services else None
        return f"/ip4/127.0.0.1/tcp/{local(host, m.group(2))}{m.group(3) or ''}" if host else value

    def identity(value: str, me: str) -> str:
        dest = workdir / me / Path(value.replace("{hostname}", me).replace("{ip}", "127.0.0.1")).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = host_path(value)
        if src is not None and not dest.exists():
            shutil.copyfile(src, dest)
            dest.chmod(0o600)
        return str(dest)

    rewrite = {"--listen": address, "--advertise": address, "--drafter-addr": address, "--listen-p2p": multiaddr,
               "--bootstrap": multiaddr, "--identity": identity,
               "--route": lambda v, me: ",".join(h if h == "self" else address(h, me) for h in v.split(","))}
    specs = []
    for name in _topological(services):
        ns = parse_node(services[name])
        raw, args = node_args(services[name]), []
        i = 0
        while i < len(raw):
            flag, eq, value = raw[i].partition("=")
            if flag in rewrite and (eq or i + 1 < len(raw)):
                value = value if eq else raw[i + 1]
                args += [flag, rewrite[flag](value, name)]
                i += 1 if eq else 2
            else:
                args.append(str(host_path(raw[i]) or raw[i]))
                i += 1
        grpc = "bootstrap" not in ns.roles or len(ns.roles) > 1
        if not (ns.listen if grpc else ns.p2p_port):
            raise ValueError(f"{name}: needs {'--listen' if grpc else '--listen-p2p'} to be run locally")
        if grpc and ns.threads is None:
            args += ["--threads", str(threads)]
        env = environment_of(services[name])
        if any(_requested(env.get(k)) for k in ("DSD_LINK_DELAY_MS", "DSD_LINK_JITTER_MS", "DSD_LINK_RATE")):
            env["DSD_LINK_EMULATOR"] = "1"
        addr = args[args.index("--listen") + 1] if grpc else f"127.0.0.1:{local(name, ns.p2p_port)}"
        specs.append(NodeSpec(name, args, addr, env, health="grpc" if grpc else "tcp"))
    return specs


def _requested(value: str | None) -> bool:
    """A DSD_LINK_* setting that asks for something ("25", "100mbit"; not "", "0", "0.0")."""
    try:
        return float(value or 0) != 0
    except ValueError:
        return True


def health(address: str, *, tcp: bool = False, timeout: float = 3.0) -> str | None:
    """None if the node at HOST:PORT is healthy (gRPC health service SERVING, or with tcp=True: accepts a
    connection), else why not. Imports only grpc, so it is cheap enough for a container HEALTHCHECK."""
    host, port = split_address(address)
    if tcp:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return None
        except OSError as e:
            return f"cannot connect to {address}: {e}"
    # lazy: `health --tcp` (the bootstrap's healthcheck, every 5 s) and `exec` (every container start) skip grpc
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            return f"{address}: {e.code().name}: {e.details()}"
    ok = r.status == health_pb2.HealthCheckResponse.SERVING
    return None if ok else f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}"


def expand_self(args: list[str], hostname: str | None = None) -> list[str]:
    """Replace `{hostname}` / `{ip}` in every argument with this machine's hostname / address."""
    hostname = hostname or socket.gethostname()
    ip = socket.gethostbyname(hostname) if any("{ip}" in a for a in args) else ""
    return [a.replace("{hostname}", hostname).replace("{ip}", ip) for a in args]


def main(argv: list[str] | None = None) -> int:
    """`python -m dsd_node.ops.compose check|specs|health|exec`."""
    ap = argparse.ArgumentParser(prog="python -m dsd_node.ops.compose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check", "specs"):
        sub.add_parser(name).add_argument("file", nargs="?", default="docker-compose.yml")
    h = sub.add_parser("health")
    h.add_argument("address")
    h.add_argument("--tcp", action="store_true", help="only check that the port accepts connections")
    h.add_argument("--timeout", type=float, default=3.0)
    sub.add_parser("exec").add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        problems = check_compose(args.file)
        print("\n".join(problems) or f"{args.file}: ok")
        return 1 if problems else 0
    if args.cmd == "specs":
        for s in specs_from_compose(args.file):
            print(f"{s.name} ({s.health} {s.address}): dsd-node {shlex.join(s.args)}")
        return 0
    if args.cmd == "health":
        why = health(args.address, tcp=args.tcp, timeout=args.timeout)
        print(why or f"{args.address}: healthy", file=sys.stderr if why else sys.stdout)
        return 1 if why else 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("exec: no command given")
    cmd = expand_self(cmd)
    if cmd[0] == "dsd-node" and emulator_requested():  # netem fallback: the userspace emulator in front of the node
        cmd = [sys.executable, "-m", "netem.emulated_node", *cmd[1:]]
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"dsd_node.ops.compose exec: cannot run {cmd[0]}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
