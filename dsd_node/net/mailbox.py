"""A FIFO with one consumer that waits for the next item, a deadline or another future, with no task per wait.

The stage's Forward loop and the head's verdict wait did `asyncio.wait({queue.get() task, failure future},
timeout)` for every message: a task, two done-callbacks and a timer each time, and one more loop turn before the
consumer ran. Here a wait is one future and one timer, and an item that is already there costs no wait at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


def _wake(waiter: asyncio.Future, *_) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Mailbox(Generic[T]):
    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        if self._waiter is not None:
            _wake(self._waiter)

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def wait(self, timeout: float | None = None, also: asyncio.Future | None = None) -> bool:
        """Wait until an item is there (True), or until `timeout` seconds pass or `also` is done (False)."""
        if self._items:
            return True
        if also is not None and also.done():
            return False
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
        def wake(_f: asyncio.Future) -> None:
            _wake(waiter)

        if also is not None:
            also.add_done_callback(wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            if also is not None:
                also.remove_done_callback(wake)
        return bool(self._items)
