"""The recorded input transform: shorter-side resize + centre crop, or the format-1 stretch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.data.preprocess import InputTransform, make_thumbnails, thumbnail_size
from service.errors import ConfigError


def _img(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * 1000 + h)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def test_resize_shorter_side_then_centre_crop_matches_pillow_steps():
    t = InputTransform(3, 64, 64, resize=72)
    img = _img(640, 480)
    out = t.apply(img)
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    step = img.resize((96, 72), Image.Resampling.BILINEAR)  # 640x480 -> shorter side 72
    want = np.asarray(step.crop((16, 4, 80, 68))).transpose(2, 0, 1)
    assert np.array_equal(out, want)
    assert t.describe(640, 480) == ("bilinear resize of the shorter side to 72 "
                                    "(640x480 -> 96x72); centre crop to 64x64")


def test_portrait_images_keep_their_aspect_ratio():
    t = InputTransform(3, 32, 32, resize=32)
    assert t.resized_size(300, 600) == (32, 64)
    assert t.apply(_img(300, 600)).shape == (3, 32, 32)


def test_stretch_without_resize_is_the_format_1_behaviour():
    t = InputTransform(1, 28, 28)
    img = _img(50, 30, "L")
    want = np.asarray(img.resize((28, 28), Image.Resampling.BILINEAR))[None]
    assert np.array_equal(t.apply(img), want)
    assert t.describe(50, 30) == "bilinear to 28x28 (aspect ratio not kept)"


def test_model_size_inputs_pass_through_unchanged():
    img = _img(64, 64)
    assert np.array_equal(InputTransform(3, 64, 64, resize=64).apply(img),
                          np.asarray(img).transpose(2, 0, 1))
    assert InputTransform(3, 64, 64, resize=64).describe(64, 64) is None


def test_record_round_trip_and_legacy_manifests():
    t = InputTransform(3, 224, 224, resize=256)
    inp = {"channels": 3, "height": 224, "width": 224, "transform": t.to_record()}
    assert InputTransform.from_input(inp) == t
    assert InputTransform.from_input({"channels": 1, "height": 28, "width": 28}) == \
        InputTransform(1, 28, 28, None)
    with pytest.raises(ConfigError) as exc:
        InputTransform.from_input({**inp, "transform": {**t.to_record(), "crop": [200, 200]}})
    assert exc.value.field == "input.transform"


@pytest.mark.parametrize("kwargs,field", [
    ({"channels": 2}, "channels"), ({"resize": 10}, "resize"), ({"resize": 0}, "resize"),
    ({"interpolation": "nearest"}, "interpolation"), ({"height": 0}, "height"),
])
def test_bad_transforms_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        InputTransform(**{"channels": 3, "height": 32, "width": 32, **kwargs})
    assert exc.value.field == field


def test_thumbnails_are_capped_whatever_the_input_size():
    assert thumbnail_size(224, 224, 64) == (64, 64)
    assert thumbnail_size(28, 28, 64) == (28, 28)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    small = make_thumbnails(imgs, 64)
    assert small.shape == (3, 3, 64, 64)
    same = imgs[:, :, :28, :28].copy()
    assert make_thumbnails(same, 64) is same
