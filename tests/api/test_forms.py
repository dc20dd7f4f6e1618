"""The fast multipart path of /attack and /encode parses what Starlette's parser parses, and
hands everything unusual back to it."""

from __future__ import annotations

import asyncio

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.api.forms import parse_multipart

B = "b0undary"
CT = f"multipart/form-data; boundary={B}"
LIMITS = {"max_files": 1000, "max_fields": 1000, "max_part_size": 1024 * 1024}


def body(*parts: bytes, end: bytes = b"--\r\n") -> bytes:
    return b"".join(b"--" + B.encode() + b"\r\n" + p + b"\r\n" for p in parts) \
        + b"--" + B.encode() + end


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def upload(name: str, filename: str, data: bytes) -> bytes:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data


async def _starlette(content_type: str, raw: bytes) -> list[tuple[str, object]]:
    async def stream():
        yield raw

    form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
    return await _items(form)


async def _items(form) -> list[tuple[str, object]]:
    out = []
    for k, v in form.multi_items():
        if isinstance(v, UploadFile):
            out.append((k, ("file", v.filename, await v.read(), v.headers.get("content-type"))))
        else:
            out.append((k, v))
    return out


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n--not-the-boundary\r\n" + b"\x00" * 50

SAME = {
    "attack form": body(upload("image", "q.png", PNG), field("labels", b"Coat"),
                        field("labels", b"3"), field("eps", b"8/255"), field("top_k", b"10")),
    "empty values": body(field("model", b""), field("method", b"")),
    "utf-8 names and values": body(field("labels", "Mäntel, T-Shirt/Top".encode()),
                                   upload("image", "bild-ä.png", b"x")),
    "latin-1 fallback": body(field("labels", b"caf\xe9")),
    "value with CRLF inside": body(field("note", b"a\r\nb\r\n\r\nc")),
    "no trailing CRLF after the end": body(field("top_k", b"5"), end=b"--"),
    "empty file": body(upload("image", "e.png", b"")),
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_same_items_as_starlette(name):
    raw = SAME[name]
    fast = parse_multipart(CT, raw, **LIMITS)
    assert fast is not None, "a plain form must take the fast path"
    assert asyncio.run(_items(fast)) == asyncio.run(_starlette(CT, raw))


FALLBACK = {
    "preamble": b"hello\r\n" + body(field("a", b"1")),
    "part without a name": body(b'Content-Disposition: form-data\r\n\r\nx'),
    "no content-disposition": body(b"Content-Type: text/plain\r\n\r\nx"),
    "_charset_ field": body(field("_charset_", b"latin-1"), field("a", b"1")),
    "no end marker": b"--" + B.encode() + b"\r\n" + field("a", b"1") + b"\r\n",
    "header without colon": body(b'Content-Disposition form-data; name="a"\r\n\r\nx'),
    "part without blank line": body(b'Content-Disposition: form-data; name="a"'),
}


@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_unusual_bodies_go_to_starlette(name):
    assert parse_multipart(CT, FALLBACK[name], **LIMITS) is None


def test_limits_go_to_starlette_which_refuses():
    many = body(*(field(f"f{i}", b"1") for i in range(5)))
    assert parse_multipart(CT, many, **{**LIMITS, "max_fields": 4}) is None
    files = body(upload("a", "a.png", b"1"), upload("b", "b.png", b"2"))
    assert parse_multipart(CT, files, **{**LIMITS, "max_files": 1}) is None
    big = body(field("a", b"x" * 2000))
    assert parse_multipart(CT, big, **{**LIMITS, "max_part_size": 1000}) is None

    async def stream():
        yield many

    with pytest.raises(MultiPartException, match="Too many fields"):
        asyncio.run(MultiPartParser(Headers({"content-type": CT}), stream(),
                                    max_fields=4).parse())


def test_other_content_types_and_missing_boundary():
    raw = body(field("a", b"1"))
    assert parse_multipart("multipart/form-data", raw, **LIMITS) is None
    assert parse_multipart("application/x-www-form-urlencoded", b"a=1", **LIMITS) is None
