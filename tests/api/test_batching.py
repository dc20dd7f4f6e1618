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


async def submit_announced(b: MicroBatcher, pairs: list[tuple[str, int]]) -> list:
    """As the API does: every request announces itself, then submits with its ticket."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        tickets = [stack.enter_context(b.incoming()) for _ in pairs]
        return await asyncio.gather(*[b.submit(k, i, t)
                                      for (k, i), t in zip(pairs, tickets, strict=True)])


def test_groups_by_key_and_keeps_order():
    calls: list[tuple[object, list[int]]] = []
    threads = set()

    def runner(key, items):
        threads.add(threading.current_thread().name)
        calls.append((key, list(items)))
        return [(key, i * 10) for i in items]

    async def main():
        b = MicroBatcher(runner, max_batch=8, max_delay_ms=500)
        b.start()
        res = await submit_announced(b, [("a" if i % 2 else "b", i) for i in range(10)])
        await b.stop()
        return res

    res = run(main())
    assert res == [("a" if i % 2 else "b", i * 10) for i in range(10)]
    assert sorted(len(items) for _, items in calls) == [5, 5]
    assert all(len({key}) == 1 for key, _ in calls)
    assert threads and all(t.startswith("inference") for t in threads)


def test_waits_only_while_requests_are_arriving():
    sizes = []

    def runner(key, items):
        sizes.append(len(items))
        return items

    async def main():
        b = MicroBatcher(runner, max_batch=4, max_delay_ms=300)
        b.start()
        t0 = time.perf_counter()
        await submit_announced(b, [("k", i) for i in range(8)])  # two full batches
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        await b.submit("k", 99)  # alone, nobody arriving: runs at once
        alone = time.perf_counter() - t0
        with b.incoming():  # announced but never submitted: the batch waits max_delay
            t0 = time.perf_counter()
            await b.submit("k", 100)
            waited = time.perf_counter() - t0
        await b.stop()
        return full, alone, waited

    full, alone, waited = run(main())
    assert sizes == [4, 4, 1, 1]
    assert full < 0.25 and alone < 0.1 and 0.28 <= waited < 1.0


def test_full_queue_raises_busy_and_errors_reach_every_waiter():
    rejected = []
    running, release = threading.Event(), threading.Event()

    def runner(key, items):
        if key == "bad":
            raise ValueError("boom")
        running.set()
        release.wait(5)
        return items

    async def main():
        b = MicroBatcher(runner, max_batch=2, max_delay_ms=0, max_queue=3,
                         on_reject=lambda: rejected.append(1))
        b.start()
        first = asyncio.ensure_future(b.submit("k", 0))
        while not running.is_set():  # the first batch holds the inference thread
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(b.submit("k", i)) for i in range(1, 5)]
        await asyncio.sleep(0.05)
        release.set()
        res = await asyncio.gather(first, *rest, return_exceptions=True)
        bad = await asyncio.gather(b.submit("bad", 1), b.submit("bad", 2),
                                   return_exceptions=True)
        await b.stop()
        return res, bad

    res, bad = run(main())
    assert res[:4] == [0, 1, 2, 3]
    assert isinstance(res[4], Busy) and res[4].retry_after == 1
    assert len(rejected) == 1
    assert all(isinstance(e, ValueError) for e in bad)


def test_submit_before_start_is_busy():
    async def main():
        b = MicroBatcher(lambda k, i: i)
        with pytest.raises(Busy):
            await b.submit("k", 1)

    run(main())


def test_drain_serves_until_the_deadline_then_answers_busy():
    """Shutdown: work queued before the drain deadline is served; at the deadline the
    running batch's and the queued requests get Busy at once (the API turns it into a JSON
    503), without waiting for the batch that still runs; later submissions get Busy too."""
    release = threading.Event()
    first_started = threading.Event()

    def runner(key, items):
        if key == "slow":
            first_started.set()
            release.wait(10)
        return list(items)

    async def main():
        b = MicroBatcher(runner, max_batch=1, max_delay_ms=0)
        b.start()
        fast = await b.submit("fast", 1)  # served normally before the drain
        slow = asyncio.ensure_future(b.submit("slow", 2))
        await asyncio.to_thread(first_started.wait, 10)
        queued = [asyncio.ensure_future(b.submit("fast", i)) for i in range(3, 6)]
        await asyncio.sleep(0.05)
        b.drain(0.1)
        t0 = time.monotonic()
        out = await asyncio.gather(slow, *queued, return_exceptions=True)
        waited = time.monotonic() - t0
        with pytest.raises(Busy) as late:
            await b.submit("fast", 9)
        release.set()
        await b.stop()
        return fast, out, waited, late.value

    fast, out, waited, late = run(main())
    assert fast == 1
    assert len(out) == 4 and all(isinstance(e, Busy) for e in out), out
    assert all(e.retry_after >= 1 and "shutting down" in e.message for e in out)
    assert waited < 5  # answered at the deadline, not when the stuck batch ended (10 s)
    assert "shutting down" in late.message
