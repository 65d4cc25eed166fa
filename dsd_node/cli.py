"""`dsd`: generate text (in one process or through a gateway), run a local testnet, inspect a network."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import grpc

from dsd_node.engine.config import GenerationConfig, Stats
from dsd_node.engine.local import LocalEngine
from dsd_node.net.client import ClientError, ClientResult, DsdClient, parse_gateway_address
from dsd_node.net.grpc_util import Channels, query_info
from dsd_node.net.tls import Membership, NodeTls, read_swarm_key
from dsd_node.ops.bench import register as register_bench
from dsd_node.ops.compose import specs_from_compose
from dsd_node.ops.generation_flags import (
    add_compute_flags,
    add_generate_command,
    add_generation_flags,
    generation_config,
    node_compute_args,
)
from dsd_node.ops.testnet import Testnet, Trust, plan, plan_discovery
from dsd_node.ops.testnet_console import HELP, Console
from dsd_node.ops.testnet_console import __doc__ as CONSOLE_DOC


def cmd_generate(args: argparse.Namespace) -> int:
    if args.gateway:
        parse_gateway_address(args.gateway)  # ValueError: one line, exit code 2, before anything else
    cfg = generation_config(args)
    if not args.local:
        return run_main(_generate_remote(args.gateway, args.prompt, cfg, args.json, _api_key(args),
                                         args.gateway_peer_id))
    if args.mode == "dsi":
        print("note: --local runs every stage in one process, so dsi has no link latency to hide", file=sys.stderr)
    eng = LocalEngine(args.model, None if args.mode == "ar" else args.drafter, args.stages, args.dtype,
                      args.device, args.threads)
    res = asyncio.run(eng.generate_async(args.prompt, cfg))  # on this thread: Ctrl-C cancels it at once
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(args.prompt + res.text)
        _print_stats(res.stats)
    return 0


def run_main(coro) -> int:
    """asyncio.run(coro), where SIGTERM cancels it as Ctrl-C does and gives exit code 143 (Ctrl-C still
    raises KeyboardInterrupt: 130 in main())."""
    async def guarded() -> int:
        task, terminated = asyncio.current_task(), asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: (terminated.set(), task.cancel()))
        try:
            return await coro
        except asyncio.CancelledError:
            if terminated.is_set():
                return 143
            raise

    return asyncio.run(guarded())


def _api_key(args: argparse.Namespace) -> str | None:
    return getattr(args, "api_key", None) or os.environ.get("DSD_API_KEY") or None


async def _generate_remote(gateway: str, prompt: str, cfg: GenerationConfig, as_json: bool,
                           api_key: str | None = None, peer_id: str | None = None) -> int:
    res = ClientResult()
    pending = "" if as_json else prompt  # the prompt is echoed with the first text, not before a connection error
    async with DsdClient(gateway, api_key=api_key, peer_id=peer_id) as c:
        try:
            async for chunk in c.stream(prompt, cfg, res):
                if not as_json:
                    sys.stdout.write(pending + chunk.text)
                    sys.stdout.flush()
                    pending = ""
        except ClientError as e:
            newline = "" if pending or as_json else "\n"  # end the streamed text's line first
            print(f"{newline}dsd: generation failed: {e}", file=sys.stderr)
            return 1
    if as_json:
        print(json.dumps(res.as_dict()))
    else:
        print(pending)
        _print_stats(res.stats)
    return 0


def _print_stats(st: Stats | None) -> None:
    if st is None:
        return
    print(f"[{st.mode}] {st.new_tokens} tokens in {st.wall_ms / 1e3:.2f} s: {st.tokens_per_s:.1f} tokens/s, "
          f"{st.rounds} rounds ({st.rounds_wasted} wasted), {st.tokens_per_round:.2f} tokens/round"
          + (f", {st.failovers} failovers" if st.failovers else "")
          + (f", {st.fallback_rounds} rounds without a draft (no drafter reachable: ar)" if st.fallback_rounds else ""),
          file=sys.stderr)


def cmd_testnet(args: argparse.Namespace) -> int:
    wired = args.no_discovery or args.link_delay_ms > 0 or args.colocate
    if args.from_file and args.http:
        raise ValueError("--http applies to the testnet's own head; with --from, add --http to the gateway "
                         "service's dsd-node command in the compose file")
    key_dir = Path(tempfile.mkdtemp(prefix="dsd-keys-"))  # removed with the testnet (the nodes' keys)
    if args.private:
        trust = Trust.private(key_dir, args.api_key)
    else:
        trust = Trust(tls=args.secure, api_key=args.api_key)
    if args.from_file:
        specs = specs_from_compose(Path(args.from_file), threads=args.threads, workdir=key_dir)  # its own devices
        wired = False
        what = f"every service of {args.from_file} as a local process ({', '.join(s.name for s in specs)})"
    elif wired:
        specs = plan(args.stages, args.model, args.drafter, threads=args.threads, link_delay_ms=args.link_delay_ms,
                     colocate=args.colocate, extra=node_compute_args(args), http=args.http, trust=trust,
                     key_dir=key_dir)
        what = f"{args.stages} stages + drafter + head, wired by address"
    else:
        specs = plan_discovery(args.stages, args.replicas, args.model, args.drafter, threads=args.threads,
                               extra=node_compute_args(args), key_dir=key_dir, http=args.http,
                               bootstraps=args.bootstraps, trust=trust)
        what = (f"{args.bootstraps} bootstrap(s) + {args.stages} shards x {args.replicas} replicas + drafter(s) + head, "
                "found through libp2p discovery")
    net = Testnet(specs, log_dir=args.log_dir, temp_dirs=[key_dir])
    print(f"starting testnet: {what} (logs in {net.log_dir})", file=sys.stderr)
    print(f"security: {trust.describe() if not args.from_file else 'as the compose file says'}", file=sys.stderr)

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
            from dsd_node.p2p.identity import Identity  # lazy: libp2p is slow to import

            channels = Channels(NodeTls.create(Identity.generate()) if trust.tls else None)
            try:
                hops = (await query_info(await channels.get(net.gateway))).route
            finally:
                await channels.close()
            route = " -> ".join(f"{h.address}[{h.layer_start}:{h.layer_end}]" for h in hops)
            boot = head.args[head.args.index("--bootstrap") + 1]
            print(f"bootstrap: {boot}\n  see the network: dsd route --bootstrap {boot}", file=sys.stderr)
        print(f"route: head -> {route} -> head", file=sys.stderr)
        if args.link_delay_ms:
            print(f"links: userspace link emulator, {args.link_delay_ms:g} ms one-way into every node "
                  "(this kernel has no netem qdisc; see netem/)", file=sys.stderr)
        print(f"gateway: {net.gateway}", file=sys.stderr)
        if net.http_url:
            print(f"OpenAI-compatible API: {net.http_url}   (model {args.model}; metrics: "
                  f"{net.http_url.removesuffix('/v1')}/metrics)", file=sys.stderr)
        if trust.swarm_key:
            print(f"swarm key: {trust.swarm_key} (removed with the testnet)", file=sys.stderr)
        if args.generate is not None:
            return await _generate_remote(net.gateway, args.generate, generation_config(args), args.json, trust.api_key)
        key = f" --api-key={trust.api_key}" if trust.api_key else ""
        print(f"try: dsd generate --gateway {net.gateway}{key} \"def fibonacci(n):\"   (Ctrl-C stops the testnet)",
              file=sys.stderr)
        if net.http_url:
            auth = f" -H 'Authorization: Bearer {trust.api_key}'" if trust.api_key else ""
            print(f"     curl {net.http_url}/completions -H 'Content-Type: application/json'{auth} "
                  f"-d '{{\"model\": \"{args.model}\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 32, "
                  f"\"temperature\": 0}}'", file=sys.stderr)
        console = Console(net)
        if console.attach_stdin():
            print(f"console: type a command and Enter ({HELP})", file=sys.stderr)
        try:
            while True:  # a node that exits is reported; the others keep serving (through replicas)
                await asyncio.sleep(0.5)
                console.check_exits()
        finally:
            console.detach_stdin()

    code = 1  # if body() raises
    try:
        code = run_main(body())
    except KeyboardInterrupt:
        code = 130
    finally:
        if code in (130, 143):
            print("\ndsd: interrupted: stopping the testnet", file=sys.stderr)
        _stop_testnet(net)
    return code


def _stop_testnet(net: Testnet) -> None:
    """Stop every node and remove the temp dirs, with Ctrl-C and SIGTERM ignored meanwhile (no orphans)."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        net.down()
        net.remove_temp_dirs()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cmd_route(args: argparse.Namespace) -> int:
    async def body() -> int:
        # lazy: libp2p takes seconds to import, and only `dsd route` needs it
        from dsd_node.p2p.discovery import Discovery, DiscoveryError
        from dsd_node.p2p.identity import Identity
        from dsd_node.p2p.peers import probe_all, route_of
        from dsd_node.p2p.routing import RouteError, format_route_table

        logging.disable(logging.ERROR)  # py-libp2p logs every failed dial of a dead peer: expected here
        try:
            membership = Membership(read_swarm_key(args.swarm_key) if args.swarm_key else None)
        except ValueError as e:
            print(f"dsd: {e}", file=sys.stderr)
            return 2
        me = Identity.generate()
        d = Discovery(me, bootstrap=args.bootstrap, swarm_key=membership.swarm_key)
        channels = Channels(NodeTls.create(me, membership), plaintext_fallback=True)
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
            if args.gateway:
                print(await _excluded_by(channels, args.gateway))
            if problem:
                print(problem)
                return 1
            print("route: " + " -> ".join(f"{h.grpc_address}[{h.layer_start}:{h.layer_end}]" for h in hops))
            for r in records:  # the heads' output verification: whom they banned
                if r.role == "head" and r.peer_id in rtt:
                    for ban in (await query_info(await channels.get(r.grpc_address, r.peer_id))).banned:
                        print(f"banned by head {r.peer_id}: {ban}")
            return 0
        except DiscoveryError as e:
            print(f"dsd: {e}", file=sys.stderr)
            return 1
        finally:
            await channels.close()
            await d.stop()

    return asyncio.run(body())


async def _excluded_by(channels: Channels, gateway: str) -> str:
    """The peers the head at `gateway` keeps out of its routes now, and why (from its Info reply)."""
    try:
        info = await query_info(await channels.get(gateway), timeout=5)
    except (grpc.aio.AioRpcError, OSError) as e:
        why = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
        return f"head {gateway}: no Info reply ({why})"
    rows = [f"head {gateway}: route {' -> '.join(h.address for h in info.route) or '(none yet)'}"]
    rows += [f"  excludes {e.address} for {e.remaining_s:.0f} s more (failure {e.failures} in a row): {e.reason}"
             for e in info.excluded] or ["  nobody excluded"]
    rows += [f"  banned (output verification): {ban}" for ban in info.banned]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsd", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    g = add_generate_command(sub)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("testnet", help="run a local network of node processes on 127.0.0.1")
    tsub = t.add_subparsers(dest="testnet_command", required=True)
    up = tsub.add_parser("up", help="start N stages, a drafter and a head; stay up until Ctrl-C (or --generate once)",
                         description="Start a local testnet with the embedded model pair (layers split evenly). "
                                     "A node that exits is reported and the testnet keeps running; commands typed "
                                     "on stdin break and mend nodes: " + HELP,
                         epilog=CONSOLE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--stages", type=int, default=4, help="stage processes (default 4)")
    up.add_argument("--model", default="embedded:target")
    up.add_argument("--drafter", default="embedded:drafter")
    add_compute_flags(up, "torch threads per node process (default 1: small models run fastest on one thread each)",
                      threads_default=1)
    up.add_argument("--from", dest="from_file", metavar="COMPOSE_FILE",
                    help="run every service of a docker-compose file (e.g. docker-compose.yml) as a local process "
                         "on loopback: the same commands the containers run")
    up.add_argument("--replicas", type=int, default=1,
                    help="copies of each shard and of the drafter (failover targets; default 1)")
    up.add_argument("--bootstraps", type=int, default=2,
                    help="bootstrap peers, each given to every node (one may die; default 2)")
    up.add_argument("--no-discovery", action="store_true",
                    help="wire nodes by address instead of a bootstrap peer and libp2p discovery")
    up.add_argument("--link-delay-ms", type=float, default=0.0,
                    help="one-way delay added to every link into a node (userspace link emulator)")
    up.add_argument("--colocate", action="store_true", help="run the head and drafter inside the first stage's process")
    up.add_argument("--http", metavar="HOST:PORT",
                    help="the head also serves the OpenAI-compatible HTTP API (and /metrics) there; auto: a free port")
    up.add_argument("--secure", action="store_true",
                    help="TLS links bound to each node's identity (default for a local testnet: --insecure plain text)")
    up.add_argument("--private", action="store_true",
                    help="a private authenticated swarm: TLS, a fresh swarm key and a gateway API key")
    up.add_argument("--api-key", dest="api_key", default=None, help="the gateway's API key (--private: a fresh one)")
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
    r.add_argument("--gateway", metavar="HOST:PORT",
                   help="also show the peers this head excludes from its routes now (backoff after failures) and why")
    r.add_argument("--swarm-key", dest="swarm_key", metavar="FILE", help="a private swarm's key (its records need it)")
    r.set_defaults(func=cmd_route)

    register_bench(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except ValueError as e:  # bad flag values, bad models: one line, no traceback
        print(f"dsd: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT
        print("\ndsd: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
