"""Handing freed host memory back to the OS after sessions end.

A session's KV cache and activations are many medium-sized tensors allocated with malloc from several
threads (the asyncio worker threads that run rounds), so glibc spreads them over per-thread arenas and keeps
the freed pages: a stage's RSS only grows. `malloc_trim(0)` returns the free pages of every arena.
Where the C library is not glibc (musl, macOS) there is nothing to call and this does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time


def _malloc_trim():
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6").malloc_trim
    return None


class MemoryReturner:
    """Calls malloc_trim after sessions end, at most once per `min_interval_s` (a later call is scheduled)."""

    def __init__(self, min_interval_s: float = 1.0):
        self.min_interval_s = min_interval_s
        self._trim = _malloc_trim()
        self._last = 0.0
        self._scheduled: asyncio.TimerHandle | None = None
        self.trims = 0

    def trim_now(self) -> None:
        self._scheduled = None
        self._last = time.monotonic()
        if self._trim is not None:
            self._trim(0)
            self.trims += 1

    def freed(self) -> None:
        """Note that memory was freed: trim now, or once the interval has passed (inside an event loop)."""
        if self._trim is None or self._scheduled is not None:
            return
        wait = self._last + self.min_interval_s - time.monotonic()
        if wait <= 0:
            self.trim_now()
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next call trims
            self._scheduled = asyncio.get_running_loop().call_later(wait, self.trim_now)
