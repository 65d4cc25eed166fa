"""Subprocess entry for discovery tests: one Discovery peer per process, JSON lines on stdout.

    p2p_peer.py bootstrap [--port P] [--identity FILE]
    p2p_peer.py announce  --bootstrap ADDR --model M --layers A:B --num-layers L [--ttl S] [--interval S]
    p2p_peer.py garbage   --bootstrap ADDR --model M      (publishes junk under the model's keys)
    p2p_peer.py find      --bootstrap ADDR --model M [--hash H] [--poll S]   (prints every poll)

Every role prints {"event": "ready", "peer_id": ..., "addr": ...} once started, then runs until
killed (or stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsd_node.p2p.discovery import Discovery, model_key, record_key  # noqa: E402
from dsd_node.p2p.identity import Identity, load_or_create_identity  # noqa: E402
from dsd_node.p2p.records import NodeRecord  # noqa: E402

T0 = time.monotonic()


def emit(**kv: object) -> None:
    """Print one JSON line and flush."""
    print(json.dumps({"t": round(time.monotonic() - T0, 3), **kv}), flush=True)


async def wait_stdin_eof() -> None:
    """Return when the parent closes our stdin (or dies)."""
    await asyncio.to_thread(sys.stdin.read)


async def main(args: argparse.Namespace) -> None:
    ident = load_or_create_identity(args.identity) if args.identity else Identity.generate()
    disc = Discovery(ident, listen_port=args.port, bootstrap=[args.bootstrap] if args.bootstrap else [])
    await disc.start()
    emit(event="ready", peer_id=disc.peer_id, addr=disc.listen_addrs[0], start_s=round(time.monotonic() - T0, 3))
    tasks: list[asyncio.Task[None]] = []
    if args.role == "announce":
        start, end = (int(x) for x in args.layers.split(":"))

        def make() -> NodeRecord:
            return NodeRecord(
                peer_id=disc.peer_id, role="stage", model_id=args.model, model_hash=args.hash,
                layer_start=start, layer_end=end, num_layers=args.num_layers,
                grpc_address=f"127.0.0.1:{50000 + start}", version="test", tokens_per_s=10.0 + start,
                sessions=0, max_sessions=4, expires_at=time.time() + args.ttl,
            )  # fmt: skip

        await disc.announce(make())
        emit(event="announced")
        tasks.append(asyncio.create_task(disc.run_announcer(make, args.interval)))
    elif args.role == "garbage":

        async def publish_junk() -> int:
            dht = disc._dht
            assert dht is not None
            key = record_key(args.model, disc.peer_id).encode()
            dht.value_store.put(key, b"\x93garbage\xff not a record")  # bypasses our own validator
            pushed = 0
            for peer in dht.host.get_connected_peers():  # remote validators must refuse it
                try:
                    pushed += bool(await dht.value_store._store_at_peer(peer, key, b"\xc1junk"))
                except Exception:
                    pass
            await dht.provide(model_key(args.model))
            return pushed

        emit(event="garbage", accepted_by=await disc._call(publish_junk))
    elif args.role == "find":

        async def poll() -> None:
            while True:
                t = time.monotonic()
                recs = await disc.find(args.model, expected_model_hash=args.hash)
                emit(
                    event="found", find_ms=round((time.monotonic() - t) * 1000, 1), invalid=disc.invalid_seen,
                    records={r.peer_id: [r.layer_start, r.layer_end, r.grpc_address] for r in recs},
                )  # fmt: skip
                await asyncio.sleep(args.poll)

        tasks.append(asyncio.create_task(poll()))
    await wait_stdin_eof()
    for task in tasks:
        task.cancel()
    await disc.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["bootstrap", "announce", "garbage", "find"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--identity")
    p.add_argument("--bootstrap")
    p.add_argument("--model", default="test/model")
    p.add_argument("--hash", default="hash-1")
    p.add_argument("--layers", default="0:1")
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--ttl", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--poll", type=float, default=0.25)
    a = p.parse_args()
    logging.basicConfig(level=os.environ.get("P2P_LOG", "ERROR"), stream=sys.stderr)
    asyncio.run(main(a))
