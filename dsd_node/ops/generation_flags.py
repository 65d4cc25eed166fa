"""The `dsd generate` command line and the generation flags it shares with `dsd testnet up` (--mode,
--max-new-tokens, --draft-k, the draft tree's shape, sampling...).

A module of its own so that dsd_node.ops.compose_check can validate a client container's `dsd generate` command
with the very parser `dsd` uses, without importing dsd_node.cli (which imports dsd_node.ops.compose).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from dsd_node.engine.config import MODES, GenerationConfig, TreeShape
from dsd_node.engine.verify import DEFAULT_ADAPTIVE_MARGIN, DEFAULT_ADAPTIVE_TIE_MARGIN, SamplingParams

DEFAULT_PROMPT = "def fibonacci(n):\n"


def add_generation_flags(ap: argparse.ArgumentParser) -> None:
    """Add the "generation" argument group: mode, lengths, draft tree shape, sampling, output format."""
    g = ap.add_argument_group("generation")
    g.add_argument("--mode", choices=MODES, default="si",
                   help="ar: one token per pipeline pass; si: draft tree + one verification pass; "
                        "dsi: si with several rounds in flight (default si)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--draft-k", type=int, default=4, help="draft depth: tokens proposed per round (default 4)")
    g.add_argument("--max-inflight", type=int, default=0,
                   help="dsi: most rounds in flight (default 0: one per pipeline stage, trimmed when drafts are often rejected)")
    g.add_argument("--min-valid-prob", type=float, default=GenerationConfig.min_valid_prob,
                   help="dsi: send a round past the draft chain only when it is at least this likely to be used and "
                        f"the measured costs say it pays (default {GenerationConfig.min_valid_prob:g}; 0: whenever allowed)")
    for f in fields(TreeShape):  # one flag per field of the tree's shape
        g.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default, help=f.metadata["help"])
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples losslessly")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--adaptive", action="store_true",
                   help="lossy: also accept drafts the target nearly ties with its top token (defaults keep the "
                        "target's perplexity of the output within 10%% of greedy's; docs/bench.md)")
    g.add_argument("--adaptive-margin", type=float, default=DEFAULT_ADAPTIVE_MARGIN,
                   help="adaptive: accept a low-importance draft (whitespace, delimiters, function words) when "
                        f"p_top - p_draft <= this ({DEFAULT_ADAPTIVE_MARGIN:g})")
    g.add_argument("--adaptive-tie-margin", type=float, default=DEFAULT_ADAPTIVE_TIE_MARGIN,
                   help=f"adaptive: accept any draft when p_top - p_draft <= this (near-ties, {DEFAULT_ADAPTIVE_TIE_MARGIN:g})")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"} as JSON instead of streaming')


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig the generation flags ask for (ValueError for values that cannot be valid)."""
    sampling = SamplingParams.create(args.temperature, args.top_p, args.seed, args.adaptive, args.adaptive_margin,
                                     args.adaptive_tie_margin)
    cfg = GenerationConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, draft_k=args.draft_k,
                           max_inflight=args.max_inflight, min_valid_prob=args.min_valid_prob, sampling=sampling,
                           ignore_eos=args.ignore_eos,
                           tree=TreeShape(**{f.name: getattr(args, f.name) for f in fields(TreeShape)}))
    cfg.validate()
    return cfg


def add_generate_command(sub) -> argparse.ArgumentParser:
    """`dsd generate`: its own arguments and the generation flags (sub: the `dsd` parser's subparsers)."""
    g = sub.add_parser("generate", help="generate text, in this process (--local) or through a gateway",
                       description="Generate text with speculative decoding. With --local every stage runs in this "
                                   "process; with --gateway the request goes to a running network.")
    g.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="prompt text (default: a Python function header)")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the whole engine in this process")
    where.add_argument("--gateway", metavar="HOST:PORT", help="address of a head node")
    g.add_argument("--api-key", dest="api_key", default=None,
                   help="--gateway: the gateway's API key (default: the DSD_API_KEY environment variable)")
    g.add_argument("--gateway-peer-id", dest="gateway_peer_id", default=None,
                   help="--gateway: the head's peer id; its TLS certificate must prove it (default: trust the "
                        "certificate it presents)")
    g.add_argument("--model", default="embedded:target", help="--local: target model (hub id, path, embedded:target)")
    g.add_argument("--drafter", default="embedded:drafter", help="--local: draft model (hub id, path, embedded:drafter, self, oracle:ALPHA)")
    g.add_argument("--stages", type=int, default=2, help="--local: number of pipeline shards to cut (default 2)")
    add_compute_flags(g, "--local: torch threads (default 0: the cores of this machine, at most one per 512 of the "
                         "model's hidden size)")
    add_generation_flags(g)
    return g


def add_compute_flags(ap: argparse.ArgumentParser, threads_help: str, threads_default: int = 0) -> None:
    """--device, --dtype and --threads, as dsd-node takes them."""
    ap.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps (default auto)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="auto: the checkpoint's dtype on a GPU, float32 on a CPU (default auto)")
    ap.add_argument("--threads", type=int, default=threads_default, help=threads_help)


def node_compute_args(args: argparse.Namespace) -> list[str]:
    """The compute flags to hand to every node of a testnet."""
    return ["--device", args.device, "--dtype", args.dtype]
