"""Graceful shutdown of ``hashaudit serve``: stop accepting, drain within a bound, exit.

On SIGTERM (or Ctrl-C) uvicorn closes the listening socket, closes idle keep-alive
connections and waits for requests in flight; :class:`DrainingServer` tells the app at that
moment (``on_shutdown``), so the micro-batcher keeps serving what is queued until
``drain_s - margin`` and then answers what is still waiting with a JSON 503 + Retry-After.
Every request the server accepted thus ends with a real answer before uvicorn's own limit
(``timeout_graceful_shutdown = drain_s``), after which it would cancel the request tasks.
Should that still happen (a request stuck elsewhere), :class:`CancelledAsJSON` answers the
cancelled request with the same JSON 503 instead of uvicorn's plain-text 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import uvicorn

from service.api.errors import error_body

log = logging.getLogger("service.api")


def drain_margin(drain_s: float) -> float:
    """How long before uvicorn's limit the app answers what is still waiting."""
    return min(1.0, drain_s / 4)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, calling ``on_shutdown()`` (on the event loop) as shutdown begins."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: Any = None) -> None:
        try:
            self._on_shutdown()
        except Exception:  # noqa: BLE001 - shutting down must go on
            log.exception("shutdown hook failed")
        await super().shutdown(sockets)


class CancelledAsJSON:
    """Pure ASGI middleware: a request task cancelled before its response started (uvicorn's
    graceful-shutdown limit passed) answers JSON 503 + Retry-After, then stays cancelled."""

    def __init__(self, app: Any, retry_after: int = 2) -> None:
        self.app = app
        self.retry_after = retry_after

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            if not started:
                import json

                body = json.dumps(error_body(
                    "unavailable", "the server is shutting down; retry shortly")).encode()
                try:
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(self.retry_after).encode()),
                        (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
                except Exception:  # noqa: BLE001 - the connection may be gone already
                    pass
            raise


def serve(app: Any, host: str, port: int, drain_s: float, log_level: str = "info",
          access_log: bool = True, sockets: list[Any] | None = None) -> None:
    """Run ``app`` (from :func:`service.api.create_app`) until SIGTERM/SIGINT, then drain
    for at most ``drain_s`` seconds and return. ``sockets``: listen on these (already bound,
    shared by the processes of ``--workers N``) instead of binding ``host:port``."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, timeout_graceful_shutdown=drain_s)
    state = app.state.hashaudit
    server = DrainingServer(config, lambda: state.begin_drain(drain_s - drain_margin(drain_s)))
    server.run(sockets=sockets)
