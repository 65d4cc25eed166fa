"""Reading docker-compose.yml: variable substitution, service commands and environments, node arguments.

Shared by dsd_node.ops.compose (the local-process mapping, container helpers) and dsd_node.ops.compose_check
(the consistency checks). Imports nothing heavy: the container entry and health check load it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository (in the image: /app)
IMAGE_ROOT = "/app"  # where the Dockerfile puts the repository
CLIENT = "client"
NODE_COMMANDS = ("dsd-node", "dsd-bootstrap")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


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


def parse_strict(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """parse_args that raises ValueError with argparse's message instead of exiting."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments") from None


def parse_node(service: Mapping) -> argparse.Namespace:
    """A node service's command parsed with dsd-node's own parser; adds `roles` (list) and `p2p_port` (int or None)."""
    # lazy: dsd_node.node_cli imports the daemon (torch, libp2p: seconds), which `compose health` / `exec` must not pay for
    from dsd_node.node_cli import build_parser

    ns = parse_strict(build_parser(), node_args(service))
    ns.roles = [r.strip() for r in (ns.role or "stage").split(",") if r.strip()]
    ns.p2p_port = int(ns.listen_p2p.rsplit("/", 1)[1]) if ns.listen_p2p else None
    return ns


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` -> (HOST, PORT)."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def host_path(container_path: str) -> Path | None:
    """The repository file behind an image path under /app (None for other paths)."""
    if container_path == IMAGE_ROOT or container_path.startswith(IMAGE_ROOT + "/"):
        return ROOT / container_path[len(IMAGE_ROOT):].lstrip("/")
    return None
