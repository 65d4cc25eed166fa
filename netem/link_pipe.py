"""One direction of an emulated link: chunks timestamped on read and written when due (delay, jitter, rate).

Runs on the relay's own event loop (see :class:`netem.link_emulator.LinkEmulator`), whose selector
(:class:`PreciseSelector`) sleeps with microsecond resolution while a delivery is pending.
"""

from __future__ import annotations

import asyncio
import random
import select
import selectors
import socket
from collections import deque

from netem.link_config import LinkConfig

READ_SIZE = 64 * 1024
_MAX_QUEUED_BYTES = 8 * 1024 * 1024  # per direction; reading pauses beyond this (TCP backpressure)
_MAX_BACKLOG_S = 0.05  # rate-limited links: stop reading when this much serialization is queued
_SEGMENT_S = 0.001  # rate-limited links: split chunks into pieces of ~1 ms of transmission
_MIN_SEGMENT = 1500  # ... but no smaller than one Ethernet frame
_FD_SETSIZE = 1024
_MAX_LEAD_S = 0.001  # never wake (and deliver) more than this early to compensate wake-up latency


class PreciseSelector(selectors.PollSelector):
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


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class WakeLatency:
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


class Pipe:
    """One direction of a relayed connection: timestamps chunks on read, writes them when due."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: LinkConfig,
                 rng: random.Random, wake: WakeLatency) -> None:  # fmt: skip
        self._reader, self._writer, self._rng, self._wake = reader, writer, rng, wake
        self._delay = config.delay_ms / 1e3
        self._jitter = config.jitter_ms / 1e3
        self._rate = config.rate_bps
        self._segment = max(_MIN_SEGMENT, int(self._rate / 8 * _SEGMENT_S)) if self._rate else READ_SIZE
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
            data = await self._reader.read(READ_SIZE)
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
