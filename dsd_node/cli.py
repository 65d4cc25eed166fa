"""`dsd`: generate text (in one process or through a gateway), run a local testnet, inspect a network."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from dsd_node.engine.head import MODES, GenerationConfig
from dsd_node.engine.verify import SamplingParams

DEFAULT_PROMPT = "def fibonacci(n):\n"


def add_generation_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("generation")
    g.add_argument("--mode", choices=MODES, default="si",
                   help="ar: one token per pipeline pass; si: draft tree + one verification pass; "
                        "dsi: si with several rounds in flight (default si)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--draft-k", type=int, default=4, help="draft depth: tokens proposed per round (default 4)")
    g.add_argument("--max-inflight", type=int, default=0,
                   help="dsi: most rounds in flight (default 0: one per pipeline stage, trimmed when drafts are often rejected)")
    g.add_argument("--branch", type=int, default=1, help="draft tree: alternatives per level at the first levels (1)")
    g.add_argument("--branch-depth", type=int, default=1, help="draft tree: levels that get alternatives (1)")
    g.add_argument("--max-nodes", type=int, default=0, help="draft tree: total nodes per round (default 0: no cap)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples losslessly")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--adaptive", action="store_true",
                   help="lossy: relax greedy acceptance for low-importance tokens (whitespace, delimiters, function words)")
    g.add_argument("--adaptive-margin", type=float, default=0.05,
                   help="adaptive: accept a low-importance draft when p_top - p_draft <= this (0.05)")
    g.add_argument("--adaptive-tie-margin", type=float, default=0.01,
                   help="adaptive: accept any draft when p_top - p_draft <= this (near-ties, 0.01)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"} as JSON instead of streaming')


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    sampling = SamplingParams.create(args.temperature, args.top_p, args.seed, args.adaptive, args.adaptive_margin,
                                     args.adaptive_tie_margin)
    cfg = GenerationConfig(mode=args.mode, max_new_tokens=args.max_new_tokens, draft_k=args.draft_k,
                           max_inflight=args.max_inflight, sampling=sampling, ignore_eos=args.ignore_eos,
                           branch=args.branch, branch_depth=args.branch_depth, max_nodes=args.max_nodes)
    cfg.validate()
    return cfg


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    if args.local:
        from dsd_node.engine.local import LocalEngine

        if args.mode == "dsi":
            print("note: --local runs every stage in one process, so dsi has no link latency to hide", file=sys.stderr)
        eng = LocalEngine(args.model, None if args.mode == "ar" else args.drafter, args.stages, args.dtype)
        res = eng.generate(args.prompt, cfg)
        if args.json:
            print(json.dumps(res.as_dict()))
        else:
            print(args.prompt + res.text)
            _print_stats(res.stats.as_dict())
        return 0
    return asyncio.run(_generate_remote(args.gateway, args.prompt, cfg, args.json))


async def _generate_remote(gateway: str, prompt: str, cfg: GenerationConfig, as_json: bool) -> int:
    from dsd_node.net.client import ClientError, ClientResult, DsdClient

    res = ClientResult()
    async with DsdClient(gateway) as c:
        try:
            if not as_json:
                sys.stdout.write(prompt)
            async for chunk in c.stream(prompt, cfg, res):
                if not as_json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except ClientError as e:
            print(f"\ndsd: generation failed: {e}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(res.as_dict()))
    else:
        print()
        _print_stats(res.stats)
    return 0


def _print_stats(st: dict) -> None:
    apr = st.get("accepted_per_round") or [0]
    print(f"[{st['mode']}] {st['new_tokens']} tokens in {st['wall_ms'] / 1e3:.2f} s: {st['tokens_per_s']:.1f} tokens/s, "
          f"{st['rounds']} rounds ({st['rounds_wasted']} wasted), {sum(apr) / len(apr):.2f} tokens/round",
          file=sys.stderr)


def cmd_testnet(args: argparse.Namespace) -> int:
    from dsd_node.ops.testnet import Testnet, plan, plan_discovery

    wired = args.no_discovery or args.link_delay_ms > 0 or args.colocate
    if args.from_file:
        from pathlib import Path

        from dsd_node.ops.compose import specs_from_compose

        specs = specs_from_compose(Path(args.from_file), threads=args.threads)
        wired = False
        what = f"every service of {args.from_file} as a local process ({', '.join(s.name for s in specs)})"
    elif wired:
        specs = plan(args.stages, args.model, args.drafter, threads=args.threads, link_delay_ms=args.link_delay_ms,
                     colocate=args.colocate)
        what = f"{args.stages} stages + drafter + head, wired by address"
    else:
        specs = plan_discovery(args.stages, args.replicas, args.model, args.drafter, threads=args.threads)
        what = (f"bootstrap + {args.stages} shards x {args.replicas} replicas + drafter + head, "
                "found through libp2p discovery")
    net = Testnet(specs, log_dir=args.log_dir)
    print(f"starting testnet: {what} (logs in {net.log_dir})", file=sys.stderr)

    async def body() -> int:
        try:
            await net.up(progress=lambda m: print(m, file=sys.stderr))
        except RuntimeError as e:
            print(f"dsd: testnet failed to start: {e}", file=sys.stderr)
            return 1
        if wired:
            route = " -> ".join(f"{s.name}[{s.args[s.args.index('--layers') + 1]}]@{s.address}"
                                for s in sorted(specs, key=lambda s: s.name != "head") if "--layers" in s.args)
        else:
            head = next(s for s in specs if s.address == net.gateway)
            route = net.tail(head.name, 50).split("dsd-node route: ")[-1].splitlines()[0]
            boot = head.args[head.args.index("--bootstrap") + 1]
            print(f"bootstrap: {boot}\n  see the network: dsd route --bootstrap {boot}", file=sys.stderr)
        print(f"route: head -> {route} -> head", file=sys.stderr)
        if args.link_delay_ms:
            print(f"links: userspace link emulator, {args.link_delay_ms:g} ms one-way into every node "
                  "(this kernel has no netem qdisc; see netem/)", file=sys.stderr)
        print(f"gateway: {net.gateway}", file=sys.stderr)
        if args.generate is not None:
            return await _generate_remote(net.gateway, args.generate, generation_config(args), args.json)
        print(f"try: dsd generate --gateway {net.gateway} \"def fibonacci(n):\"   (Ctrl-C stops the testnet)",
              file=sys.stderr)
        while True:
            await asyncio.sleep(1)
            dead = [n for n, p in net.procs.items() if p.poll() is not None]
            if dead:
                print(f"dsd: {', '.join(dead)} exited; stopping the testnet", file=sys.stderr)
                return 1

    try:
        return asyncio.run(body())
    except KeyboardInterrupt:
        print("\nstopping testnet", file=sys.stderr)
        return 0
    finally:
        net.down()


def cmd_route(args: argparse.Namespace) -> int:
    async def body() -> int:
        from dsd_node.net.node_server import Channels
        from dsd_node.p2p.discovery import Discovery, DiscoveryError
        from dsd_node.p2p.identity import Identity
        from dsd_node.p2p.peers import probe_all, route_of
        from dsd_node.p2p.routing import RouteError, format_route_table

        logging.disable(logging.ERROR)  # py-libp2p logs every failed dial of a dead peer: expected here
        d = Discovery(Identity.generate(), bootstrap=args.bootstrap)
        channels = Channels()
        try:
            await d.start()
            found = {}
            for attempt in range(3):  # a new peer's first lookups may miss records while its routing table fills
                found.update({r.peer_id: r for r in await d.find(args.model)})
                records = sorted(found.values(), key=lambda r: (r.layer_start, r.peer_id))
                rtt = await probe_all(channels, records)
                try:
                    hops = route_of(records, rtt, max((r.num_layers for r in records), default=0), args.model)
                    problem = "" if records else f"no node announces model {args.model}"
                    break
                except RouteError as e:
                    problem = f"no complete route: {e}"
                    await asyncio.sleep(1.0 * (attempt + 1))
            if records:
                print(format_route_table(records, rtt))
            if problem:
                print(problem)
                return 1
            print("route: " + " -> ".join(f"{h.grpc_address}[{h.layer_start}:{h.layer_end}]" for h in hops))
            return 0
        except DiscoveryError as e:
            print(f"dsd: {e}", file=sys.stderr)
            return 1
        finally:
            await channels.close()
            await d.stop()

    return asyncio.run(body())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsd", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, in this process (--local) or through a gateway",
                       description="Generate text with speculative decoding. With --local every stage runs in this "
                                   "process; with --gateway the request goes to a running network.")
    g.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="prompt text (default: a Python function header)")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the whole engine in this process")
    where.add_argument("--gateway", metavar="HOST:PORT", help="address of a head node")
    g.add_argument("--model", default="embedded:target", help="--local: target model (hub id, path, embedded:target)")
    g.add_argument("--drafter", default="embedded:drafter", help="--local: draft model (hub id, path, embedded:drafter, self)")
    g.add_argument("--stages", type=int, default=2, help="--local: number of pipeline shards to cut (default 2)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    add_generation_flags(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("testnet", help="run a local network of node processes on 127.0.0.1")
    tsub = t.add_subparsers(dest="testnet_command", required=True)
    up = tsub.add_parser("up", help="start N stages, a drafter and a head; stay up until Ctrl-C (or --generate once)",
                         description="Start a local testnet with the embedded model pair (layers split evenly).")
    up.add_argument("--stages", type=int, default=4, help="stage processes (default 4)")
    up.add_argument("--model", default="embedded:target")
    up.add_argument("--drafter", default="embedded:drafter")
    up.add_argument("--threads", type=int, default=1, help="torch threads per node process (default 1)")
    up.add_argument("--from", dest="from_file", metavar="COMPOSE_FILE",
                    help="run every service of a docker-compose file (e.g. docker-compose.yml) as a local process "
                         "on loopback: the same commands the containers run")
    up.add_argument("--replicas", type=int, default=1, help="copies of each shard (failover targets; default 1)")
    up.add_argument("--no-discovery", action="store_true",
                    help="wire nodes by address instead of a bootstrap peer and libp2p discovery")
    up.add_argument("--link-delay-ms", type=float, default=0.0,
                    help="one-way delay added to every link into a node (userspace link emulator)")
    up.add_argument("--colocate", action="store_true", help="run the head and drafter inside the first stage's process")
    up.add_argument("--log-dir", default=None, help="where node logs go (default: a temporary folder)")
    up.add_argument("--generate", metavar="PROMPT", help="run one generation through the testnet, then stop it")
    add_generation_flags(up)
    up.set_defaults(func=cmd_testnet)

    r = sub.add_parser("route", help="show the nodes of a network and the route a head would take",
                       description="Join the network through a bootstrap peer, list every announced node "
                                   "(peer, role, layers, address, RTT, load) and the cheapest complete route.")
    r.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR",
                   help="bootstrap peer, e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3Koo... (repeatable)")
    r.add_argument("--model", default="embedded:target", help="model id the stages announce (default embedded:target)")
    r.set_defaults(func=cmd_route)

    from dsd_node.ops.bench import register as register_bench

    register_bench(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except ValueError as e:  # bad flag values, bad models: one line, no traceback
        print(f"dsd: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
