"""Micro-batcher: concurrent requests for the same (model, kind, method, eps) share one pass.

Requests wait in a bounded queue. One inference thread, off the event loop, picks the key of
the oldest waiting request and lets that batch fill, up to ``max_batch``, for at most
``max_delay_ms``, but only while more requests are on their way in (announced with
:meth:`MicroBatcher.incoming` while their uploads are decoded): a lone request runs at once.
The thread runs the batch, hands each result back to the event loop and forms the next batch
itself, so a busy event loop never leaves the model idle; while a batch runs new requests
pile up, so under load batches fill without waiting. A full queue answers :class:`Busy`
(503 + Retry-After).

Shutdown: :meth:`MicroBatcher.drain` (when the server stops accepting connections) keeps
running what is queued until a deadline, then answers every request still waiting, queued
or in the running batch, with :class:`Busy`, so each gets a JSON 503 instead of being cut
off; :meth:`MicroBatcher.stop` does the same at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from service.errors import Busy

log = logging.getLogger(__name__)

Runner = Callable[[Hashable, list[Any]], list[Any]]

SHUTDOWN_RETRY_AFTER_S = 2


class _Call:
    """Key of one-off calls (warm-up, loading) that must run on the inference thread."""


@dataclass
class Ticket:
    """An announced request (see :meth:`MicroBatcher.incoming`)."""

    open: bool = field(default=True)


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


def _resolve(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():  # cancelled: the client went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class MicroBatcher:
    """Group submissions by key and run them in batches on one inference thread.

    Args:
        runner: ``runner(key, items) -> results`` (one result per item, in order), called on
            the inference thread. An exception fails every request of that batch; a result
            that is an exception fails only its request.
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
        self._arriving = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False  # drain deadline passed: nothing new is taken
        self._running: list[_Pending] = []

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        if self._thread is None:
            self._stopping = self._closed = False
            self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
            self._thread.start()

    def drain(self, seconds: float) -> None:
        """Shutdown has begun: keep serving what is queued for ``seconds``, then answer every
        request still waiting (queued or in the running batch) with :class:`Busy`.
        Call on the event loop."""
        asyncio.get_running_loop().call_later(max(0.0, seconds), self._abandon_waiting)

    def _abandon_waiting(self, stopping: bool = False) -> int:
        """Answer every waiting request with Busy; True also stops the thread."""
        with self._cond:
            self._closed = True
            self._stopping = self._stopping or stopping
            left = [p for q in self._queues.values() for p in q] + self._running
            self._queues.clear()
            self._set_depth(0)
            self._cond.notify_all()
        busy = Busy("the server is shutting down; retry on another instance or shortly",
                    retry_after=SHUTDOWN_RETRY_AFTER_S)
        left = [p for p in left if not p.future.done()]
        for p in left:
            p.loop.call_soon_threadsafe(_resolve, p.future, None, busy)
        if left:
            log.info("shutting down: %d waiting requests answered 503", len(left))
        return len(left)

    async def stop(self, join_s: float = 1.0) -> None:
        """Stop the thread; waiting requests get :class:`Busy`. A batch still running is not
        waited for longer than ``join_s`` (the thread is a daemon)."""
        self._abandon_waiting(stopping=True)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, join_s)
            self._thread = None

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self.on_depth is not None:
            self.on_depth(depth)

    @contextmanager
    def incoming(self) -> Iterator[Ticket]:
        """Announce a request that will be submitted soon (while its upload is decoded), so a
        forming batch waits for it; pass the ticket to :meth:`submit`."""
        ticket = Ticket()
        with self._cond:
            self._arriving += 1
        try:
            yield ticket
        finally:
            self._close(ticket)

    def _close(self, ticket: Ticket | None) -> None:
        if ticket is not None and ticket.open:
            with self._cond:
                ticket.open = False
                self._arriving -= 1
                self._cond.notify()

    def _enqueue(self, key: Hashable, item: Any, check_limit: bool,
                 ticket: Ticket | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise Busy("the server is shutting down; retry on another instance or shortly",
                       retry_after=SHUTDOWN_RETRY_AFTER_S)
        if self._thread is None or self._stopping:
            raise Busy("the inference queue is not running", retry_after=5)
        fut = loop.create_future()
        with self._cond:
            if ticket is not None and ticket.open:
                ticket.open = False
                self._arriving -= 1
            if check_limit and self._depth >= self.max_queue:
                if self.on_reject is not None:
                    self.on_reject()
                raise Busy(f"the inference queue is full ({self.max_queue} waiting); retry "
                           "shortly", retry_after=1)
            self._queues.setdefault(key, deque()).append(
                _Pending(item, fut, loop, time.perf_counter()))
            self._set_depth(self._depth + 1)
            self._cond.notify()
        return fut

    async def submit(self, key: Hashable, item: Any, ticket: Ticket | None = None) -> Any:
        """Queue ``item`` under ``key`` and wait for its result."""
        return await self._enqueue(key, item, check_limit=True, ticket=ticket)

    async def run_in_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the inference thread (loading, warm-up), in queue order."""
        return await self._enqueue(_Call(), fn, check_limit=False)

    # ---- inference thread

    def _oldest_key(self) -> Hashable | None:
        best, best_t = None, None
        for key, q in self._queues.items():
            if q and (best_t is None or q[0].enqueued < best_t):
                best, best_t = key, q[0].enqueued
        return best

    def _next_batch(self) -> tuple[Hashable, list[_Pending]] | None:
        """Wait for work, let the oldest key's batch fill, take it (None when stopping)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                key = self._oldest_key()
                if key is None:
                    self._cond.wait()
                    continue
                q = self._queues[key]
                if not isinstance(key, _Call):
                    deadline = q[0].enqueued + self.max_delay
                    while (len(q) < self.max_batch and self._arriving > 0
                           and not self._stopping):
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._stopping:
                        return None
                limit = 1 if isinstance(key, _Call) else self.max_batch
                batch: list[_Pending] = []
                while q and len(batch) < limit:
                    p = q.popleft()
                    if not p.future.cancelled():
                        batch.append(p)
                    self._set_depth(self._depth - 1)
                if not q:
                    del self._queues[key]
                if batch:
                    self._running = batch
                    return key, batch

    def _work(self) -> None:
        while True:
            nxt = self._next_batch()
            if nxt is None:
                return
            key, batch = nxt
            t0 = time.perf_counter()
            results: list[Any] | None = None
            error: BaseException | None = None
            try:
                if isinstance(key, _Call):
                    results = [batch[0].item()]
                else:
                    results = self.runner(key, [p.item for p in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"runner returned {len(results)} results for "
                                           f"{len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                if not isinstance(key, _Call):
                    log.exception("inference batch failed for %s", key)
                error = exc
            seconds = time.perf_counter() - t0
            if not isinstance(key, _Call) and self.on_batch is not None:
                self.on_batch(key, len(batch), seconds)
            with self._cond:
                self._running = []
            for n, p in enumerate(batch):
                r = None if results is None else results[n]
                e = error if error is not None else (r if isinstance(r, BaseException) else None)
                p.loop.call_soon_threadsafe(_resolve, p.future, None if e else r, e)
