"""`dsd-node`: the node daemon. One process, one or more roles: stage, drafter, head (gateway), bootstrap.

Configuration: command-line flags, then DSD_* environment variables (e.g. DSD_MODEL, DSD_LAYERS,
DSD_LISTEN), then a YAML config file (--config, keys named like the flags: model, layers, listen...).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from dsd_node.daemon.config import ConfigError, NodeConfig

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
    ap.add_argument("--layers", help="stage: layer range A:B of the target to host, or auto: as many layers as fit in "
                                     "free memory (--max-mem-mb caps it), where the network covers least (default: all)")
    ap.add_argument("--max-mem-mb", dest="max_mem_mb", type=int,
                    help="stage with --layers auto: memory this node may use for its shard and KV caches (0: all free)")
    ap.add_argument("--listen", help="gRPC address HOST:PORT (default 127.0.0.1:0, a free port)")
    ap.add_argument("--advertise", help="address other nodes should use to reach this one (default: --listen)")
    ap.add_argument("--drafter", help="head: draft model to run in this process (hub id, path, embedded:drafter, self, "
                                      "or oracle:ALPHA: the target keeping its own token with probability ALPHA); "
                                      "drafter node: self or oracle:ALPHA drafts with --model as that oracle")
    ap.add_argument("--drafter-addr", dest="drafter_addr",
                    help="head: address of a drafter node, or several, comma-separated (replicas, tried in turn)")
    ap.add_argument("--drafter-model", dest="drafter_model",
                    help="head with --bootstrap: use the drafter nodes announcing this draft model (replicas; "
                         "with none reachable, rounds go without a draft, as in ar)")
    ap.add_argument("--route", help="head: comma-separated stage addresses, first stage first (or use --bootstrap)")
    ap.add_argument("--device", help="where to compute: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps "
                                     "(default auto)")
    ap.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                    help="compute dtype (default auto: the checkpoint's dtype on a GPU, float32 on a CPU)")
    ap.add_argument("--threads", type=int,
                    help="torch threads (default 0: the cores of this host shared among its dsd-node processes)")
    ap.add_argument("--max-sessions", dest="max_sessions", type=int, help="concurrent sessions: per stage, and generations per head (default 64)")
    ap.add_argument("--session-ttl", dest="session_ttl", type=float,
                    help="seconds without a new round before a session expires; commit-only messages do not renew (30)")
    ap.add_argument("--max-context", dest="max_context", type=int,
                    help="prompt + new tokens per session (default 0: the model's context)")
    ap.add_argument("--max-tree-nodes", dest="max_tree_nodes", type=int, help="draft tree nodes per round (256)")
    ap.add_argument("--max-branch", dest="max_branch", type=int, help="draft tree alternatives per level (16)")
    ap.add_argument("--max-draft-k", dest="max_draft_k", type=int, help="draft depth (main chain length) (64)")
    ap.add_argument("--max-client-sessions", dest="max_client_sessions", type=int,
                    help="head: generations running or queued per client, by the dsd-client metadata or the "
                         "client's IP (default 0: no quota)")
    ap.add_argument("--queue-size", dest="queue_size", type=int,
                    help="head: requests that wait for a slot when all --max-sessions are in use (64)")
    ap.add_argument("--queue-timeout", dest="queue_timeout", type=float,
                    help="head: seconds a request waits for a slot before RESOURCE_EXHAUSTED (30)")
    ap.add_argument("--max-message-mb", dest="max_message_mb", type=int, help="largest accepted message (64 MB)")
    ap.add_argument("--max-inflight", dest="max_inflight", type=int,
                    help="head: default most dsi rounds in flight (0: one per stage of the route)")
    ap.add_argument("--max-kv-mb", dest="max_kv_mb", type=int,
                    help="stage: refuse new sessions while the KV caches hold this many MB (0: no cap)")
    ap.add_argument("--round-timeout", dest="round_timeout", type=float,
                    help="head: longest wait for a verdict, in seconds (60); once rounds are measured, the wait "
                         "is a multiple of recent round times, at least --round-floor")
    ap.add_argument("--round-floor", dest="round_floor", type=float,
                    help="head: shortest wait for a verdict, in seconds (3): a hung stage costs about this much")
    ap.add_argument("--exclude-backoff", dest="exclude_backoff", type=float,
                    help="head: seconds a failed stage or drafter is kept out of routes the first time (5); each "
                         "further failure doubles it (up to 120 s), then it is probed and used again")
    ap.add_argument("--identity", help="libp2p identity key file (created on first start, mode 0600)")
    ap.add_argument("--bootstrap", action="append",
                    help="bootstrap peer multiaddr (repeatable; any node's p2p address works; unreachable ones "
                         "are retried in the background)")
    ap.add_argument("--listen-p2p", dest="listen_p2p", help="libp2p listen multiaddr, e.g. /ip4/0.0.0.0/tcp/4001")
    ap.add_argument("--announce-ttl", dest="announce_ttl", type=float,
                    help="seconds an announcement stays valid; refreshed every third of it (30)")
    ap.add_argument("--route-wait", dest="route_wait", type=float,
                    help="head: seconds to wait for stages covering every layer to appear (3600)")
    ap.add_argument("--http", help="head: serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /metrics) on HOST:PORT, or auto (127.0.0.1, a free port)")
    ap.add_argument("--metrics", help="serve Prometheus metrics at http://HOST:PORT/metrics (auto: a free port)")
    ap.add_argument("--api-key", dest="api_key", help="head: clients must present this key (HTTP: Authorization: "
                                                      "Bearer KEY; gRPC Generate: metadata dsd-api-key); prefer "
                                                      "DSD_API_KEY, which ps does not show")
    ap.add_argument("--insecure", action="store_true", default=None,
                    help="plain-text gRPC links without peer authentication (local testnets only; default: TLS "
                         "bound to the libp2p identity, mutually authenticated)")
    ap.add_argument("--swarm-key", dest="swarm_key", metavar="FILE",
                    help="private swarm: shared secret file (>= 32 bytes); records, certificates and calls of "
                         "peers without it are refused")
    ap.add_argument("--allow-peers", dest="allow_peers", metavar="FILE",
                    help="private swarm: only these peer ids (one a line) may call this node or be routed through")
    ap.add_argument("--dial-allow", dest="dial_allow", action="append",
                    help="node without discovery: addresses a round may name as next hop or reply_to (repeatable; "
                         "default: any)")
    ap.add_argument("--verify-fraction", dest="verify_fraction", type=float,
                    help="head with discovery: share of rounds re-run on independent replicas of the same layers, "
                         "besides the first round on a peer not yet vouched for; a peer that disagrees with the "
                         "majority is banned (default 0.05; 0: no verification)")
    ap.add_argument("--print-peer-id", dest="print_peer_id", action="store_true", help="print the peer id and exit")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--log-level", dest="log_level", help="debug, info, warning (default info)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        cfg = NodeConfig.resolve(vars(args), config_file=args.config or os.environ.get("DSD_CONFIG"))
    except ConfigError as e:
        raise SystemExit(f"dsd-node: {e}") from None
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    # lazy: torch, transformers and libp2p take seconds to import; --help and compose's parser need none of them
    from dsd_node.daemon.node import run_node
    from dsd_node.p2p.identity import load_or_create_identity

    if args.print_peer_id:
        print(load_or_create_identity(Path(cfg.identity or "~/.dsd/identity.key").expanduser()).peer_id)
        return
    try:
        asyncio.run(run_node(cfg))
    except KeyboardInterrupt:
        pass


def bootstrap_main(argv: list[str] | None = None) -> None:
    """`dsd-bootstrap`: shorthand for `dsd-node --role bootstrap`."""
    main(["--role", "bootstrap", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    main()
