"""create_app(): the FastAPI application, its lifespan (load + warm bundles) and middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api.batching import MicroBatcher
from service.api.docs import install_docs
from service.api.errors import install_error_handlers
from service.api.head import HeadAsGetMiddleware
from service.api.limits import BodyLimitMiddleware
from service.api.prometheus import Metrics, MetricsMiddleware
from service.api.shutdown import CancelledAsJSON
from service.api.state import AppState
from service.api.workers import mark_ready
from service.config import Settings, get_settings
from service.device import resolve_device
from service.errors import ConfigError
from service.store import ModelStore

log = logging.getLogger("service.api")

DESCRIPTION = """\
HashAudit serves frozen deep-hashing bundles and attacks them.

* **POST /attack**: upload a PNG/JPEG and its labels; get the adversarial image (base64 PNG at
  the model's input size), clean and adversarial codes, Hamming distances and the top-k
  gallery hits before and after.
* **POST /encode**: code and top-k hits of an image, no attack.
* **POST /audit**: a batch robustness audit as a job: every query of a bundle's split (or a
  seeded sample, or an uploaded archive) under several methods and eps, or a backdoor audit.
  Follow it at **GET /audit/{id}**; **GET /audit/{id}/report** is the HTML report.
* **GET /models**: bundles, classes, bits, attacks and their eps, evaluation figures, and
  where an imported bundle came from. **POST /models** (off unless the server enables it)
  imports a DeepHash-pytorch or torchvision checkpoint with its database.

Errors are JSON `{"error": {"code", "message", "field"}}`. When the server runs with
`HASHAUDIT_API_KEYS`, send `Authorization: Bearer <key>` or `X-API-Key: <key>` (the
**Authorize** button here) to every endpoint except `/health/*` and these pages.
This page and the same reference at `/redoc` need no internet access.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Bundles load in the lifespan, in the background: ``/health/live``
    answers at once and ``/health/ready`` turns 200 when the default bundle is warm."""
    settings = settings or get_settings()
    if settings.model_uploads and not settings.api_key_list:
        raise ConfigError("HASHAUDIT_MODEL_UPLOADS lets clients write models to this server; "
                          "it needs HASHAUDIT_API_KEYS as well", field="model_uploads")
    metrics = Metrics()
    device = str(resolve_device(settings.device))

    def on_batch(key: Hashable, size: int, seconds: float) -> None:
        model, kind = key[0], key[1]  # type: ignore[index]
        metrics.observe_batch(kind, model, size, seconds)

    batcher = MicroBatcher(
        lambda key, items: state.run_batch(key, items),
        max_batch=settings.max_batch, max_delay_ms=settings.max_delay_ms,
        max_queue=settings.max_queue, on_batch=on_batch, on_depth=metrics.queue_depth.set,
        on_reject=metrics.queue_rejected.inc)
    store = ModelStore(settings.model_store, device, settings.precision)
    state = AppState(settings=settings, store=store,
                     metrics=metrics, batcher=batcher, device=device)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.jobs.queue import make_audit_queue

        batcher.start()
        state.audits = make_audit_queue(settings, state.store)
        log.info("loading bundles from %s on %s (%s); audits run %s", settings.model_store,
                 device, store.precision,
                 "on Redis workers" if settings.redis_url else "in this process")

        async def load() -> None:
            try:
                await batcher.run_in_thread(state.load_all)
            finally:
                state.loading = False
                metrics.ready.set(1 if state.ready else 0)
                mark_ready(state.serving)  # --workers N: readiness of all processes

        loader = asyncio.create_task(load(), name="load-bundles")
        try:
            yield
        finally:
            loader.cancel()
            mark_ready(False)
            await batcher.stop()
            stop = getattr(state.audits.runner, "stop", None)
            if stop is not None:
                await asyncio.to_thread(stop, 1.0)

    app = FastAPI(
        title="HashAudit", version=__version__, description=DESCRIPTION, lifespan=lifespan,
        docs_url=None, redoc_url=None,  # docs.install_docs serves them without a CDN
        openapi_tags=[
            {"name": "attack", "description": "Attack or encode one image"},
            {"name": "audit", "description": "Batch robustness audits (jobs) and reports"},
            {"name": "models", "description": "Bundles and their gallery"},
            {"name": "health", "description": "Liveness, readiness, metrics"},
        ],
    )
    from service.api.model_imports import ModelImports

    state.imports = ModelImports(state)
    app.state.hashaudit = state
    install_error_handlers(app, metrics.error)

    from service.api.routes import attack, audit, health, models
    from service.jobs.audit_types import load_plugins

    load_plugins(settings.plugin_list)  # before POST /audit's body is built from the types
    app.include_router(attack.router)
    app.include_router(audit.submit_router())
    app.include_router(audit.router)
    app.include_router(models.router)
    app.include_router(health.router)
    install_docs(app, with_api_keys=bool(settings.api_key_list))
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       on_reject=metrics.error,
                       overrides={"/audit/uploads": settings.max_archive_bytes,
                                  # a server without model uploads keeps the small limit
                                  **({"/models": settings.max_archive_bytes}
                                     if settings.model_uploads else {})})
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(CancelledAsJSON)
    return app
