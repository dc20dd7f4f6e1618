"""A fast path for the small multipart bodies of ``/attack`` and ``/encode``.

Starlette parses ``multipart/form-data`` with python-multipart's streaming parser: a Python
callback per header, per part and per data chunk, and a spooled temporary file per upload.
For a request of one small PNG and a few text fields that is most of the event loop's time
per request (profiled with py-spy at 32 clients: about 40% of the event-loop thread).

:class:`FastFormRoute` gives those routes a request whose ``form()`` reads the whole body
(already capped by ``BodyLimitMiddleware``) and splits it at the boundary with bytes
operations. Only a body that is plainly well-formed takes this path: a preamble, transport
padding, a part without a ``name``, a ``_charset_`` field, any count or size over the limits
FastAPI passes, or anything else unusual hands the (cached) body to Starlette's own parser,
so errors and edge cases behave exactly as before. Values are decoded as Starlette decodes
them (the charset of the Content-Type, falling back to latin-1); uploads become
``UploadFile`` objects over an in-memory buffer (read and closed inline, without a trip
through the thread pool).
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers, UploadFile

FAST_MAX_BYTES = 4 * 1024 * 1024  # larger bodies take Starlette's streaming parser
MAX_PART_HEADERS = 8  # header lines per part; more: Starlette's parser decides


class _InMemory(io.BytesIO):
    """An upload's bytes; ``_rolled = False`` tells ``UploadFile`` they are in memory, so its
    ``read`` and ``close`` run inline instead of in the thread pool."""

    _rolled = False


def _decode(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return raw.decode("latin-1")


def _charset(params: dict[bytes, bytes]) -> str:
    raw = params.get(b"charset", b"utf-8")
    try:
        return codecs.lookup(raw.decode("latin-1")).name
    except LookupError:
        return "latin-1"


def parse_multipart(content_type: str, body: bytes, *, max_files: float, max_fields: float,
                    max_part_size: int) -> FormData | None:
    """The form in ``body``, or None when it is not a plainly well-formed form within the
    limits (the caller then uses Starlette's parser, which gives the usual errors)."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary or len(body) > FAST_MAX_BYTES:
        return None
    charset = _charset(params)
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary)
    # pieces[0]: the (empty) preamble; pieces[-1]: "--" and an optional CRLF (the end)
    if len(pieces) < 2 or pieces[0] or pieces[-1] not in (b"--", b"--\r\n"):
        return None
    items: list[tuple[str, str | UploadFile]] = []
    files = fields = 0
    for piece in pieces[1:-1]:
        if not piece.startswith(b"\r\n"):
            return None
        head, sep, data = piece[2:].partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.split(b"\r\n")
        if len(lines) > MAX_PART_HEADERS:
            return None
        raw_headers: list[tuple[bytes, bytes]] = []
        disposition = None
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return None
            name = name.lower()
            value = value.strip()
            raw_headers.append((name, value))
            if name == b"content-disposition":
                disposition = value
        if disposition is None:
            return None
        dkind, options = parse_options_header(disposition)
        if dkind != b"form-data" or b"name" not in options:
            return None
        field = _decode(options[b"name"], charset)
        if field == "_charset_":
            return None
        if b"filename" in options:
            files += 1
            if files > max_files:
                return None
            upload = UploadFile(_InMemory(data), size=len(data),
                                filename=_decode(options[b"filename"], charset),
                                headers=Headers(raw=raw_headers))
            items.append((field, upload))
        else:
            fields += 1
            if fields > max_fields or len(data) > max_part_size:
                return None
            items.append((field, _decode(data, charset)))
    return FormData(items)


class FastFormRequest(Request):
    """A request whose ``form()`` parses small, well-formed multipart bodies in one pass."""

    async def _get_form(self, *, max_files: float = 1000, max_fields: float = 1000,
                        max_part_size: int = 1024 * 1024) -> FormData:
        if self._form is None:
            content_type = self.headers.get("content-type", "")
            if content_type.lower().startswith("multipart/form-data"):
                body = await self.body()  # Starlette's parser re-reads this cached body
                self._form = parse_multipart(content_type, body, max_files=max_files,
                                             max_fields=max_fields,
                                             max_part_size=max_part_size)
        if self._form is None:
            return await super()._get_form(max_files=max_files, max_fields=max_fields,
                                           max_part_size=max_part_size)
        return self._form


class FastFormRoute(APIRoute):
    """Route class for endpoints taking small multipart forms (``APIRouter(route_class=...)``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def fast_form_handler(request: Request) -> Response:
            return await handler(FastFormRequest(request.scope, request.receive))

        return fast_form_handler
