"""The few Redis commands audits use, and an in-memory stand-in for single-machine mode.

``MemoryKV`` is what ``hashaudit serve`` without ``HASHAUDIT_REDIS_URL`` and
``hashaudit audit run`` use: one process, nothing to install. With Redis, the real
``redis.Redis`` client is used directly (same method names and return types: bytes).
"""

from __future__ import annotations

import threading
import time
from typing import Any


def _b(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, int | float):
        return repr(v).encode() if isinstance(v, float) else str(v).encode()
    raise TypeError(f"cannot store {type(v).__name__}")


class MemoryKV:
    """Thread-safe dict implementation of the Redis subset used by :mod:`service.jobs`."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._expiry: dict[str, float] = {}
        self._lock = threading.RLock()

    def _live(self, name: str) -> Any:
        exp = self._expiry.get(name)
        if exp is not None and exp <= time.time():
            self._data.pop(name, None)
            self._expiry.pop(name, None)
        return self._data.get(name)

    # strings
    def set(self, name: str, value: Any, nx: bool = False, ex: int | None = None) -> bool | None:
        with self._lock:
            if nx and self._live(name) is not None:
                return None
            self._data[name] = _b(value)
            if ex is not None:
                self._expiry[name] = time.time() + ex
            else:
                self._expiry.pop(name, None)
            return True

    def get(self, name: str) -> bytes | None:
        with self._lock:
            v = self._live(name)
            return v if isinstance(v, bytes) else None

    def exists(self, *names: str) -> int:
        with self._lock:
            return sum(self._live(n) is not None for n in names)

    def delete(self, *names: str) -> int:
        with self._lock:
            n = 0
            for name in names:
                n += self._data.pop(name, None) is not None
                self._expiry.pop(name, None)
            return n

    def expire(self, name: str, seconds: int) -> bool:
        with self._lock:
            if self._live(name) is None:
                return False
            self._expiry[name] = time.time() + seconds
            return True

    # hashes
    def _hash(self, name: str, create: bool = False) -> dict[bytes, bytes] | None:
        h = self._live(name)
        if h is None and create:
            h = self._data[name] = {}
        return h

    def hset(self, name: str, key: Any = None, value: Any = None,
             mapping: dict[Any, Any] | None = None) -> int:
        with self._lock:
            h = self._hash(name, create=True)
            items = dict(mapping or {})
            if key is not None:
                items[key] = value
            new = 0
            for k, v in items.items():
                new += _b(k) not in h
                h[_b(k)] = _b(v)
            return new

    def hsetnx(self, name: str, key: Any, value: Any) -> int:
        with self._lock:
            h = self._hash(name, create=True)
            if _b(key) in h:
                return 0
            h[_b(key)] = _b(value)
            return 1

    def hget(self, name: str, key: Any) -> bytes | None:
        with self._lock:
            h = self._hash(name)
            return None if h is None else h.get(_b(key))

    def hgetall(self, name: str) -> dict[bytes, bytes]:
        with self._lock:
            return dict(self._hash(name) or {})

    def hkeys(self, name: str) -> list[bytes]:
        with self._lock:
            return list(self._hash(name) or {})

    def hlen(self, name: str) -> int:
        with self._lock:
            return len(self._hash(name) or {})

    def hexists(self, name: str, key: Any) -> bool:
        with self._lock:
            return _b(key) in (self._hash(name) or {})

    # sorted sets (only what listing audits needs)
    def zadd(self, name: str, mapping: dict[Any, float]) -> int:
        with self._lock:
            z = self._live(name)
            if z is None:
                z = self._data[name] = {}
            new = 0
            for k, s in mapping.items():
                new += _b(k) not in z
                z[_b(k)] = float(s)
            return new

    def zrevrange(self, name: str, start: int, end: int) -> list[bytes]:
        with self._lock:
            z = self._live(name) or {}
            items = sorted(z, key=lambda k: z[k], reverse=True)
            return items[start:None if end == -1 else end + 1]

    def ping(self) -> bool:
        return True
