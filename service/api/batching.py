"""Micro-batcher: concurrent requests for the same (model, kind, method, eps) share one pass.

Requests wait in a bounded queue. One dispatcher task picks the key of the oldest waiting
request, lets that batch fill for at most ``max_delay_ms`` (or until ``max_batch``), then runs
it on a single inference thread, off the event loop. While a batch runs, new requests pile
up, so under load batches fill without any waiting. A full queue answers :class:`Busy`
(503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from service.errors import Busy

log = logging.getLogger(__name__)

Runner = Callable[[Hashable, list[Any]], list[Any]]


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    """Group submissions by key and run them in batches on one worker thread.

    Args:
        runner: ``runner(key, items) -> results`` (one result per item, in order); runs in
            the inference thread. An exception fails every request of that batch.
        max_batch: most items per batch.
        max_delay_ms: longest time the oldest request waits for company.
        max_queue: most waiting items; beyond it :meth:`submit` raises :class:`Busy`.
        on_batch: ``on_batch(key, size, seconds)`` after each batch (metrics).
        on_depth: ``on_depth(depth)`` when the queue depth changes (metrics).
        on_reject: ``on_reject()`` when a full queue refuses a request (metrics).
    """

    def __init__(self, runner: Runner, max_batch: int = 32, max_delay_ms: float = 5.0,
                 max_queue: int = 512, on_batch: Callable[[Hashable, int, float], None] | None
                 = None, on_depth: Callable[[int], None] | None = None,
                 on_reject: Callable[[], None] | None = None) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.on_depth = on_depth
        self.on_reject = on_reject
        self._queues: OrderedDict[Hashable, deque[_Pending]] = OrderedDict()
        self._depth = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.busy_seconds = 0.0

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for q in self._queues.values():
            for p in q:
                if not p.future.done():
                    p.future.set_exception(Busy("the server is shutting down", retry_after=5))
        self._queues.clear()
        self._set_depth(0)
        self._executor.shutdown(wait=True)

    async def run_in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the inference thread (for one-off model work such as warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self.on_depth is not None:
            self.on_depth(depth)

    async def submit(self, key: Hashable, item: Any) -> Any:
        """Queue ``item`` under ``key`` and wait for its result."""
        if self._task is None or self._wake is None:
            raise Busy("the inference queue is not running", retry_after=5)
        if self._depth >= self.max_queue:
            if self.on_reject is not None:
                self.on_reject()
            raise Busy(f"the inference queue is full ({self.max_queue} waiting); retry shortly",
                       retry_after=1)
        fut = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(_Pending(item, fut, time.perf_counter()))
        self._set_depth(self._depth + 1)
        self._wake.set()
        return await fut

    def _oldest_key(self) -> Hashable | None:
        best, best_t = None, None
        for key, q in self._queues.items():
            if q and (best_t is None or q[0].enqueued < best_t):
                best, best_t = key, q[0].enqueued
        return best

    def _take(self, key: Hashable) -> list[_Pending]:
        q = self._queues[key]
        batch: list[_Pending] = []
        while q and len(batch) < self.max_batch:
            p = q.popleft()
            if not p.future.cancelled():  # client went away while waiting
                batch.append(p)
            self._set_depth(self._depth - 1)
        if not q:
            del self._queues[key]
        return batch

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            key = self._oldest_key()
            if key is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self._queues[key][0].enqueued + self.max_delay
            while len(self._queues[key]) < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            batch = self._take(key)
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self.runner, key, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"runner returned {len(results)} results for "
                                       f"{len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                log.exception("inference batch failed for %s", key)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                seconds = time.perf_counter() - t0
                self.busy_seconds += seconds
                if self.on_batch is not None:
                    self.on_batch(key, len(batch), seconds)
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    if isinstance(r, BaseException):
                        p.future.set_exception(r)
                    else:
                        p.future.set_result(r)
