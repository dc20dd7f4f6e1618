"""Upload decoding and perturbation stats of the serving pipeline (real encoded images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import BadImage, PayloadTooLarge, UnsupportedImageType
from service.inference import decode_upload, encode_png, perturbation_stats, sniff_image


def encoded(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def test_png_roundtrip_is_exact_and_untouched():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    pixels, info = decode_upload(encode_png(img), 1, 28, 28, 10_000)
    assert np.array_equal(pixels, img)
    assert info["resized"] is False and info["converted_to"] is None


def test_rgb_jpeg_is_converted_and_resized():
    rgb = np.full((50, 30, 3), 200, np.uint8)
    pixels, info = decode_upload(encoded(rgb, "JPEG"), 1, 28, 28, 10_000)
    assert pixels.shape == (1, 28, 28) and abs(int(pixels.mean()) - 200) <= 2
    assert info["received_size"] == [30, 50] and info["converted_to"] == "L" and info["resized"]
    grey = np.zeros((28, 28), np.uint8)
    rgb_out, info = decode_upload(encoded(grey, "PNG"), 3, 28, 28, 10_000)
    assert rgb_out.shape == (3, 28, 28) and info["converted_to"] == "RGB"


def test_pixel_limit_is_checked_before_decoding():
    big = encoded(np.zeros((100, 100), np.uint8), "PNG")
    with pytest.raises(PayloadTooLarge) as exc:
        decode_upload(big, 1, 28, 28, max_pixels=9_999)
    assert exc.value.field == "image" and "10000 pixels" in exc.value.message


@pytest.mark.parametrize("data,err", [
    (b"", BadImage), (b"GIF89a....", UnsupportedImageType), (b"%PDF-1.4", UnsupportedImageType),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, BadImage), (b"\xff\xd8\xff\xe0garbage", BadImage),
])
def test_non_images_are_refused_by_content(data, err):
    with pytest.raises(err) as exc:
        decode_upload(data, 1, 28, 28, 10_000)
    assert exc.value.field == "image"


def test_sniff_ignores_names():
    assert sniff_image(encoded(np.zeros((2, 2), np.uint8), "JPEG")) == "jpeg"


def test_perturbation_stats():
    a = np.zeros((1, 4, 4), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 8
    s = perturbation_stats(a, b)
    assert s["linf_levels"] == 8 and s["linf"] == pytest.approx(8 / 255)
    assert s["rmse"] == pytest.approx(np.sqrt(64 / 16) / 255)
    assert s["psnr_db"] == pytest.approx(20 * np.log10(1 / s["rmse"]))
    assert perturbation_stats(a, a)["psnr_db"] is None
