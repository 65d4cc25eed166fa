"""What a different transport between stages could buy: a message relayed through a chain of processes over
gRPC aio bidi streams (what the stages use) and over length-prefixed frames on plain asyncio TCP streams.

    python tools/relay_floor.py [--relays 3] [--rounds 400] [--gap-ms 0,3] [--bytes 2200] [--out relay_floor.json]

The head sends a message to relay 1, each relay passes it on, the last one back to the head: relays + 1 hops
per round trip, as an ar round at N = relays + 1 with the head colocated with stage 0. --gap-ms makes each relay
hold the message that long (time.sleep, no CPU) before passing it on, as a stage's forward would, so the
processes sleep between messages as the stages do. The two transports run alternately (A, B, A, B), median ms
per round trip and per hop after the gaps. Loopback only; plain text (no TLS on either).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import time

import grpc

WARMUP = 50


def _identity(b: bytes) -> bytes:
    return b


def _grpc_server(port: int, on_message) -> grpc.aio.Server:
    async def forward(requests, context):
        async for m in requests:
            await on_message(m)
        return
        yield  # a stream-stream handler that sends nothing back

    handler = grpc.method_handlers_generic_handler("relay", {"F": grpc.stream_stream_rpc_method_handler(
        forward, request_deserializer=_identity, response_serializer=_identity)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server




async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    return await reader.readexactly(n)


async def _tcp_server(port: int, on_message) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await on_message(await _read_frame(reader))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):  # closed, or shutting down
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def _tcp_sender(port: int):
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def send(m: bytes) -> None:
        writer.write(struct.pack(">I", len(m)) + m)

    return send


async def _relay(kind: str, port: int, next_port: int, gap_s: float) -> None:
    out = None

    async def on_message(m: bytes) -> None:
        nonlocal out
        if gap_s:
            time.sleep(gap_s)  # a stage's forward: the loop is busy, nothing else runs
        if out is None:
            out = await _connect(kind, next_port, [])
        await out(m)

    if kind == "tcp":
        server = await _tcp_server(port, on_message)
        await server.serve_forever()
    else:
        server = _grpc_server(port, on_message)
        await server.start()
        await server.wait_for_termination()


async def _connect(kind: str, port: int, channels: list):
    """A send function to the process at `port`, once it listens (processes start in any order: up to 10 s)."""
    for _ in range(200):
        try:
            if kind == "tcp":
                return await _tcp_sender(port)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            await asyncio.wait_for(channel.channel_ready(), 0.5)
            return channel.stream_stream("/relay/F", request_serializer=_identity,
                                         response_deserializer=_identity)().write
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _run_relay(kind: str, port: int, next_port: int, gap_s: float) -> None:
    asyncio.run(_relay(kind, port, next_port, gap_s))


async def _head(kind: str, ports: list[int], rounds: int, size: int) -> list[float]:
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(m: bytes) -> None:
        got.put_nowait(m)

    if kind == "tcp":
        server = await _tcp_server(ports[0], on_message)
    else:
        server = _grpc_server(ports[0], on_message)
        await server.start()
    channels: list = []
    send = await _connect(kind, ports[1], channels)
    msg, times = os.urandom(size), []
    for _ in range(WARMUP + rounds):
        t = time.perf_counter()
        await send(msg)
        await asyncio.wait_for(got.get(), 10)
        times.append((time.perf_counter() - t) * 1e3)
    for channel in channels:
        await channel.close()
    if kind == "tcp":
        server.close()
    else:
        await server.stop(0)
    return times[WARMUP:]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def measure(kind: str, relays: int, rounds: int, size: int, gap_ms: float) -> list[float]:
    ports = _free_ports(relays + 1)  # ports[0]: the head's
    procs = [mp.Process(target=_run_relay, args=(kind, ports[i], ports[(i + 1) % len(ports)], gap_ms / 1e3),
                        daemon=True) for i in range(1, relays + 1)]
    for p in procs:
        p.start()
    try:
        return asyncio.run(_head(kind, ports, rounds, size))
    finally:
        for p in procs:
            p.kill()
            p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relays", type=int, default=3, help="relay processes (hops per round trip: relays + 1)")
    ap.add_argument("--rounds", type=int, default=400, help="timed round trips per run (after 50 warm-up ones)")
    ap.add_argument("--gap-ms", default="0,3", help="comma-separated: each relay holds a message this long")
    ap.add_argument("--bytes", type=int, default=2200, help="message size (an ar round's at hidden size 256)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each transport, alternating")
    ap.add_argument("--out", default="relay_floor.json")
    args = ap.parse_args()
    hops, rows = args.relays + 1, []
    for gap in (float(g) for g in args.gap_ms.split(",")):
        med: dict[str, list[float]] = {"grpc": [], "tcp": []}
        for _ in range(args.repeats):
            for kind in med:
                times = measure(kind, args.relays, args.rounds, args.bytes, gap)
                med[kind].append(statistics.median(times))
                print(f"gap {gap:g} ms, {kind}: median {med[kind][-1]:.3f} ms per round trip", flush=True)
        for kind, ms in med.items():
            per_hop = (statistics.median(ms) - args.relays * gap) / hops
            rows.append({"gap_ms": gap, "transport": kind, "round_trip_ms": statistics.median(ms), "runs": ms,
                         "per_hop_ms": per_hop})
    print(f"\n{hops} hops per round trip, {args.bytes} bytes, {args.rounds} round trips x {args.repeats} runs\n")
    print("| relay holds (ms) | transport | ms per round trip | ms per hop (without the holds) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['gap_ms']:g} | {r['transport']} | {r['round_trip_ms']:.3f} | {r['per_hop_ms']:.3f} |")
    with open(args.out, "w") as f:
        json.dump({"hops": hops, "bytes": args.bytes, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
