"""The Mailbox the stage loop and the head's verdict wait use instead of asyncio.wait on a queue.get task."""

import asyncio

import pytest

from dsd_node.net.mailbox import Mailbox


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_items_come_out_in_order_and_a_ready_item_needs_no_wait():
    async def main():
        box: Mailbox[int] = Mailbox()
        box.put_nowait(1)
        box.put_nowait(2)
        assert box.qsize() == 2
        assert await box.wait(0.0)
        assert [box.get_nowait(), box.get_nowait()] == [1, 2]
        assert box.empty()
        with pytest.raises(asyncio.QueueEmpty):
            box.get_nowait()
    run(main())


def test_wait_wakes_on_put_times_out_and_sees_the_other_future():
    async def main():
        loop = asyncio.get_running_loop()
        box: Mailbox[str] = Mailbox()
        loop.call_later(0.01, box.put_nowait, "x")
        assert await box.wait(5.0) and box.get_nowait() == "x"
        t0 = loop.time()
        assert not await box.wait(0.02)  # nothing came
        assert loop.time() - t0 >= 0.015
        failed = loop.create_future()
        loop.call_later(0.01, failed.set_result, "down")
        assert not await box.wait(5.0, failed)  # the other future ended the wait
        assert not await box.wait(5.0, failed)  # already done: no wait
        box.put_nowait("y")
        assert await box.wait(5.0, failed)  # an item is preferred over a failed future
    run(main())


def test_a_cancelled_wait_leaves_no_waiter_and_loses_no_item():
    async def main():
        box: Mailbox[int] = Mailbox()
        other = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(box.wait(5.0, other))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert box._waiter is None
        box.put_nowait(7)  # no waiter to wake: must not fail
        assert await box.wait(0.0) and box.get_nowait() == 7
        other.set_result(None)  # its callback was removed with the cancelled wait
    run(main())
