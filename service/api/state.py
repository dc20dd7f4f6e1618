"""AppState: what the API's routes share (``app.state.hashaudit``): settings, the loaded
bundles, the micro-batcher, metrics and the audit queue. ``app.py`` builds it; routes and
dependencies read it, so they need not import the application module."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from service.api.batching import MicroBatcher
from service.api.prometheus import Metrics
from service.api.workers import mark_ready
from service.config import Settings
from service.errors import HashAuditError
from service.serving import BundleService
from service.store import ModelStore

log = logging.getLogger("service.api")


@dataclass
class AppState:
    """What the routes share (``app.state.hashaudit``)."""

    settings: Settings
    store: ModelStore
    metrics: Metrics
    batcher: MicroBatcher
    services: dict[str, BundleService] = field(default_factory=dict)
    load_errors: dict[str, str] = field(default_factory=dict)
    loading: bool = True
    started_at: float = field(default_factory=time.time)
    device: str = "cpu"
    audits: Any = None  # service.jobs.queue.AuditQueue once started
    draining: bool = False  # shutdown has begun (see service.api.shutdown)
    imports: Any = None  # service.api.model_imports.ModelImports (POST /models)

    @property
    def serving(self) -> bool:
        """Bundles loaded, default bundle served, not shutting down (no Redis call)."""
        return (not self.loading and not self.draining
                and self.settings.default_bundle in self.services)

    @property
    def ready(self) -> bool:
        return self.serving and self.audits is not None and self.audits.runner.healthy()

    def begin_drain(self, seconds: float) -> None:
        """Shutdown has begun (event loop): /health/ready turns 503; inference requests in
        flight are served for ``seconds`` more, then the rest is answered 503."""
        self.draining = True
        self.metrics.ready.set(0)
        mark_ready(False)
        self.batcher.drain(seconds)
        log.info("shutting down: draining requests in flight for at most %.1f s", seconds)

    def run_batch(self, key: Hashable, items: list[Any]) -> list[Any]:
        """Micro-batcher runner (inference thread): key = (model, kind, method, eps)."""
        model, kind, method, eps = key  # type: ignore[misc]
        svc = self.services[model]
        if kind == "encode":
            return svc.encode(items)
        return svc.attack(method, eps, items)

    def load_all(self) -> None:
        """Load, verify and warm every bundle in the store; a broken one is logged and skipped."""
        names = self.store.names()
        if not names:
            log.error("no bundles in %s", self.store.root)
        for name in names:
            try:
                t0 = time.perf_counter()
                svc = BundleService(self.store.get(name), seed=self.settings.attack_seed)
                svc.warmup()
                self.services[name] = svc
                log.info("bundle %s ready on %s in %.1f s", name, self.device,
                         time.perf_counter() - t0)
            except HashAuditError as exc:
                self.load_errors[name] = exc.message
                log.error("bundle %s not served: %s", name, exc.message)
            except Exception as exc:  # noqa: BLE001 - one bad bundle must not stop the rest
                self.load_errors[name] = f"{type(exc).__name__}: {exc}"
                log.exception("bundle %s not served", name)
        self.metrics.models.set(len(self.services))
        if self.settings.default_bundle not in self.services:
            log.error("default bundle %s is not loaded; /health/ready will answer 503",
                      self.settings.default_bundle)
