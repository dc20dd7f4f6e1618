"""Image bytes in and out: upload sniffing and decoding with limits, PNG encoding, and
perturbation statistics. The API, audit chunks, reports, the CLI and benchmarks share it.

Decoding goes through the bundle's :class:`~service.data.preprocess.InputTransform`, the same
``apply`` that :class:`~service.data.base.FileImageSet` uses for files, so an upload and a
training image become model inputs the same way; this module adds what untrusted bytes need
(format sniffing, pixel limits from the header before decoding, errors naming the field).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from service.data.preprocess import InputTransform
from service.errors import BadImage, PayloadTooLarge, UnsupportedImageType

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
MODES = {1: "L", 3: "RGB"}
PERTURBATION_MID = 128  # grey level of "unchanged" in the stretched perturbation image


def sniff_image(data: bytes, field: str = "image") -> str:
    """The upload's format by its first bytes: ``png`` or ``jpeg``.

    Raises:
        BadImage: the upload is empty.
        UnsupportedImageType: the bytes are neither PNG nor JPEG (whatever the file name says).
    """
    if not data:
        raise BadImage(f"{field}: the uploaded file is empty", field=field)
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    raise UnsupportedImageType(
        f"{field}: not a PNG or JPEG image (checked by content, not by name or header)",
        field=field)


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) an image's header claims, read without Pillow (PNG IHDR, JPEG SOFn);
    None when the header does not say (Pillow then reads it and fails or not)."""
    if fmt == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return w, h
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _too_many_pixels(field: str, w: int, h: int, max_pixels: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field}: image is {w}x{h} = {w * h} pixels; the limit is "
                           f"{max_pixels} (HASHAUDIT_MAX_PIXELS)", field=field)


@contextlib.contextmanager
def _pillow_errors(field: str, what: str, max_pixels: int) -> Iterator[None]:
    """Map Pillow's failures on user bytes: its bomb check to a 413, anything else to a
    BadImage naming ``field`` (out of memory stays an error of the server)."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{field}: {exc} (HASHAUDIT_MAX_PIXELS is {max_pixels})",
                              field=field) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse user bytes is a bad image
        raise BadImage(f"{field}: {what}: {exc}", field=field) from None


def decode_upload(data: bytes, transform: InputTransform, max_pixels: int,
                  field: str = "image") -> tuple[np.ndarray, dict[str, Any]]:
    """Decode PNG/JPEG bytes to the model input: ``uint8`` (C, H, W) and what was done.

    The pixel count is checked from the header before any pixel is decoded (first from the
    bytes themselves, then from what Pillow reads; Pillow's own decompression-bomb error or
    warning is a 413 too), so a decompression bomb costs nothing. The image then goes through
    the bundle's recorded :class:`~service.data.preprocess.InputTransform` (colour mode,
    shorter-side resize and centre crop, or a stretch for bundles that record none), the same
    one training and indexing used. The first frame of an animated image is used. Every
    failure is a :class:`BadImage` or :class:`PayloadTooLarge` naming ``field``: callers (the
    API, audit chunks) can treat any other exception as a server fault.
    """
    fmt = sniff_image(data, field)
    claimed = header_size(data, fmt)
    if claimed is not None and claimed[0] * claimed[1] > max_pixels:
        raise _too_many_pixels(field, *claimed, max_pixels)
    with _pillow_errors(field, f"cannot read the {fmt.upper()} header", max_pixels):
        img = Image.open(io.BytesIO(data), formats=["PNG" if fmt == "png" else "JPEG"])
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImage(f"{field}: image has no pixels ({w}x{h})", field=field)
    if w * h > max_pixels:
        raise _too_many_pixels(field, w, h, max_pixels)
    with _pillow_errors(field, f"cannot decode the {fmt.upper()} image", max_pixels):
        img.load()
        pixels = transform.apply(img)
    mode = transform.mode
    done = transform.describe(w, h)
    info = {
        "format": fmt, "received_size": [w, h], "received_mode": img.mode,
        "converted_to": mode if img.mode != mode else None,
        "resized": done is not None,
        "resize": done,
        "model_input": {"channels": transform.channels, "height": transform.height,
                        "width": transform.width},
        "transform": transform.to_record(),
    }
    return pixels, info


def encode_png(chw: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (lossless; ``L`` or ``RGB``)."""
    arr = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode=MODES[chw.shape[0]]).save(
        buf, format="PNG", compress_level=3)
    return buf.getvalue()


def rmse_per_image(clean: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """RMSE in [0, 1] units of each uint8 image pair (N, ...) -> (N,)."""
    d = (adv.astype(np.float64) - clean.astype(np.float64)) / 255.0
    return np.sqrt((d.reshape(len(d), -1) ** 2).mean(1))


def psnr_db(rmse: np.ndarray) -> np.ndarray:
    """PSNR (dB, peak 1) from RMSE; inf where the image is unchanged."""
    with np.errstate(divide="ignore"):
        return np.where(rmse > 0, 20 * np.log10(1.0 / np.maximum(rmse, 1e-12)), np.inf)


def perturbation_stats(clean: np.ndarray, adv: np.ndarray) -> dict[str, Any]:
    """L-inf (in [0, 1] and in grey levels), RMSE (in [0, 1]) and PSNR (dB, peak 1)."""
    linf = int(np.abs(adv.astype(np.int16) - clean.astype(np.int16)).max()) if adv.size else 0
    rmse = float(rmse_per_image(clean[None], adv[None])[0]) if adv.size else 0.0
    psnr = float(psnr_db(np.array([rmse]))[0])
    return {"linf": linf / 255.0, "linf_levels": linf, "rmse": rmse,
            "psnr_db": None if math.isinf(psnr) else psnr}


def stretch_perturbation(clean: np.ndarray, adv: np.ndarray) -> tuple[np.ndarray, float | None]:
    """The change ``adv - clean`` as a viewable uint8 image of the same shape, and its scale.

    Mid-grey (128) is "unchanged"; the difference is multiplied by ``scale = 127 / max|d|``
    (``d`` in grey levels) and rounded, so the largest change in either direction maps to
    1 or 255 and the sign stays visible. ``scale`` is None (and the image plain 128) when
    nothing changed.
    """
    d = adv.astype(np.int16) - clean.astype(np.int16)
    span = int(np.abs(d).max()) if d.size else 0
    if span == 0:
        return np.full(d.shape, PERTURBATION_MID, np.uint8), None
    scale = 127.0 / span
    img = np.clip(np.rint(PERTURBATION_MID + d * scale), 0, 255).astype(np.uint8)
    return img, scale


