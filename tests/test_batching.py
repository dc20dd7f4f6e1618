"""MicroBatcher on a real event loop and a real inference thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.api.batching import MicroBatcher
from service.errors import Busy


def run(coro):
    return asyncio.run(coro)


def test_groups_by_key_and_keeps_order():
    calls: list[tuple[object, list[int]]] = []
    threads = set()

    def runner(key, items):
        threads.add(threading.current_thread().name)
        calls.append((key, list(items)))
        return [(key, i * 10) for i in items]

    async def main():
        b = MicroBatcher(runner, max_batch=8, max_delay_ms=50)
        b.start()
        res = await asyncio.gather(*[b.submit("a" if i % 2 else "b", i) for i in range(10)])
        await b.stop()
        return res

    res = run(main())
    assert res == [("a" if i % 2 else "b", i * 10) for i in range(10)]
    assert sorted(len(items) for _, items in calls) == [5, 5]
    assert all(len({key}) == 1 for key, _ in calls)
    assert threads and all(t.startswith("inference") for t in threads)


def test_max_batch_and_delay_bound_the_wait():
    sizes = []

    def runner(key, items):
        sizes.append(len(items))
        return items

    async def main():
        b = MicroBatcher(runner, max_batch=4, max_delay_ms=1000)
        b.start()
        t0 = time.perf_counter()
        await asyncio.gather(*[b.submit("k", i) for i in range(8)])  # two full batches: no wait
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        b.max_delay = 0.05
        await b.submit("k", 99)  # alone: waits max_delay, then runs
        alone = time.perf_counter() - t0
        await b.stop()
        return full, alone

    full, alone = run(main())
    assert sizes == [4, 4, 1]
    assert full < 0.5 and 0.04 <= alone < 0.5


def test_full_queue_raises_busy_and_errors_reach_every_waiter():
    rejected = []

    def runner(key, items):
        if key == "bad":
            raise ValueError("boom")
        time.sleep(0.05)
        return items

    async def main():
        b = MicroBatcher(runner, max_batch=2, max_delay_ms=100, max_queue=3,
                         on_reject=lambda: rejected.append(1))
        b.start()
        res = await asyncio.gather(*[b.submit("k", i) for i in range(5)],
                                   return_exceptions=True)
        bad = await asyncio.gather(b.submit("bad", 1), b.submit("bad", 2),
                                   return_exceptions=True)
        await b.stop()
        return res, bad

    res, bad = run(main())
    assert res[:3] == [0, 1, 2]
    assert all(isinstance(r, Busy) and r.retry_after == 1 for r in res[3:])
    assert len(rejected) == 2
    assert all(isinstance(e, ValueError) for e in bad)


def test_submit_before_start_is_busy():
    async def main():
        b = MicroBatcher(lambda k, i: i)
        with pytest.raises(Busy):
            await b.submit("k", 1)

    run(main())
