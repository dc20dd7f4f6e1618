"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.deps import get_state, require_api_key
from service.api.responses import JSON
from service.api.schemas import Health
from service.api.workers import ready_count

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Health, summary="The process is up")
async def live(request: Request) -> JSON:
    state = get_state(request)
    return JSON({"status": "ok", "detail": {"uptime_s": time.time() - state.started_at}})


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}},
            summary="Bundles loaded and warmed (503 otherwise)")
async def ready(request: Request) -> JSON:
    state = get_state(request)
    audits = None
    if state.audits is not None:
        # In the thread pool: a Redis behind a cut network takes seconds to time out, and the
        # event loop must go on serving meanwhile. healthy() and depth() never raise.
        runner = state.audits.runner
        reachable, depth = await run_in_threadpool(lambda: (runner.healthy(), runner.depth()))
        audits = {"runner": "redis" if state.settings.redis_url else "in-process",
                  "reachable": reachable, "queued_chunks": depth}
    ready_n, workers = ready_count(), state.settings.workers
    processes = (None if ready_n is None else
                 {"pid": os.getpid(), "workers": workers, "ready": min(ready_n, workers)})
    detail = {"loading": state.loading, "device": state.device, "processes": processes,
              "models": sorted(state.services), "failed": state.load_errors,
              "default": state.settings.default_bundle, "queue_depth": state.batcher.depth,
              "audits": audits}
    all_serve = ready_n is None or ready_n >= workers
    if state.serving and all_serve and audits is not None and audits["reachable"]:
        return JSON({"status": "ready", "detail": detail})
    why = ("shutting down" if state.draining else "loading" if state.loading
           else "default bundle not loaded"
           if state.settings.default_bundle not in state.services
           else "redis unreachable" if audits is None or not audits["reachable"]
           else f"{ready_n} of {workers} server processes ready")
    return JSON({"status": why, "detail": detail}, status_code=503,
                headers={"Retry-After": "2"})


@router.get("/metrics", dependencies=[Depends(require_api_key)], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
            summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
