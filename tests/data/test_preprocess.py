"""The recorded input transform: shorter-side resize + centre crop, or the format-1 stretch;
and against the pipelines it claims to reproduce: torchvision's ``Resize(256)`` +
``CenterCrop(224)`` (DeepHash-pytorch's test transform) and the DHTA/CIBA ``ResizeImage(256)``
+ ``PlaceCrop(224, 15.5, 15.5)`` (a square stretch, then the centre)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

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


# (width, height): 640x427 and 383x256-like sides put the crop offset on a .5 that
# torchvision rounds half to even (159 / 2 = 79.5 -> 80), which a floor would miss
SIZES = [(640, 427), (500, 375), (427, 640), (300, 300), (257, 1000), (383, 256), (224, 224)]


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", SIZES)
def test_shorter_side_resize_and_centre_crop_equal_torchvision(size: tuple[int, int]) -> None:
    img = _image(*size, seed=size[0] * 7 + size[1])
    ours = InputTransform(3, 224, 224, 256).apply(img)
    theirs = np.asarray(transforms.Compose([transforms.Resize(256),
                                            transforms.CenterCrop(224)])(img))
    assert np.array_equal(ours, theirs.transpose(2, 0, 1))


def test_offset_rounds_half_to_even_as_torchvision() -> None:
    # 640x427 -> 383x256: (383 - 224) / 2 = 79.5, torchvision starts the crop at 80
    img = _image(640, 427, 0)
    resized = img.resize((383, 256), Image.Resampling.BILINEAR)
    expect = np.asarray(resized)[16:240, 80:304].transpose(2, 0, 1)
    assert np.array_equal(InputTransform(3, 224, 224, 256).apply(img), expect)


@pytest.mark.parametrize("size", [(640, 427), (300, 300), (200, 500)])
def test_stretch_mode_equals_dhta_resize_image_and_place_crop(size: tuple[int, int]) -> None:
    img = _image(*size, seed=1)
    t = InputTransform(3, 224, 224, 256, "bicubic", "stretch")
    start = (256 - 224 - 1) / 2  # 15.5, as the DHTA and CIBA test transforms write it
    theirs = img.resize((256, 256), Image.Resampling.BICUBIC).crop(
        (start, start, start + 224, start + 224))
    assert np.array_equal(t.apply(img), np.asarray(theirs).transpose(2, 0, 1))


def test_stretch_mode_record_round_trip_and_checks() -> None:
    t = InputTransform(3, 224, 224, 256, "bicubic", "stretch")
    rec = t.to_record()
    assert rec["resize_mode"] == "stretch" and rec["resize_square"] == 256
    back = InputTransform.from_input({"channels": 3, "height": 224, "width": 224,
                                      "transform": rec})
    assert back == t
    assert "stretch to 256" in (t.describe(640, 427) or "")
    plain = InputTransform(3, 224, 224, 256)
    assert "resize_mode" not in plain.to_record()
    assert InputTransform.from_input({"channels": 3, "height": 224, "width": 224,
                                      "transform": plain.to_record()}) == plain
    with pytest.raises(ConfigError) as info:
        InputTransform(3, 224, 224, 256, "bilinear", "squash")
    assert info.value.field == "resize_mode"
    with pytest.raises(ConfigError) as info:
        InputTransform(3, 100, 300, 200, "bilinear", "stretch")
    assert info.value.field == "resize" and "longer" in info.value.message
