"""`dsd-node`: the node daemon. One process, one or more roles: stage, drafter, head (gateway), bootstrap.

Configuration: command-line flags, then DSD_* environment variables (e.g. DSD_MODEL, DSD_LAYERS,
DSD_LISTEN), then a YAML config file (--config, keys named like the flags: model, layers, listen...).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

ROLES = ("stage", "drafter", "head", "bootstrap")
DEFAULTS = {
    "role": "stage", "model": "embedded:target", "layers": None, "listen": "127.0.0.1:0", "drafter": None,
    "drafter_addr": None, "route": None, "dtype": "float32", "threads": 0, "max_sessions": 64,
    "session_ttl": 300.0, "max_message_mb": 64, "max_inflight": 0, "max_kv_mb": 0, "round_timeout": 60.0,
    "identity": None, "bootstrap": [], "listen_p2p": None, "log_level": "info", "advertise": None,
    "announce_ttl": 30.0, "route_wait": 3600.0,
}

EPILOG = """examples:
  dsd-node --role stage --model embedded:target --layers 0:4 --listen 127.0.0.1:6001
  dsd-node --role stage --model embedded:target --layers 4:8 --listen 127.0.0.1:6002
  dsd-node --role drafter --model embedded:drafter --listen 127.0.0.1:6100
  dsd-node --role head --model embedded:target --drafter-addr 127.0.0.1:6100 \\
           --route 127.0.0.1:6001,127.0.0.1:6002 --listen 127.0.0.1:6000
  dsd-node --role head,drafter,stage --model embedded:target --drafter embedded:drafter --layers 0:8
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsd-node", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    ap.add_argument("--role", help="comma-separated roles: stage, drafter, head, bootstrap (default stage)")
    ap.add_argument("--model", help="target model (stage, head) or draft model (drafter role alone): hub id, local "
                                    "path, or embedded:target / embedded:drafter (default embedded:target)")
    ap.add_argument("--layers", help="stage: layer range A:B of the target to host (default: all layers)")
    ap.add_argument("--listen", help="gRPC address HOST:PORT (default 127.0.0.1:0, a free port)")
    ap.add_argument("--advertise", help="address other nodes should use to reach this one (default: --listen)")
    ap.add_argument("--drafter", help="head: draft model to run in this process (hub id, path, embedded:drafter, self)")
    ap.add_argument("--drafter-addr", dest="drafter_addr", help="head: address of a drafter node")
    ap.add_argument("--route", help="head: comma-separated stage addresses, first stage first (or use --bootstrap)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default float32)")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    ap.add_argument("--max-sessions", dest="max_sessions", type=int, help="concurrent sessions (default 64)")
    ap.add_argument("--session-ttl", dest="session_ttl", type=float, help="idle seconds before a session expires (300)")
    ap.add_argument("--max-message-mb", dest="max_message_mb", type=int, help="largest accepted message (64 MB)")
    ap.add_argument("--max-inflight", dest="max_inflight", type=int,
                    help="head: default most dsi rounds in flight (0: one per stage of the route)")
    ap.add_argument("--max-kv-mb", dest="max_kv_mb", type=int,
                    help="stage: refuse new sessions while the KV caches hold this many MB (0: no cap)")
    ap.add_argument("--round-timeout", dest="round_timeout", type=float, help="head: seconds to wait for a verdict (60)")
    ap.add_argument("--identity", help="libp2p identity key file (created on first start, mode 0600)")
    ap.add_argument("--bootstrap", action="append", help="bootstrap peer multiaddr (repeatable)")
    ap.add_argument("--listen-p2p", dest="listen_p2p", help="libp2p listen multiaddr, e.g. /ip4/0.0.0.0/tcp/4001")
    ap.add_argument("--announce-ttl", dest="announce_ttl", type=float,
                    help="seconds an announcement stays valid; refreshed every third of it (30)")
    ap.add_argument("--route-wait", dest="route_wait", type=float,
                    help="head: seconds to wait for stages covering every layer to appear (3600)")
    ap.add_argument("--print-peer-id", dest="print_peer_id", action="store_true", help="print the peer id and exit")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--log-level", dest="log_level", help="debug, info, warning (default info)")
    return ap


def resolve_config(args: argparse.Namespace) -> dict:
    """Flags, then DSD_* environment variables, then the config file, then defaults."""
    file_cfg = {}
    cfg_path = args.config or os.environ.get("DSD_CONFIG")
    if cfg_path:
        try:
            file_cfg = yaml.safe_load(Path(cfg_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"dsd-node: cannot read config file {cfg_path}: {e}") from e
        file_cfg = {k.replace("-", "_"): v for k, v in file_cfg.items()}
        unknown = set(file_cfg) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"dsd-node: unknown keys in {cfg_path}: {', '.join(sorted(unknown))}")
    out = {}
    for key, default in DEFAULTS.items():
        val = getattr(args, key, None)
        if val is None:
            env = os.environ.get("DSD_" + key.upper())
            if env is not None:
                val = env.split(",") if isinstance(default, list) else type(default)(env) if default is not None and not isinstance(default, str) else env
        if val is None:
            val = file_cfg.get(key, default)
        out[key] = val
    roles = [r.strip() for r in str(out["role"]).split(",") if r.strip()]
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise SystemExit(f"dsd-node: unknown role {','.join(bad) or '(none)'}; choose from {', '.join(ROLES)}")
    out["roles"] = roles
    return out


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    logging.basicConfig(level=str(cfg["log_level"]).upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.print_peer_id:
        from dsd_node.p2p.identity import load_or_create_identity

        print(load_or_create_identity(Path(cfg["identity"] or "~/.dsd/identity.key").expanduser()).peer_id)
        return
    from dsd_node.daemon.node import run_node

    try:
        asyncio.run(run_node(cfg))
    except KeyboardInterrupt:
        pass


def bootstrap_main(argv: list[str] | None = None) -> None:
    """`dsd-bootstrap`: shorthand for `dsd-node --role bootstrap`."""
    main(["--role", "bootstrap", *(argv if argv is not None else sys.argv[1:])])


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


if __name__ == "__main__":
    main()
