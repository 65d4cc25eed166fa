"""Userspace link emulator: an asyncio TCP relay that adds delay, jitter and a bandwidth limit.

It stands in for ``tc qdisc ... netem`` on kernels without the netem qdisc. Each accepted connection
is forwarded to a fixed target; every chunk is timestamped when it is read and delivered at
``arrival + serialization + delay (+ jitter)``, so a long-lived pipelined stream (HTTP/2, gRPC) keeps
its throughput: many chunks are in flight at once, exactly as on a real link. Bytes are never
reordered (a chunk is never delivered before the previous one), and EOF/half-close is delivered after
the data, with the same delay.

The relay runs its own event loop in a daemon thread, on a selector with microsecond timer
resolution (epoll rounds timeouts up to whole milliseconds), so its timing does not depend on how busy
the caller's event loop is.

Not emulated: packet loss (a TCP relay cannot drop bytes) and the extra round trip of the TCP
handshake. The rate limit applies per connection and direction.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import socket
import sys
import threading
import time
from contextlib import suppress

from netem.link_config import LinkConfig, emulator_requested, parse_rate
from netem.link_pipe import READ_SIZE, Pipe, PreciseSelector, WakeLatency, nodelay

__all__ = [
    "LinkConfig",
    "LinkEmulator",
    "emulator_requested",
    "measure_rtt",
    "parse_rate",
    "start_echo_server",
    "main",
]

log = logging.getLogger(__name__)


class LinkEmulator:
    """TCP relay ``listen_host:listen_port`` -> ``target_host:target_port`` through an emulated link.

    Use as ``async with LinkEmulator(...) as em: ... em.port``. listen_port 0 picks a free port.
    """

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int,
                 config: LinkConfig | None = None) -> None:  # fmt: skip
        self.listen_host, self.listen_port = listen_host, listen_port
        self.target_host, self.target_port = target_host, target_port
        self.config = config or LinkConfig()
        self._rng = random.Random(self.config.seed)
        self._wake = WakeLatency()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._accept_task: asyncio.Task[None] | None = None
        self._closing = False
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port actually listened on (useful with listen_port=0)."""
        if not self._port:
            raise RuntimeError("LinkEmulator is not started")
        return self._port

    async def start(self) -> None:
        """Start the relay thread and listen. Raises OSError if the address cannot be bound."""
        if self._loop is not None:
            raise RuntimeError("LinkEmulator already started")
        self._closing = False
        loop = self._loop = asyncio.SelectorEventLoop(PreciseSelector())
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name="link-emulator", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._listen(), loop))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, drop all relayed connections and stop the relay thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        self._port = 0
        if thread.is_alive():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._shutdown(), loop))
            loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        sock = socket.create_server((self.listen_host, self.listen_port), family=family, backlog=128)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        # Own accept loop rather than asyncio.start_server: on 3.11, closing a Server while a
        # connection is being accepted leaks that socket (the client then hangs instead of seeing EOF).
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(sock)
                except OSError as exc:  # e.g. out of file descriptors: keep serving
                    log.warning("link-emulator: accept failed: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                loop.create_task(self._handle(conn))
        finally:
            sock.close()

    async def _shutdown(self) -> None:
        """Runs on the relay loop: stop accepting, then end every task on it (all of them are ours)."""
        self._closing = True  # connections accepted from now on are dropped by _handle
        quiet = 0
        while quiet < 3:
            await asyncio.sleep(0)
            others = asyncio.all_tasks() - {asyncio.current_task()}
            quiet = 0 if others else quiet + 1
            for task in others:
                if task in self._handlers or task is self._accept_task:
                    task.cancel()  # handlers not started yet are left to run: they drop their socket
            if others:
                await asyncio.wait(others, timeout=1.0)

    async def _handle(self, conn: socket.socket) -> None:
        if self._closing:
            conn.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        writers: list[asyncio.StreamWriter] = []
        clean = False
        try:
            c_reader, c_writer = await asyncio.open_connection(sock=conn)
            writers.append(c_writer)
            try:
                t_reader, t_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError as exc:
                log.warning("link-emulator: cannot reach %s:%s: %s", self.target_host, self.target_port, exc)
                clean = True
                return
            writers.append(t_writer)
            for w in writers:
                nodelay(w)
            up = Pipe(c_reader, t_writer, self.config, self._rng, self._wake)
            down = Pipe(t_reader, c_writer, self.config, self._rng, self._wake)
            tasks = [asyncio.create_task(c) for c in (up.receive(), up.send(), down.receive(), down.send())]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
            errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
            clean = not errors
            if errors:
                log.debug("link-emulator: connection dropped: %r", errors[0])
        except asyncio.CancelledError:  # shutdown
            pass
        except Exception as exc:  # never let one connection disturb the relay
            log.warning("link-emulator: connection error: %r", exc)
        finally:
            if not writers:
                conn.close()
            for w in writers:
                if clean:
                    w.close()
                else:
                    w.transport.abort()
            self._handlers.discard(task)


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start a TCP echo server (on the running loop) that half-closes after echoing the peer's EOF."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay(writer)
        try:
            while data := await reader.read(READ_SIZE):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(echo, host, port)


async def measure_rtt(host: str, port: int, n: int = 20, size: int = 1) -> list[float]:
    """Ping-pong ``size`` bytes ``n`` times with an echo server at host:port; return RTTs in ms.

    One warm-up exchange (which also covers connection setup) is not counted.
    """
    reader, writer = await asyncio.open_connection(host, port)
    nodelay(writer)
    payload = b"p" * size
    rtts: list[float] = []
    try:
        for i in range(n + 1):
            t0 = time.perf_counter()
            writer.write(payload)
            await reader.readexactly(size)
            if i:
                rtts.append((time.perf_counter() - t0) * 1e3)
        return rtts
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _rate_arg(text: str) -> float:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nonneg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


async def _serve(args: argparse.Namespace) -> None:
    config = LinkConfig(args.delay_ms, args.jitter_ms, args.rate, args.seed)
    (lhost, lport), (thost, tport) = args.listen, args.target
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with LinkEmulator(lhost, lport, thost, tport, config) as em:
        print(f"link-emulator listening on {lhost}:{em.port} -> {thost}:{tport} ({config.describe()})", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m netem.link_emulator --listen H:P --target H:P --delay-ms D ...``."""
    p = argparse.ArgumentParser(prog="python -m netem.link_emulator", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT to listen on (port 0 = any free)")
    p.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward connections to")
    p.add_argument("--delay-ms", type=_nonneg, default=0.0, help="one-way delay per direction (ms)")
    p.add_argument("--jitter-ms", type=_nonneg, default=0.0, help="uniform +- jitter on the delay (ms)")
    p.add_argument("--rate", type=_rate_arg, default=None, help="bandwidth per direction, e.g. 10mbit, 1gbit")
    p.add_argument("--seed", type=int, default=None, help="seed for the jitter RNG")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"link-emulator: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
