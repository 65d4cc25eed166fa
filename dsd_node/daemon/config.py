"""A node's configuration as one typed object: flags, then DSD_* environment variables, then a YAML file, then defaults.

Every field is named like its flag (`max_sessions` <- `--max-sessions`, `DSD_MAX_SESSIONS`, `max_sessions:` or
`max-sessions:` in YAML). Values from the environment and the file are converted to the field's type; a value
that does not convert, an unknown key or an unknown role is a ConfigError (one line, no traceback).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dsd_node.engine.limits import Limits

ROLES = ("stage", "drafter", "head", "bootstrap")


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message naming where the bad value came from."""


@dataclass
class NodeConfig:
    role: str = "stage"  # comma-separated roles
    model: str = "embedded:target"
    layers: str | None = None  # A:B, or "auto" (sized by free memory, where the network covers least); None: all
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    drafter: str | None = None
    drafter_addr: str | None = None  # comma-separated drafter addresses (replicas, tried in turn)
    drafter_model: str | None = None  # head with --bootstrap: also use the drafters announcing this model
    route: str | None = None  # comma-separated stage addresses ("self": this node's own stage)
    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto: the checkpoint's dtype on a GPU, float32 on a CPU
    threads: int = 0  # 0: this host's cores shared among the dsd-node processes running on it
    max_mem_mb: int = 0  # --layers auto: memory this node may use (0: what the device has free)
    max_sessions: int = 64
    session_ttl: float = 30.0  # seconds without new work before a session expires (commit-only does not renew)
    max_context: int = 0  # prompt + new tokens per session (0: the model's context)
    max_tree_nodes: int = 256  # draft tree nodes per round
    max_branch: int = 16
    max_draft_k: int = 64
    max_client_sessions: int = 0  # head: generations running or queued per client (0: no quota)
    queue_size: int = 64  # head: requests waiting for a slot when all max_sessions are in use
    queue_timeout: float = 30.0  # head: longest wait in that queue before RESOURCE_EXHAUSTED
    max_message_mb: int = 64
    max_inflight: int = 0
    max_kv_mb: int = 0
    round_timeout: float = 60.0  # the longest round deadline (and the one before any round was measured)
    round_floor: float = 3.0  # the shortest round deadline (else a multiple of recent round times)
    exclude_backoff: float = 5.0  # head: first exclusion of a failed peer, in seconds (doubles per failure)
    identity: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    listen_p2p: str | None = None
    log_level: str = "info"
    announce_ttl: float = 30.0
    route_wait: float = 3600.0
    http: str | None = None  # head: OpenAI-compatible HTTP API on HOST:PORT ("auto": 127.0.0.1, a free port)
    metrics: str | None = None  # Prometheus /metrics on HOST:PORT (the head's HTTP API serves it too)
    api_key: str | None = None  # clients must present it (HTTP: Authorization: Bearer KEY; gRPC: metadata dsd-api-key)
    # trust (see dsd_node/net/tls.py and the README's Security section)
    insecure: bool = False  # plain-text gRPC links, no peer authentication (local testnets only)
    swarm_key: str | None = None  # file with the private swarm's shared secret
    allow_peers: str | None = None  # file with the peer ids allowed to take part, one a line
    dial_allow: list[str] = field(default_factory=list)  # without discovery: the addresses messages may name
    verify_fraction: float = 0.05  # head with discovery: share of rounds re-run on independent replicas

    @property
    def roles(self) -> list[str]:
        return [r.strip() for r in self.role.split(",") if r.strip()]

    @property
    def route_addresses(self) -> list[str]:
        return [a.strip() for a in (self.route or "").split(",") if a.strip()]

    def limits(self) -> Limits:
        """The admission limits these settings give (dsd_node.engine.limits)."""
        return Limits(max_context=self.max_context, max_tree_nodes=self.max_tree_nodes, max_branch=self.max_branch,
                      max_draft_k=self.max_draft_k, max_sessions=self.max_sessions,
                      max_client_sessions=self.max_client_sessions, session_ttl_s=self.session_ttl,
                      queue_size=self.queue_size, queue_timeout_s=self.queue_timeout)

    def validate(self) -> None:
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise ConfigError(f"unknown role {','.join(bad) or '(none)'}; choose from {', '.join(ROLES)}")
        for name in ("threads", "max_sessions", "max_message_mb", "max_inflight", "max_kv_mb", "max_mem_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} cannot be negative")
        for name in ("round_timeout", "round_floor", "exclude_backoff"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ConfigError(f"verify_fraction must be between 0 and 1, got {self.verify_fraction}")
        if self.max_sessions < 1 or self.max_message_mb < 1:
            raise ConfigError("max_sessions and max_message_mb must be at least 1")
        try:
            self.limits()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if ":" not in self.listen:
            raise ConfigError(f"listen address {self.listen!r} is not HOST:PORT")
        for name in ("http", "metrics"):
            value = getattr(self, name)
            if value is not None and value != "auto" and not value.rpartition(":")[2].isdigit():
                raise ConfigError(f"{name} address {value!r} is not HOST:PORT (or auto)")
        if self.http and "head" not in self.roles:
            raise ConfigError("--http serves the head's API: give it to a node with the head role (--metrics works anywhere)")

    @classmethod
    def resolve(cls, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                config_file: str | None = None) -> NodeConfig:
        """Flags (None: not given), then DSD_<NAME> variables, then the YAML file, then the defaults."""
        environ = os.environ if environ is None else environ
        file_values = _read_yaml(config_file) if config_file else {}
        values = {}
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            for source, raw in ((f"--{f.name.replace('_', '-')}", flags.get(f.name)),
                                (f"DSD_{f.name.upper()}", environ.get(f"DSD_{f.name.upper()}")),
                                (f"{config_file}: {f.name}", file_values.get(f.name))):
                if raw is not None:
                    values[f.name] = _convert(raw, default, source)
                    break
        cfg = cls(**values)
        cfg.validate()
        return cfg


def _read_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} is not a mapping of keys to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = set(data) - {f.name for f in fields(NodeConfig)}
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    return data


def _convert(raw: Any, default: Any, source: str) -> Any:
    """`raw` (a string from the environment, or a YAML value) as the type of the field's default."""
    try:
        if isinstance(default, list):
            return [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else [str(s) for s in raw]
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
        if isinstance(default, (int, float)):
            return type(default)(raw)
        return str(raw)
    except (TypeError, ValueError):
        kind = "a number" if isinstance(default, (int, float)) else "a list"
        raise ConfigError(f"{source}: expected {kind}, got {raw!r}") from None
