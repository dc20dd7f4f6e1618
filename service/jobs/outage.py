"""Riding out Redis outages: which errors are transient, retrying with backoff, quiet logs.

A worker must not die, and must not lose or double-count work, when Redis goes away for a
while (a restart, a failover, a network cut). Everything here is about that:

* :data:`TRANSIENT`: the errors that mean "Redis is unreachable right now" (connection
  refused or reset, timeouts, ``LOADING`` while Redis replays its AOF after a restart);
* :class:`Outage`: one per process; logs the start of an outage once, a reminder once a
  minute while it lasts and its end once, whatever the number of failed calls;
* :func:`retry`: call a function until Redis answers (backoff 0.2 s doubling to 5 s). Only
  idempotent functions are retried (``HSET`` of a fixed key, reads), so a write that failed
  during the outage is simply written again after it, never twice in effect.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

# BusyLoadingError (Redis replaying its AOF) is a ConnectionError subclass in redis-py.
TRANSIENT: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError)

T = TypeVar("T")

REMIND_EVERY_S = 60.0
MAX_BACKOFF_S = 5.0


class Outage:
    """Tracks whether Redis is reachable from this process and logs changes (thread-safe)."""

    def __init__(self, name: str = "redis") -> None:
        self.name = name
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.up_since: float = float("-inf")  # no outage seen yet
        self._reminded = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException, doing: str = "") -> None:
        """A call failed with a transient error: log it if it starts an outage (or as a
        reminder once a minute), otherwise stay quiet."""
        now = time.monotonic()
        with self._lock:
            if self.down_since is None:
                self.down_since = self._reminded = now
                log.warning("%s unreachable%s (%s: %s); retrying with backoff until it is "
                            "back", self.name, f" while {doing}" if doing else "",
                            type(exc).__name__, exc)
            elif now - self._reminded >= REMIND_EVERY_S:
                self._reminded = now
                log.warning("%s still unreachable after %.0f s (%s)", self.name,
                            now - self.down_since, type(exc).__name__)

    def ok(self) -> None:
        """A call succeeded: ends an outage (logged once)."""
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is None:
                return
            now = time.monotonic()
            log.warning("%s reachable again after %.1f s", self.name, now - self.down_since)
            self.down_since = None
            self.up_since = now

    def up_for(self) -> float:
        """Seconds since Redis was last seen coming back (infinite before any outage)."""
        return 0.0 if self.down_since is not None else time.monotonic() - self.up_since


OUTAGE = Outage()


def retry(fn: Callable[..., T], *args: Any, doing: str = "", outage: Outage = OUTAGE,
          deadline_s: float | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, called again after each transient Redis error (backoff from
    0.2 s, doubling, at most 5 s between tries) until it succeeds, or until ``deadline_s``
    seconds have passed (then the last error is raised). ``fn`` must be idempotent."""
    wait = 0.2
    t0 = time.monotonic()
    while True:
        try:
            out = fn(*args, **kwargs)
        except TRANSIENT as exc:
            outage.failed(exc, doing)
            if deadline_s is not None and time.monotonic() - t0 + wait > deadline_s:
                raise
            time.sleep(wait)
            wait = min(MAX_BACKOFF_S, wait * 2)
            continue
        outage.ok()
        return out


def wait_until_up(kv: Any, doing: str = "", outage: Outage = OUTAGE,
                  deadline_s: float | None = None) -> None:
    """Block until ``kv`` answers PING (see :func:`retry`)."""
    retry(kv.ping, doing=doing, outage=outage, deadline_s=deadline_s)


class RateLimitFilter(logging.Filter):
    """Lets a log record through at most once per ``every_s`` for each message template that
    contains one of ``needles`` (RQ logs every reconnect attempt of its dequeue loop)."""

    def __init__(self, needles: tuple[str, ...], every_s: float = REMIND_EVERY_S) -> None:
        super().__init__()
        self.needles = needles
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if not any(n in msg for n in self.needles):
            return True
        now = time.monotonic()
        if now - self._last.get(msg, -1e9) < self.every_s:
            return False
        self._last[msg] = now
        return True
