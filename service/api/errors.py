"""Every error leaves the API as ``{"error": {"code", "message", "field"}}``; never a traceback."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.responses import JSON
from service.errors import (
    AttackInputError,
    BadInput,
    BundleError,
    Busy,
    ConfigError,
    CorruptData,
    DataNotFound,
    Forbidden,
    HashAuditError,
    InvalidName,
    PayloadTooLarge,
    UnknownName,
    UnsupportedImageType,
)
from service.jobs.outage import TRANSIENT

log = logging.getLogger("service.api")

QUEUE_RETRY_AFTER_S = 5  # Retry-After of a 503 while Redis is unreachable

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "validation_error", 429: "too_many_requests",
              503: "unavailable"}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSON:
    return JSON(error_body(code, message, field), status_code=status, headers=headers)


def status_for(exc: HashAuditError) -> int:
    """HTTP status of a domain error."""
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, UnsupportedImageType):
        return 415
    if isinstance(exc, Busy):
        return 503
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, InvalidName):
        return 422
    if isinstance(exc, UnknownName) and exc.field in ("model", "id", "audit", "bundle"):
        return 404
    if isinstance(exc, BadInput | AttackInputError | ConfigError | CorruptData | UnknownName):
        return 422
    if isinstance(exc, DataNotFound):
        return 404
    if isinstance(exc, BundleError):
        return 503
    return 500


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI, on_error: Any = None) -> None:
    """Register the JSON error handlers; ``on_error(code)`` counts errors for /metrics."""

    def count(code: str) -> None:
        if on_error is not None:
            on_error(code)

    @app.exception_handler(HashAuditError)
    async def domain_error(request: Request, exc: HashAuditError) -> JSON:
        status = status_for(exc)
        count(exc.code)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        if status >= 500 and not isinstance(exc, Busy):
            log.error("server-side error on %s: %s", request.url.path, exc.message)
        return error_response(status, exc.code, exc.message, exc.field, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSON:
        errs = exc.errors()
        first = errs[0] if errs else {}
        field = _field_of(first.get("loc", ()))
        msg = "; ".join(
            f"{_field_of(e.get('loc', ())) or 'request'}: {e.get('msg', 'invalid')}"
            for e in errs[:5])
        count("validation_error")
        return error_response(422, "validation_error", msg or "invalid request", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSON:
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        count(code)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, code, detail, None,
                              dict(exc.headers) if exc.headers else None)

    async def queue_unavailable(request: Request, exc: Exception) -> JSON:
        # Redis (the audit queue and store) unreachable: the client may retry; the server
        # keeps serving /attack and reconnects by itself.
        count("queue_unavailable")
        log.warning("audit queue unreachable on %s %s: %s", request.method, request.url.path,
                    exc)
        return error_response(503, "queue_unavailable",
                              "the audit queue (Redis) is unreachable; retry shortly",
                              None, {"Retry-After": str(QUEUE_RETRY_AFTER_S)})

    for cls in TRANSIENT:
        app.add_exception_handler(cls, queue_unavailable)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSON:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s %s", ref, request.method, request.url.path)
        count("internal_error")
        return error_response(500, "internal_error",
                              f"internal error (reference {ref}); the server log has details")
