"""Upload decoding and perturbation stats of the serving pipeline (real encoded images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.data.preprocess import InputTransform
from service.errors import BadImage, PayloadTooLarge, UnsupportedImageType
from service.images import (
    decode_upload,
    encode_png,
    perturbation_stats,
    sniff_image,
    stretch_perturbation,
)


def encoded(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def test_png_roundtrip_is_exact_and_untouched():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    pixels, info = decode_upload(encode_png(img), InputTransform(1, 28, 28), 10_000)
    assert np.array_equal(pixels, img)
    assert info["resized"] is False and info["converted_to"] is None


def test_rgb_jpeg_is_converted_and_resized():
    rgb = np.full((50, 30, 3), 200, np.uint8)
    pixels, info = decode_upload(encoded(rgb, "JPEG"), InputTransform(1, 28, 28), 10_000)
    assert pixels.shape == (1, 28, 28) and abs(int(pixels.mean()) - 200) <= 2
    assert info["received_size"] == [30, 50] and info["converted_to"] == "L" and info["resized"]
    grey = np.zeros((28, 28), np.uint8)
    rgb_out, info = decode_upload(encoded(grey, "PNG"), InputTransform(3, 28, 28), 10_000)
    assert rgb_out.shape == (3, 28, 28) and info["converted_to"] == "RGB"


def test_pixel_limit_is_checked_before_decoding():
    big = encoded(np.zeros((100, 100), np.uint8), "PNG")
    with pytest.raises(PayloadTooLarge) as exc:
        decode_upload(big, InputTransform(1, 28, 28), max_pixels=9_999)
    assert exc.value.field == "image" and "10000 pixels" in exc.value.message


@pytest.mark.parametrize("data,err", [
    (b"", BadImage), (b"GIF89a....", UnsupportedImageType), (b"%PDF-1.4", UnsupportedImageType),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, BadImage), (b"\xff\xd8\xff\xe0garbage", BadImage),
])
def test_non_images_are_refused_by_content(data, err):
    with pytest.raises(err) as exc:
        decode_upload(data, InputTransform(1, 28, 28), 10_000)
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


def test_stretched_perturbation_keeps_sign_and_maps_the_largest_change_to_full_range():
    clean = np.full((3, 5, 5), 100, np.uint8)
    adv = clean.copy()
    adv[0, 0, 0], adv[1, 2, 3], adv[2, 4, 4] = 104, 92, 101  # +4, -8 (largest), +1
    img, scale = stretch_perturbation(clean, adv)
    assert img.shape == clean.shape and img.dtype == np.uint8 and scale == pytest.approx(127 / 8)
    assert (img[1, 2, 3], img[0, 0, 0], img[2, 4, 4]) == (1, 128 + round(4 * 127 / 8),
                                                          128 + round(127 / 8))
    assert (img == 128).sum() == img.size - 3
    flat, none = stretch_perturbation(clean, clean)
    assert none is None and (flat == 128).all()


def _declare_default(folder, method: str):
    """Rewrite a bundle copy's manifest with ``extra.default_method`` (new checksums)."""
    from service.store.bundle import MANIFEST, SUMS, finalize
    from service.store.manifest import Manifest

    m = Manifest.from_json((folder / MANIFEST).read_text())
    payload = [ln.split()[1] for ln in (folder / SUMS).read_text().splitlines()
               if ln.split()[1] != MANIFEST]
    finalize(folder, m.replace(extra={**m.extra, "default_method": method}), payload)


def test_default_method_rule_and_manifest_declaration(tiny_bundle, tiny_bundle_copy, caplog):
    from service.serving import RULE_DEFAULT_METHOD, BundleService
    from service.store.bundle import load_bundle

    svc = BundleService(tiny_bundle)
    assert (svc.default_method, svc.default_method_source) == (RULE_DEFAULT_METHOD, "rule")
    assert svc.check_method(None) == svc.check_method(None, has_labels=False) == "pgd"
    _declare_default(tiny_bundle_copy, "untargeted_gan")
    declared = BundleService(load_bundle(tiny_bundle_copy))
    assert (declared.default_method, declared.default_method_source) == ("untargeted_gan",
                                                                         "manifest")
    assert declared.check_method(None) == "untargeted_gan"
    # untargeted_gan needs labels: without them the trained label-free generator runs
    assert declared.check_method(None, has_labels=False) == declared.label_free_method == "uaa_gan"
    assert declared.summary()["default_method_source"] == "manifest"
    _declare_default(tiny_bundle_copy, "targeted_gan")  # needs a target: not a default
    assert BundleService(load_bundle(tiny_bundle_copy)).default_method_source == "rule"
    _declare_default(tiny_bundle_copy, "saliency_gan_missing")
    fallback = BundleService(load_bundle(tiny_bundle_copy))
    assert (fallback.default_method, fallback.default_method_source) == ("pgd", "rule")
    assert "saliency_gan_missing" in caplog.text


def test_note_names_what_to_try_and_stays_quiet_when_the_hits_moved(tiny_bundle):
    from service.serving import BundleService, Query

    svc = BundleService(tiny_bundle)
    q = tiny_bundle.queries
    labelled = Query(image=q.images[0], labels=q.labels[0])
    bare = Query(image=q.images[0])
    assert svc._note("untargeted_gan", 8 / 255, True, True, 5, labelled) is None
    n = svc._note("untargeted_gan", 8 / 255, False, False, 0, labelled)
    assert n.startswith("The adversarial code equals the clean code: untargeted_gan at eps "
                        "8/255")
    assert "method=dhta or method=pgd" in n and "e.g. 16/255" in n and "25.5/255" in n
    n = svc._note("pgd", 8 / 255, True, False, 1, bare)  # dhta needs labels: not offered
    assert "moved by 1 bit, but the top-10 hits" in n and "method=" not in n and "16/255" in n
    n = svc._note("pgd", svc.max_eps, False, False, 0, bare)
    assert "hard to move at this budget" in n
    n = svc._note("targeted_gan", 8 / 255, False, False, 0,
                  Query(image=q.images[0], labels=q.labels[0], target=q.labels[1]))
    assert "method=tha_targeted or method=dhta_targeted" in n
