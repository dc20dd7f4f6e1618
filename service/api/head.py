"""HEAD on every GET route, as pure ASGI middleware.

FastAPI routes declared with ``@router.get`` answer HEAD with 405. Here a HEAD request runs
as the GET it mirrors and only the status and headers go out (``Content-Length`` stays that
of the GET answer, as HTTP asks), so monitors and ``curl -I`` work on every readable path.
A route without GET still answers 405.
"""

from __future__ import annotations

from typing import Any


class HeadAsGetMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
