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
import contextlib
import io
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from dsd_node.ops.testnet import NodeSpec

ROOT = Path(__file__).resolve().parents[2]  # the repository (in the image: /app)
IMAGE_ROOT = "/app"  # where the Dockerfile puts the repository
CLIENT = "client"
NODE_COMMANDS = ("dsd-node", "dsd-bootstrap")
NETEM_ENV = ("DSD_LINK_DELAY_MS", "DSD_LINK_JITTER_MS", "DSD_LINK_LOSS_PCT", "DSD_LINK_RATE", "DSD_NETEM_FALLBACK")
SELF_HOSTS = ("{hostname}", "{ip}", "0.0.0.0", "[::]")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_TCP_ADDR = re.compile(r"^/(?:dns4?|ip4)/([^/]+)/tcp/(\d+)(/.*)?$")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose variable substitution (`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$$`) in every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1) or m.group(4), m.group(2), m.group(3) or ""
        val = env.get(name)
        if op in (":-", ":?") and not val or op in ("-", "?") and val is None:
            if op and op.endswith("?"):
                raise ValueError(f"variable {name} is required: {default}")
            return default
        return val or ""

    return _VAR.sub(sub, value)


def load_compose(path: Path | str, environ: Mapping[str, str] | None = None) -> dict:
    """The compose file as a dict, variables substituted from `environ` (default: os.environ), as compose does."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    return interpolate(doc, os.environ if environ is None else environ)


def command_of(service: Mapping) -> list[str]:
    """A service's `command` as an argv list (compose accepts a string or a list)."""
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def environment_of(service: Mapping) -> dict[str, str]:
    """A service's `environment` (mapping or KEY=VALUE list) as str -> str; keys without a value are left out."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items() if v is not None}


def node_args(service: Mapping) -> list[str]:
    """The dsd-node arguments of a node service (`dsd-bootstrap` becomes `--role bootstrap`); ValueError otherwise."""
    cmd = command_of(service)
    if not cmd or Path(cmd[0]).name not in NODE_COMMANDS:
        raise ValueError(f"command must start with {' or '.join(NODE_COMMANDS)}, got {cmd[:1] or 'nothing'}")
    return (["--role", "bootstrap"] if Path(cmd[0]).name == "dsd-bootstrap" else []) + cmd[1:]


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """parse_args that raises ValueError with argparse's message instead of exiting."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments") from None


def parse_node(service: Mapping) -> argparse.Namespace:
    """A node service's command parsed with dsd-node's own parser; adds `roles` (list) and `p2p_port` (int or None)."""
    from dsd_node.node_cli import build_parser

    ns = _parse(build_parser(), node_args(service))
    ns.roles = [r.strip() for r in (ns.role or "stage").split(",") if r.strip()]
    ns.p2p_port = int(ns.listen_p2p.rsplit("/", 1)[1]) if ns.listen_p2p else None
    return ns


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def host_path(container_path: str) -> Path | None:
    """The repository file behind an image path under /app (None for other paths)."""
    if container_path == IMAGE_ROOT or container_path.startswith(IMAGE_ROOT + "/"):
        return ROOT / container_path[len(IMAGE_ROOT):].lstrip("/")
    return None


def peer_id_of_key(path: Path) -> str:
    """Peer id of a libp2p identity file, read as is (no permission tightening, unlike load_or_create_identity)."""
    from libp2p.crypto.serialization import deserialize_private_key

    from dsd_node.p2p.identity import Identity

    return Identity.from_private_key(deserialize_private_key(path.read_bytes())).peer_id


def _host_ports(service: Mapping) -> list[tuple[int, str]]:
    """Published host ports of a service as (port, protocol); ephemeral ones (no host port) are left out."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            host, proto = p.get("published"), p.get("protocol", "tcp")
        else:
            spec, _, proto = str(p).partition("/")
            parts = spec.rsplit(":", 2)
            host = parts[-2] if len(parts) > 1 else None
        if host in (None, ""):
            continue
        lo, _, hi = str(host).partition("-")
        out += [(port, proto or "tcp") for port in range(int(lo), int(hi or lo) + 1)]
    return out


def _check_entrypoint(name: str, service: Mapping, compose_dir: Path) -> str | None:
    """None if the service runs behind netem/entrypoint.sh (its own `entrypoint` or its Dockerfile's ENTRYPOINT)."""
    if "entrypoint" in service:
        return None if "netem/entrypoint.sh" in str(service["entrypoint"]) else f"{name}: entrypoint does not run netem/entrypoint.sh"
    build = service.get("build")
    if build is None:
        return f"{name}: no build and no entrypoint, so the netem entrypoint cannot be checked"
    context = compose_dir / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
    try:
        text = dockerfile.read_text()
    except OSError as e:
        return f"{name}: cannot read {dockerfile}: {e}"
    if not re.search(r"^ENTRYPOINT\b.*netem/entrypoint\.sh", text, re.M):
        return f"{name}: {dockerfile.name} has no ENTRYPOINT running netem/entrypoint.sh"
    return None


def check_compose(path: Path | str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Consistency problems of a compose file (empty: ok); variables are substituted from `environ` (os.environ).

    Checks: every node service runs a parseable dsd-node command, has cap_add NET_ADMIN, the DSD_LINK_* /
    DSD_NETEM_FALLBACK environment, the netem entrypoint, a healthcheck probing its gRPC port (bootstrap: its p2p
    port), an --advertise naming itself and a --bootstrap peer; the stages cover each target model's layers
    exactly once; --bootstrap multiaddrs name a bootstrap service, its p2p port and its committed key's peer id;
    no host port is published twice; the client runs a valid `dsd` command whose --gateway is a head's port.
    """
    path = Path(path)
    try:
        doc = load_compose(path, environ)
    except (OSError, yaml.YAMLError, ValueError) as e:
        return [f"cannot read {path}: {e}"]
    return check_compose_doc(doc, path.parent)


def check_compose_doc(doc: Mapping, compose_dir: Path) -> list[str]:
    """check_compose on an already loaded (and interpolated) compose dict; relative build contexts use compose_dir."""
    problems: list[str] = []
    services: dict = doc.get("services") or {}
    if CLIENT not in services:
        problems.append(f"no '{CLIENT}' service")
    nodes: dict[str, argparse.Namespace] = {}
    for name, svc in services.items():
        if name == CLIENT:
            continue
        try:
            nodes[name] = ns = parse_node(svc)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if "NET_ADMIN" not in (svc.get("cap_add") or []):
            problems.append(f"{name}: cap_add lacks NET_ADMIN (tc netem needs it)")
        env = svc.get("environment") or {}
        keys = {e.split("=", 1)[0] for e in env} if isinstance(env, list) else set(env)
        missing = [k for k in NETEM_ENV if k not in keys]
        if missing:
            problems.append(f"{name}: environment lacks {', '.join(missing)}")
        if msg := _check_entrypoint(name, svc, compose_dir):
            problems.append(msg)
        grpc = "bootstrap" not in ns.roles or len(ns.roles) > 1
        port = _split(ns.listen)[1] if grpc and ns.listen else ns.p2p_port
        hc = svc.get("healthcheck") or {}
        test = hc.get("test")
        if not test or hc.get("disable") or test in (["NONE"], "NONE"):
            problems.append(f"{name}: no healthcheck")
        elif port is not None and f":{port}" not in " ".join(test if isinstance(test, list) else [test]):
            problems.append(f"{name}: healthcheck does not probe port {port}")
        if grpc and not ns.listen:
            problems.append(f"{name}: no --listen (gRPC) address")
        if grpc and ns.advertise and ns.listen:
            host, aport = _split(ns.advertise)
            if host not in (name, "{hostname}", "{ip}") or aport != _split(ns.listen)[1]:
                problems.append(f"{name}: --advertise {ns.advertise} is not this service's listen port "
                                f"({name}:{_split(ns.listen)[1]} or {{hostname}}:{_split(ns.listen)[1]})")
        if "bootstrap" not in ns.roles and not ns.bootstrap and not ns.route:
            problems.append(f"{name}: no --bootstrap peer, so it cannot be discovered")
    problems += _check_layers(nodes)
    problems += _check_bootstrap_addrs(nodes)
    seen: dict[tuple[int, str], str] = {}
    for name, svc in services.items():
        try:
            ports = _host_ports(svc)
        except ValueError as e:
            problems.append(f"{name}: bad ports entry: {e}")
            continue
        for key in ports:
            if key in seen:
                problems.append(f"host port {key[0]}/{key[1]} is published by both {seen[key]} and {name}")
            seen.setdefault(key, name)
    if CLIENT in services:
        problems += _check_client(services[CLIENT], nodes)
    return problems


def _check_layers(nodes: Mapping[str, argparse.Namespace]) -> list[str]:
    """Every target model (of a stage or a head) is covered by the stages' layer ranges exactly once."""
    from dsd_node.engine.models import model_num_layers

    ranges: dict[str, list[tuple[str, int, int | None]]] = {}
    for name, ns in nodes.items():
        model = ns.model or "embedded:target"
        if "stage" in ns.roles or "head" in ns.roles:
            ranges.setdefault(model, [])
        if "stage" in ns.roles:
            a, _, b = (ns.layers or ":").partition(":")
            try:
                ranges[model].append((name, int(a or 0), int(b) if b else None))
            except ValueError:
                ranges[model].append((name, -1, -1))
    problems = []
    for model, spans in ranges.items():
        try:
            n = model_num_layers(model)
        except Exception as e:  # unknown hub id, unreadable path...
            problems.append(f"model {model}: cannot read its layer count: {e}")
            continue
        count = [0] * n
        for name, a, b in spans:
            b = n if b is None else b
            if not 0 <= a < b <= n:
                problems.append(f"{name}: layers {a}:{b} outside 0:{n} of {model}")
                continue
            for i in range(a, b):
                count[i] += 1
        if gaps := [i for i, c in enumerate(count) if c == 0]:
            problems.append(f"model {model}: layers {_ranges_text(gaps)} are hosted by no stage")
        if dup := [i for i, c in enumerate(count) if c > 1]:
            problems.append(f"model {model}: layers {_ranges_text(dup)} are hosted by more than one stage "
                            "(replicas: use --scale, not a second service)")
    return problems


def _ranges_text(idx: list[int]) -> str:
    out: list[list[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return ", ".join(f"{a}:{b}" for a, b in out)


def _check_bootstrap_addrs(nodes: Mapping[str, argparse.Namespace]) -> list[str]:
    """Each --bootstrap multiaddr names a bootstrap service, its p2p port and the peer id of its committed key."""
    problems = []
    for name, ns in nodes.items():
        for addr in ns.bootstrap or []:
            m = re.match(r"^/dns4?/([^/]+)/tcp/(\d+)/p2p/([^/]+)$", addr)
            if not m:
                problems.append(f"{name}: --bootstrap {addr} is not /dns4/<service>/tcp/<port>/p2p/<peer id>")
                continue
            host, port, pid = m.group(1), int(m.group(2)), m.group(3)
            boot = nodes.get(host)
            if boot is None or "bootstrap" not in boot.roles:
                problems.append(f"{name}: --bootstrap names {host}, which is not a bootstrap service")
                continue
            if port != boot.p2p_port:
                problems.append(f"{name}: --bootstrap port {port} is not {host}'s --listen-p2p port {boot.p2p_port}")
            key = host_path(boot.identity or "")
            if key is None:
                problems.append(f"{host}: --identity {boot.identity} is not a committed key under {IMAGE_ROOT}/, "
                                "so its peer id is not fixed")
                continue
            try:
                if (want := peer_id_of_key(key)) != pid:
                    problems.append(f"{name}: --bootstrap peer id {pid} is not {key.name}'s peer id {want}")
            except Exception as e:
                problems.append(f"{host}: cannot read identity {key}: {e}")
    return problems


def _check_client(service: Mapping, nodes: Mapping[str, argparse.Namespace]) -> list[str]:
    """The client runs a valid `dsd ...` command; a --gateway names a head service's listen port."""
    from dsd_node.cli import build_parser

    cmd = command_of(service)
    if not cmd or Path(cmd[0]).name != "dsd":
        return [f"{CLIENT}: command must be a dsd command, got {cmd[:1] or 'nothing'}"]
    try:
        ns = _parse(build_parser(), cmd[1:])
    except ValueError as e:
        return [f"{CLIENT}: {e}"]
    gateway = getattr(ns, "gateway", None)
    if gateway:
        host, port = _split(gateway)
        head = nodes.get(host)
        if head is None or "head" not in head.roles or not head.listen or _split(head.listen)[1] != port:
            return [f"{CLIENT}: --gateway {gateway} is not a head service's gRPC port"]
    return []


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
    from dsd_node.ops.testnet import NodeSpec, free_port

    doc = load_compose(path, environ)
    services = {n: s for n, s in (doc.get("services") or {}).items() if n != CLIENT}
    workdir = Path(workdir or tempfile.mkdtemp(prefix="dsd-compose-"))
    ports: dict[tuple[str, int], int] = {}

    def local(service: str, port: int | str) -> int:
        return ports.setdefault((service, int(port)), free_port())

    def address(value: str, me: str) -> str:
        host, port = _split(value)
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
    host, port = _split(address)
    if tcp:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return None
        except OSError as e:
            return f"cannot connect to {address}: {e}"
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
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"dsd_node.ops.compose exec: cannot run {cmd[0]}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
