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
import os
import random
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass

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

_READ_SIZE = 64 * 1024
_MAX_QUEUED_BYTES = 8 * 1024 * 1024  # per direction; reading pauses beyond this (TCP backpressure)
_MAX_BACKLOG_S = 0.05  # rate-limited links: stop reading when this much serialization is queued
_SEGMENT_S = 0.001  # rate-limited links: split chunks into pieces of ~1 ms of transmission
_MIN_SEGMENT = 1500  # ... but no smaller than one Ethernet frame
_FD_SETSIZE = 1024
_MAX_LEAD_S = 0.001  # never wake (and deliver) more than this early to compensate wake-up latency

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}  # fmt: skip


def parse_rate(text: str) -> float:
    """Parse a rate the way ``tc`` does and return bits per second.

    ``10mbit``, ``1gbit``, ``500kbit``, a bare number (bit/s); ``...bps`` means *bytes* per second,
    as in tc. Units are decimal (1 mbit = 10**6 bit). Raises ValueError with a readable message.
    """
    m = _RATE_RE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(
            f"invalid rate {text!r}: expected a positive number with an optional unit "
            "bit/kbit/mbit/gbit/tbit (bits per second) or bps/kbps/mbps/gbps (bytes per second, as in tc), "
            "e.g. 10mbit"
        )
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


@dataclass
class LinkConfig:
    """Link properties, applied to each direction of each relayed connection.

    delay_ms: one-way delay; jitter_ms: uniform +-jitter added to the delay (never reorders bytes);
    rate_bps: bandwidth limit in bit/s (None = unlimited); seed: seed of the jitter RNG.
    """

    delay_ms: float = 0
    jitter_ms: float = 0
    rate_bps: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError("rate_bps must be > 0 (or None for unlimited)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LinkConfig:
        """Build a config from DSD_LINK_DELAY_MS, DSD_LINK_JITTER_MS, DSD_LINK_RATE, DSD_LINK_SEED."""
        env = os.environ if env is None else env

        def num(name: str) -> float:
            raw = env.get(name, "").strip() or "0"
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None

        rate = env.get("DSD_LINK_RATE", "").strip()
        seed = env.get("DSD_LINK_SEED", "").strip()
        return cls(
            delay_ms=num("DSD_LINK_DELAY_MS"),
            jitter_ms=num("DSD_LINK_JITTER_MS"),
            rate_bps=parse_rate(rate) if rate not in ("", "0") else None,
            seed=int(seed) if seed else None,
        )

    def describe(self) -> str:
        """Human-readable summary, e.g. ``delay 25.0 ms, jitter 0.0 ms, rate unlimited``."""
        rate = "unlimited" if self.rate_bps is None else f"{self.rate_bps / 1e6:g} mbit/s"
        return f"delay {float(self.delay_ms):.1f} ms, jitter {float(self.jitter_ms):.1f} ms, rate {rate}"


def emulator_requested(env: Mapping[str, str] | None = None) -> bool:
    """True when the container entrypoint asked for the userspace emulator (DSD_LINK_EMULATOR=1)."""
    env = os.environ if env is None else env
    return env.get("DSD_LINK_EMULATOR", "").strip().lower() in ("1", "true", "yes")


class _PreciseSelector(selectors.PollSelector):
    """poll() selector that waits with select() (microsecond timeouts) whenever a timer is pending.

    Falls back to poll() (millisecond timeouts) if some descriptor does not fit in an fd_set.
    """

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        keys = list(self.get_map().values())
        if timeout is None or timeout <= 0 or any(k.fd >= _FD_SETSIZE for k in keys):
            return super().select(timeout)
        rfds = [k.fd for k in keys if k.events & selectors.EVENT_READ]
        wfds = [k.fd for k in keys if k.events & selectors.EVENT_WRITE]
        try:
            r, w, _ = select.select(rfds, wfds, [], timeout)
        except InterruptedError:
            return []
        rs, ws = set(r), set(w)
        by_fd = {k.fd: k for k in keys}
        ready = []
        for fd in rs | ws:
            events = (selectors.EVENT_READ if fd in rs else 0) | (selectors.EVENT_WRITE if fd in ws else 0)
            ready.append((by_fd[fd], events & by_fd[fd].events))
        return ready


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _WakeLatency:
    """Running median of how late the relay loop wakes up from timed sleeps (kernel + asyncio overhead).

    Sleeps end this much before a chunk is due, so deliveries are centred on the due time instead of
    being systematically ~0.1-0.5 ms late (which would add up over every hop of a round trip).
    """

    def __init__(self) -> None:
        self.lead = 0.0
        self._samples: deque[float] = deque(maxlen=63)
        self._count = 0

    def observe(self, late: float) -> None:
        """Record a wake-up that came ``late`` seconds after the time asked for."""
        self._samples.append(min(max(late, 0.0), _MAX_LEAD_S))
        self._count += 1
        if self._count < 8 or self._count % 8 == 0:
            self.lead = sorted(self._samples)[len(self._samples) // 2]


class _Pipe:
    """One direction of a relayed connection: timestamps chunks on read, writes them when due."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: LinkConfig,
                 rng: random.Random, wake: _WakeLatency) -> None:  # fmt: skip
        self._reader, self._writer, self._rng, self._wake = reader, writer, rng, wake
        self._delay = config.delay_ms / 1e3
        self._jitter = config.jitter_ms / 1e3
        self._rate = config.rate_bps
        self._segment = max(_MIN_SEGMENT, int(self._rate / 8 * _SEGMENT_S)) if self._rate else _READ_SIZE
        self._queue: deque[tuple[float, bytes | None]] = deque()  # (due time, data or None = EOF)
        self._queued = 0
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._link_free = 0.0  # when the emulated link finishes serializing what it already has
        self._last_due = 0.0

    def _due(self, now: float, size: int) -> float:
        t = now
        if self._rate:
            t = self._link_free = max(now, self._link_free) + size * 8 / self._rate
        t += self._delay
        if self._jitter:
            t += self._rng.uniform(-self._jitter, self._jitter)
        t = max(t, now, self._last_due)  # never deliver before the previous chunk
        self._last_due = t
        return t

    def _push(self, due: float, data: bytes | None) -> None:
        self._queue.append((due, data))
        self._queued += len(data or b"")
        if self._queued >= _MAX_QUEUED_BYTES:
            self._space.clear()
        self._ready.set()

    async def receive(self) -> None:
        """Read chunks until EOF, scheduling each for delivery."""
        loop = asyncio.get_running_loop()
        while True:
            await self._space.wait()
            if self._rate and (backlog := self._link_free - loop.time() - _MAX_BACKLOG_S) > 0:
                await asyncio.sleep(backlog)
            data = await self._reader.read(_READ_SIZE)
            now = loop.time()
            if not data:
                self._push(self._due(now, 0), None)
                return
            for i in range(0, len(data), self._segment):
                seg = data[i : i + self._segment]
                self._push(self._due(now, len(seg)), seg)

    async def send(self) -> None:
        """Write scheduled chunks at their due time; half-close the destination after EOF."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            lead = self._wake.lead
            wake_at = self._queue[0][0] - lead
            if wake_at > loop.time():
                await asyncio.sleep(wake_at - loop.time())
                self._wake.observe(loop.time() - wake_at)
                continue
            now, batch, eof = loop.time() + lead, [], False
            while self._queue and self._queue[0][0] <= now:
                data = self._queue.popleft()[1]
                if data is None:
                    eof = True
                    break
                batch.append(data)
            if batch:
                payload = b"".join(batch)
                self._writer.write(payload)
                self._queued -= len(payload)
                if self._queued < _MAX_QUEUED_BYTES:
                    self._space.set()
                await self._writer.drain()
            if eof:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return


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
        self._wake = _WakeLatency()
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
        loop = self._loop = asyncio.SelectorEventLoop(_PreciseSelector())
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
                _nodelay(w)
            up = _Pipe(c_reader, t_writer, self.config, self._rng, self._wake)
            down = _Pipe(t_reader, c_writer, self.config, self._rng, self._wake)
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
        _nodelay(writer)
        try:
            while data := await reader.read(_READ_SIZE):
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
    _nodelay(writer)
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
