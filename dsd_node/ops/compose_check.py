"""Consistency checks of docker-compose.yml (`python -m dsd_node.ops.compose check`).

Every node service runs a parseable dsd-node command behind the netem entrypoint with NET_ADMIN and the link
settings, a healthcheck on its own port, and a way to be discovered; the stages cover each model's layers exactly
once; --bootstrap multiaddrs name a bootstrap service and its committed key's peer id; no host port is published
twice; the client runs a `dsd generate` whose --gateway is a head's port.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from dsd_node.ops.compose_file import (
    CLIENT,
    IMAGE_ROOT,
    command_of,
    host_path,
    load_compose,
    parse_node,
    parse_strict,
    split_address,
)

NETEM_ENV = ("DSD_LINK_DELAY_MS", "DSD_LINK_JITTER_MS", "DSD_LINK_LOSS_PCT", "DSD_LINK_RATE", "DSD_NETEM_FALLBACK")


def peer_id_of_key(path: Path) -> str:
    """Peer id of a libp2p identity file, read as is (no permission tightening, unlike load_or_create_identity)."""
    # lazy: libp2p takes a second to import; `compose health` / `exec` load this module and never need it
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
    no host port is published twice; the client runs a valid `dsd generate` whose --gateway is a head's port.
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
        port = split_address(ns.listen)[1] if grpc and ns.listen else ns.p2p_port
        hc = svc.get("healthcheck") or {}
        test = hc.get("test")
        if not test or hc.get("disable") or test in (["NONE"], "NONE"):
            problems.append(f"{name}: no healthcheck")
        elif port is not None and f":{port}" not in " ".join(test if isinstance(test, list) else [test]):
            problems.append(f"{name}: healthcheck does not probe port {port}")
        if grpc and not ns.listen:
            problems.append(f"{name}: no --listen (gRPC) address")
        if grpc and ns.advertise and ns.listen:
            host, aport = split_address(ns.advertise)
            if host not in (name, "{hostname}", "{ip}") or aport != split_address(ns.listen)[1]:
                problems.append(f"{name}: --advertise {ns.advertise} is not this service's listen port "
                                f"({name}:{split_address(ns.listen)[1]} or {{hostname}}:{split_address(ns.listen)[1]})")
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
    from dsd_node.engine.models import model_num_layers  # lazy: torch (seconds), not for `compose health` / `exec`

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


def _client_parser() -> argparse.ArgumentParser:
    """The `dsd generate` command line (what the client container runs), built by the same function as `dsd`'s."""
    from dsd_node.ops.generation_flags import add_generate_command  # lazy: imports torch (through the engine config)

    ap = argparse.ArgumentParser(prog="dsd")
    add_generate_command(ap.add_subparsers(dest="command", required=True))
    return ap


def _check_client(service: Mapping, nodes: Mapping[str, argparse.Namespace]) -> list[str]:
    """The client runs a valid `dsd generate` command; a --gateway names a head service's listen port."""
    cmd = command_of(service)
    if not cmd or Path(cmd[0]).name != "dsd":
        return [f"{CLIENT}: command must be a dsd command, got {cmd[:1] or 'nothing'}"]
    try:
        ns = parse_strict(_client_parser(), cmd[1:])
    except ValueError as e:
        return [f"{CLIENT}: {e}"]
    gateway = getattr(ns, "gateway", None)
    if gateway:
        host, port = split_address(gateway)
        head = nodes.get(host)
        if head is None or "head" not in head.roles or not head.listen or split_address(head.listen)[1] != port:
            return [f"{CLIENT}: --gateway {gateway} is not a head service's gRPC port"]
    return []
