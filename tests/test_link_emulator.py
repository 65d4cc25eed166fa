"""Tests of the userspace link emulator, over real sockets on 127.0.0.1.

Timing bounds are one-sided on purpose: a lower bound is the property (a byte is never
delivered before its delay), an upper bound only tells the right design from a wrong one
(delay once per direction, not twice; per chunk, not per connection) with room for a
loaded two-core CI machine. Precise figures belong to the benchmark, not here.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from netem.link_emulator import (  # noqa: E402
    LinkConfig,
    LinkEmulator,
    emulator_requested,
    main,
    measure_rtt,
    parse_rate,
    start_echo_server,
)

HOST = "127.0.0.1"


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await start_echo_server(HOST, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


def emulator(target_port: int, **config: float) -> LinkEmulator:
    return LinkEmulator(HOST, 0, HOST, target_port, LinkConfig(**config))


class Sink:
    """A server that records (arrival time, bytes) of everything it receives."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.chunks.append((time.perf_counter(), data))
        writer.close()
        self.done.set()

    def arrivals(self, msg_size: int) -> list[tuple[int, float]]:
        """(message index, arrival time) for fixed-size messages carrying their index."""
        out, buf = [], b""
        for t, data in self.chunks:
            buf += data
            while len(buf) >= msg_size:
                out.append((int.from_bytes(buf[:8], "big"), t))
                buf = buf[msg_size:]
        return out


async def send_spaced(port: int, sink: Sink, count: int, gap_s: float, msg_size: int = 64) -> list[float]:
    """Send ``count`` indexed messages ``gap_s`` apart; return the send times after the sink saw EOF."""
    reader, writer = await asyncio.open_connection(HOST, port)
    sent = []
    for i in range(count):
        if gap_s and i:
            await asyncio.sleep(gap_s)
        sent.append(time.perf_counter())
        writer.write(i.to_bytes(8, "big") + bytes(msg_size - 8))
        await writer.drain()
    writer.write_eof()
    await asyncio.wait_for(sink.done.wait(), 10)
    writer.close()
    return sent


async def start_sink() -> tuple[Sink, asyncio.Server, int]:
    sink = Sink()
    server = await asyncio.start_server(sink.handle, HOST, 0)
    return sink, server, server.sockets[0].getsockname()[1]


@pytest.mark.slow
async def test_rtt_without_delay_is_small(echo_port: int) -> None:
    async with emulator(echo_port) as em:
        rtts = await measure_rtt(HOST, em.port, 20)
    assert statistics.median(rtts) < 10, rtts  # no added delay


@pytest.mark.slow
@pytest.mark.parametrize("delay_ms", [10, 25])
async def test_rtt_is_twice_the_delay(echo_port: int, delay_ms: int) -> None:
    async with emulator(echo_port, delay_ms=delay_ms) as em:
        rtts = await measure_rtt(HOST, em.port, 20)
    assert min(rtts) > 2 * delay_ms - 1.0, rtts  # never early: the delay is applied each way
    assert statistics.median(rtts) < 3 * delay_ms, rtts  # once each way, not twice (that would be 4x)


@pytest.mark.slow
async def test_bandwidth_limit() -> None:
    sink, server, port = await start_sink()
    async with emulator(port, rate_bps=parse_rate("8mbit")) as em:
        reader, writer = await asyncio.open_connection(HOST, em.port)
        t0 = time.perf_counter()
        writer.write(os.urandom(200_000))
        writer.write_eof()
        await asyncio.wait_for(sink.done.wait(), 10)
        elapsed = sink.chunks[-1][0] - t0
        writer.close()
    server.close()
    assert sum(len(d) for _, d in sink.chunks) == 200_000
    assert 0.19 < elapsed < 0.4, elapsed  # 200 kB * 8 / 8 Mbit/s = 0.2 s; unlimited would be ~1 ms


@pytest.mark.slow
async def test_pipelining_keeps_throughput() -> None:
    """Messages sent while others are in flight are not held back: delay is per chunk, not per connection."""
    sink, server, port = await start_sink()
    async with emulator(port, delay_ms=25) as em:
        sent = await send_spaced(em.port, sink, 20, 0.0)  # back to back
        arrivals = sink.arrivals(64)
        assert [i for i, _ in arrivals] == list(range(20))
        assert 24 < (arrivals[-1][1] - sent[0]) * 1e3 < 150  # ~25 ms in total, not 20 * 25 = 500

        sink.chunks.clear()
        sink.done.clear()
        sent = await send_spaced(em.port, sink, 20, 0.002)  # spread over ~40 ms: all in flight together
        latencies = [(t - sent[i]) * 1e3 for i, t in sink.arrivals(64)]
    server.close()
    assert len(latencies) == 20
    assert min(latencies) > 24, latencies
    assert statistics.median(latencies) < 40, latencies  # store-and-forward would be >> 100


@pytest.mark.slow
async def test_jitter_varies_delay_but_never_reorders() -> None:
    sink, server, port = await start_sink()
    async with emulator(port, delay_ms=20, jitter_ms=8, seed=7) as em:
        sent = await send_spaced(em.port, sink, 60, 0.001)
    server.close()
    arrivals = sink.arrivals(64)
    assert [i for i, _ in arrivals] == list(range(60))
    times = [t for _, t in arrivals]
    assert times == sorted(times)
    latencies = [(t - sent[i]) * 1e3 for i, t in arrivals]
    assert min(latencies) > 20 - 8 - 1, latencies
    assert statistics.median(latencies) < 20 + 8 + 15, latencies
    assert max(latencies) - min(latencies) > 4, latencies  # jitter is really applied


@pytest.mark.slow
@pytest.mark.parametrize("config", [{"delay_ms": 3, "jitter_ms": 2, "seed": 1}, {"delay_ms": 1, "rate_bps": 400e6}])
async def test_byte_stream_integrity(echo_port: int, config: dict[str, float]) -> None:
    """1 MB of random bytes to an echo server and back, written in random-sized pieces, half-closed."""
    blob = os.urandom(1 << 20)
    async with emulator(echo_port, **config) as em:
        reader, writer = await asyncio.open_connection(HOST, em.port)

        async def write() -> None:
            rng, pos = random.Random(3), 0
            while pos < len(blob):
                n = rng.randint(1, 100_000)
                writer.write(blob[pos : pos + n])
                await writer.drain()
                pos += n
            writer.write_eof()

        _, echoed = await asyncio.wait_for(asyncio.gather(write(), reader.read()), 20)
        writer.close()
    assert echoed == blob  # read() returned at EOF: the echo server's close came through


@pytest.mark.slow
async def test_close_and_half_close_propagate() -> None:
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read())  # until the client's half-close arrives
        writer.write(b"bye")  # still allowed: only the client's side is closed
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    async with emulator(server.sockets[0].getsockname()[1], delay_ms=10) as em:
        reader, writer = await asyncio.open_connection(HOST, em.port)
        t0 = time.perf_counter()
        writer.write(b"hello")
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5)
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        writer.close()

        # The emulator's own shutdown closes live connections.
        reader, writer = await asyncio.open_connection(HOST, em.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    server.close()
    assert got[0] == b"hello"
    assert reply == b"bye"
    assert 19 < elapsed_ms < 60  # 10 ms each way; the half-close and the reply each crossed once


@pytest.mark.slow
async def test_refused_target_closes_client_and_emulator_keeps_serving() -> None:
    # The port stays bound (not listening) until the echo server takes it: connections to it are
    # refused, and no other process nor an outgoing connection (a TCP self-connect) can take it.
    probe = socket.socket()
    probe.bind((HOST, 0))
    port = probe.getsockname()[1]
    async with emulator(port, delay_ms=1) as em:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(HOST, em.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        probe.close()
        echo = await start_echo_server(HOST, port)
        try:
            rtts = await measure_rtt(HOST, em.port, 3)
        finally:
            echo.close()
    assert len(rtts) == 3


def _grpc_server() -> tuple[grpc.aio.Server, int]:
    async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(  # no serializers: messages are raw bytes
        "test.Echo",
        {"Bidi": grpc.stream_stream_rpc_method_handler(bidi), "Unary": grpc.unary_unary_rpc_method_handler(unary)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    return server, port


@pytest.mark.slow
async def test_grpc_through_emulator() -> None:
    server, port = _grpc_server()
    await server.start()
    try:
        async with emulator(port, delay_ms=25) as em:
            async with grpc.aio.insecure_channel(f"{HOST}:{em.port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 5)
                unary = channel.unary_unary("/test.Echo/Unary")
                assert await unary(b"warm-up", timeout=5) == b"warm-up"
                t0 = time.perf_counter()
                assert await unary(b"ping", timeout=5) == b"ping"
                unary_ms = (time.perf_counter() - t0) * 1e3

                call = channel.stream_stream("/test.Echo/Bidi")(timeout=10)
                rtts = []
                for i in range(5):
                    t0 = time.perf_counter()
                    await call.write(b"m%d" % i)
                    assert await call.read() == b"m%d" % i
                    rtts.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()  # pipelined: 20 messages in flight together
                for i in range(20):
                    await call.write(bytes([i]) * 1000)
                for i in range(20):
                    assert await call.read() == bytes([i]) * 1000
                burst_ms = (time.perf_counter() - t0) * 1e3
                big = os.urandom(256 * 1024)
                await call.write(big)
                assert await call.read() == big
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
    finally:
        await server.stop(None)
    assert 49 < unary_ms < 90, unary_ms  # one round trip (50 ms), not two
    assert min(rtts) > 49 and statistics.median(rtts) < 90, rtts
    assert burst_ms < 200, burst_ms  # about one round trip, not 20 (1 s)


@pytest.mark.slow
async def test_cli_relays_and_stops_on_sigterm(echo_port: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netem.link_emulator", "--listen", f"{HOST}:0", "--target", f"{HOST}:{echo_port}",
        "--delay-ms", "10", "--rate", "1gbit", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()  # type: ignore[union-attr]
        m = re.fullmatch(
            rf"link-emulator listening on 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:{echo_port} "
            r"\(delay 10\.0 ms, jitter 0\.0 ms, rate 1000 mbit/s\)\n",
            line,
        )
        assert m, line
        rtts = await measure_rtt(HOST, int(m.group(1)), 5)
        assert min(rtts) > 19 and statistics.median(rtts) < 35, rtts
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_rejects_bad_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--listen", f"{HOST}:0", "--target", f"{HOST}:1", "--rate", "fast"])
    assert exc.value.code == 2
    assert "invalid rate 'fast'" in capsys.readouterr().err


def test_parse_rate() -> None:
    assert parse_rate("10mbit") == 10e6
    assert parse_rate("1gbit") == 1e9
    assert parse_rate("500kbit") == 500e3
    assert parse_rate("1000") == 1000
    assert parse_rate("1.5Mbit") == 1.5e6
    assert parse_rate("1mbps") == 8e6  # tc: bps = bytes per second
    for bad in ("", "fast", "10 mbits", "-5mbit", "0"):
        with pytest.raises(ValueError, match="invalid rate"):
            parse_rate(bad)


def test_config_from_env() -> None:
    env = {"DSD_LINK_DELAY_MS": "25", "DSD_LINK_JITTER_MS": "2.5", "DSD_LINK_RATE": "100mbit", "DSD_LINK_SEED": "3"}
    assert LinkConfig.from_env(env) == LinkConfig(25, 2.5, 100e6, 3)
    assert LinkConfig.from_env({}) == LinkConfig()
    with pytest.raises(ValueError, match="DSD_LINK_DELAY_MS"):
        LinkConfig.from_env({"DSD_LINK_DELAY_MS": "abc"})
    assert emulator_requested({"DSD_LINK_EMULATOR": "1"})
    assert not emulator_requested({})
    with pytest.raises(ValueError):
        LinkConfig(delay_ms=-1)


@pytest.mark.slow
async def test_start_on_a_busy_port_raises_and_cleans_up(echo_port: int) -> None:
    em = LinkEmulator(HOST, echo_port, HOST, echo_port)
    with pytest.raises(OSError):
        await em.start()
    with pytest.raises(RuntimeError):
        _ = em.port
    await em.close()  # idempotent
