"""The gateway's session slots: a fixed number of generations at once, a bounded FIFO queue with a deadline
for the rest, and an optional quota per client. Overload is answered with RESOURCE_EXHAUSTED, never a fault."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import AsyncIterator


class Busy(RuntimeError):
    """No slot: the queue is full, the wait passed its deadline, or the client is over its quota."""


class Admission:
    def __init__(self, slots: int, queue_size: int, queue_timeout_s: float, per_client: int = 0):
        self.slots, self.queue_size, self.queue_timeout_s, self.per_client = slots, queue_size, queue_timeout_s, per_client
        self.running = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.clients: Counter[str] = Counter()

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self.waiters)

    @contextlib.asynccontextmanager
    async def slot(self, client: str) -> AsyncIterator[float]:
        """Hold a slot for one generation; yields the seconds spent waiting in the queue."""
        if self.per_client and self.clients[client] >= self.per_client:
            raise Busy(f"client {client} already has {self.clients[client]} generations running or queued "
                       f"(quota {self.per_client}); retry when one ends")
        self.clients[client] += 1
        try:
            waited = await self._acquire()
            try:
                yield waited
            finally:
                self._release()
        finally:
            self.clients[client] -= 1
            if not self.clients[client]:
                del self.clients[client]

    async def _acquire(self) -> float:
        if self.running < self.slots and not self.queued:
            self.running += 1
            return 0.0
        if self.queued >= self.queue_size:
            raise Busy(f"gateway is full: {self.running}/{self.slots} generations running and {self.queued} queued "
                       f"(queue of {self.queue_size}); retry later")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiters.append(fut)
        t0 = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():  # a slot was handed over just as the wait ended: pass it on
                self._release()
            else:
                fut.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(fut)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise Busy(f"gateway is full: no session slot came free within the queue deadline of "
                       f"{self.queue_timeout_s:g} s ({self.running}/{self.slots} generations running); "
                       "retry later") from None
        return loop.time() - t0

    def _release(self) -> None:
        """Hand the slot to the first waiter still waiting, or free it."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1
