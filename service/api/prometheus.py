"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

With ``hashaudit serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set before the server
processes start), prometheus_client keeps every value in files of that folder and
:meth:`Metrics.render` aggregates all processes: counters and histograms are summed, queue
depth is summed over live processes, ``hashaudit_models_loaded`` and ``hashaudit_ready`` are
the minimum over live processes (1 only when every process is ready), and
``hashaudit_process_requests`` counts requests per process (label ``pid``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.routing import Mount, Route

disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Requests, latencies, errors, batch sizes, queue depth and inference time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # values live in files shared by the server processes (see the module docstring)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.requests = Counter("hashaudit_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("hashaudit_request_seconds", "HTTP request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("hashaudit_errors", "Error responses by error code", ["code"],
                              registry=r)
        self.batch_size = Histogram("hashaudit_batch_size", "Requests per inference batch",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.batches = Counter("hashaudit_batches", "Inference batches run", ["kind", "model"],
                               registry=r)
        self.inference = Histogram("hashaudit_inference_seconds", "Wall time per batch",
                                   ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("hashaudit_queue_depth",
                                 "Requests waiting for the inference thread", registry=r,
                                 multiprocess_mode="livesum")
        self.queue_rejected = Counter("hashaudit_queue_rejected",
                                      "Requests refused because the queue was full", registry=r)
        self.models = Gauge("hashaudit_models_loaded", "Bundles loaded and warmed", registry=r,
                            multiprocess_mode="livemin")
        self.ready = Gauge("hashaudit_ready", "1 when /health/ready answers 200", registry=r,
                           multiprocess_mode="livemin")
        self.process_requests = (
            Gauge("hashaudit_process_requests", "HTTP requests served by each server process",
                  ["route"], registry=r, multiprocess_mode="all")
            if self.multiprocess else None)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def observe_batch(self, kind: str, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batches.labels(kind, model).inc()
        self.inference.labels(kind).observe(seconds)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by route template and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = route_label(scope)
            self.metrics.requests.labels(scope.get("method", ""), path, str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)
            if self.metrics.process_requests is not None:
                self.metrics.process_requests.labels(path).inc()


def route_label(scope: dict) -> str:
    """The route template that served the request, or ``unmatched``.

    FastAPI records its own routes in ``scope["route"]``; plain Starlette routes (the
    ``/openapi.json`` route) and mounts (``/static``) leave only ``scope["endpoint"]``, which
    is looked up among the app's routes. A mount counts as one label, ``<mount>/{path}``, so
    the label set stays the app's route table plus ``unmatched``."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    endpoint = scope.get("endpoint")
    if endpoint is not None:
        for route in getattr(scope.get("app"), "routes", ()):
            if isinstance(route, Mount) and route.app is endpoint:
                return route.path + "/{path}"
            if isinstance(route, Route) and route.endpoint is endpoint:
                return route.path
    return "unmatched"
