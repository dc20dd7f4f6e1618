"""The recorded input transform against the pipelines it claims to reproduce: torchvision's
``Resize(256)`` + ``CenterCrop(224)`` (DeepHash-pytorch's test transform) and the DHTA/CIBA
``ResizeImage(256)`` + ``PlaceCrop(224, 15.5, 15.5)`` (a square stretch, then the centre)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from service.data.preprocess import InputTransform
from service.errors import ConfigError

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
