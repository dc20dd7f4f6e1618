"""A process's job context: its loaded bundles and the audit store (Redis or in memory).

API processes, workers and the CLI build one from the settings (``context_from_settings``)
and register it with ``configure``; the task functions reach it through ``context()``. It
lives apart from the queue and the tasks so that neither needs the other to find it.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import Settings, get_settings
from service.errors import ConfigError
from service.jobs.audit_store import AuditStore
from service.jobs.kv import MemoryKV


@dataclass
class JobContext:
    """What tasks need in this process: loaded bundles and the audit store."""

    models: Any  # service.store.ModelStore
    audits: AuditStore
    max_pixels: int = 4096 * 4096
    artifact_dir: Path | None = None  # where audits write the bundles they make

    def artifact_root(self, audit_id: str, field: str, what: str) -> Path:
        """``<artifact_dir>/audits/<id>/``, created and checked writable (before any training,
        so a misconfigured worker fails the audit at once rather than after hours of it).
        Errors name ``field``; ``what`` says what has nowhere to go without the folder."""
        if self.artifact_dir is None:
            raise ConfigError(f"HASHAUDIT_ARTIFACT_DIR is not set; {what}", field=field)
        root = Path(self.artifact_dir) / "audits" / audit_id
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"artifact folder {root} cannot be created on "
                              f"{socket.gethostname()}: {exc.strerror or exc}",
                              field=field) from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"artifact folder {root} is not writable on "
                              f"{socket.gethostname()}", field=field)
        return root


_ctx: JobContext | None = None
_ctx_lock = threading.Lock()


def configure(ctx: JobContext) -> None:
    global _ctx
    with _ctx_lock:
        _ctx = ctx


def context() -> JobContext:
    """The process's context; a worker without one builds it from the settings."""
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _ctx = context_from_settings()
        return _ctx


def redis_client(url: str) -> Any:
    import redis

    # socket_timeout: a Redis that stops answering (a cut network) fails calls after 10 s
    # instead of hanging them; RQ raises it on workers above its blocking-pop timeout.
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10,
                                health_check_interval=30)


def context_from_settings(settings: Settings | None = None, models: Any = None) -> Any:
    """A job context for this process from the settings (Redis when configured)."""
    from service.device import resolve_device
    from service.store import ModelStore

    s = settings or get_settings()
    kv = redis_client(s.redis_url) if s.redis_url else MemoryKV()
    models = models or ModelStore(s.model_store, str(resolve_device(s.device)), s.precision)
    return JobContext(models=models, audits=AuditStore(kv, s.redis_prefix),
                            max_pixels=s.max_pixels, artifact_dir=s.artifact_dir)
