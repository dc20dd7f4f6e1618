"""Request body limit as pure ASGI middleware: 413 before the app parses anything."""

from __future__ import annotations

from typing import Any

import orjson

from service.api.errors import error_body

DRAIN_CAP = 512 * 1024 * 1024  # past this the connection is dropped instead of drained


class BodyLimitMiddleware:
    """Answer 413 (JSON, field ``body``) to bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused without handing the request to
    the app; the body is read and discarded first (up to ``DRAIN_CAP``) so that a client still
    sending gets the answer instead of a reset connection. Chunked bodies are counted as they
    arrive and buffered up to the limit.
    """

    def __init__(self, app: Any, max_bytes: int, on_reject: Any = None,
                 overrides: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject
        self.overrides = overrides or {}

    async def _reject(self, receive: Any, send: Any, seen: int, more: bool,
                      limit: int) -> None:
        while more and seen <= DRAIN_CAP:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            seen += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        if self.on_reject is not None:
            self.on_reject("payload_too_large")
        setting = ("HASHAUDIT_MAX_UPLOAD_BYTES" if limit == self.max_bytes
                   else "HASHAUDIT_MAX_ARCHIVE_BYTES")
        body = orjson.dumps(error_body(
            "payload_too_large", f"request body exceeds the limit of {limit} bytes ({setting})",
            "body"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get(scope.get("path", ""), self.max_bytes)
        length = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                length = v
                break
        if length is not None:
            # (a number too long for int() is over any limit: never parse it)
            if length.isdigit() and (len(length) > 18 or int(length) > limit):
                await self._reject(receive, send, 0, True, limit)
                return
            await self.app(scope, receive, send)
            return
        # no declared length (chunked): buffer up to the limit, then replay
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            more = msg.get("more_body", False)
            if seen > limit:
                await self._reject(receive, send, seen, more, limit)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
