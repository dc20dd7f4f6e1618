"""The input transform: how any image becomes a model input, recorded in the bundle manifest.

One :class:`InputTransform` is used by training, indexing, the API's uploads and audit
uploads, so an image is prepared the same way wherever it enters. Steps, in order:

1. convert to the model's colour mode (``L`` for 1 channel, ``RGB`` for 3; alpha dropped,
   palettes expanded);
2. resize: with ``resize`` set, the *shorter* side becomes ``resize`` pixels and the aspect
   ratio is kept (torchvision's ``Resize(int)``), or, with ``resize_mode = "stretch"``, the
   image is stretched to ``resize`` x ``resize`` (the ``ResizeImage(256)`` of the DHTA and
   CIBA code); without ``resize`` (``None``), the image is stretched to exactly ``height`` x
   ``width`` (the behaviour of bundles made before the transform was recorded);
3. centre crop to ``height`` x ``width`` (a no-op after a stretch). Crop offsets are
   ``int(round((size - crop) / 2))`` with Python's round-half-to-even, exactly as
   torchvision's ``CenterCrop`` computes them (so a 383 px side cropped to 224 starts at 80,
   not 79).

Resizing uses Pillow's bilinear filter (which low-pass filters when shrinking); an image
that already has the target size is not resampled, so ``uint8`` inputs at model size pass
through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.errors import ConfigError

MODES = {1: "L", 3: "RGB"}
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
RESIZE_MODES = ("shorter", "stretch")
TRANSFORM_VERSION = "hashaudit-input-v1"


def _positive(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be a positive integer, got {value!r}", field=field)
    return value


@dataclass(frozen=True)
class InputTransform:
    """Colour mode, optional shorter-side resize and centre crop to the model input size.

    Attributes:
        channels: 1 (``L``) or 3 (``RGB``).
        height: Model input height (the crop height).
        width: Model input width (the crop width).
        resize: Shorter side after resizing, or ``None`` to stretch to ``height`` x ``width``.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        resize_mode: ``"shorter"`` (the shorter side becomes ``resize``, aspect ratio kept) or
            ``"stretch"`` (the image becomes ``resize`` x ``resize``); used only with
            ``resize``.
    """

    channels: int
    height: int
    width: int
    resize: int | None = None
    interpolation: str = "bilinear"
    resize_mode: str = "shorter"

    def __post_init__(self) -> None:
        if self.channels not in MODES or isinstance(self.channels, bool):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels!r}",
                              field="channels")
        _positive(self.height, "height")
        _positive(self.width, "width")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got "
                              f"{self.resize_mode!r}", field="resize_mode")
        if self.resize is not None:
            _positive(self.resize, "resize")
            side = (max if self.resize_mode == "stretch" else min)(self.height, self.width)
            if self.resize < side:
                raise ConfigError(
                    f"resize ({self.resize}) must be at least the crop's "
                    f"{'longer' if self.resize_mode == 'stretch' else 'shorter'} side ({side})",
                    field="resize")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                              f"got {self.interpolation!r}", field="interpolation")

    @property
    def mode(self) -> str:
        return MODES[self.channels]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(w, h)`` after the resize step for an image of ``width`` x ``height``."""
        if self.resize is None:
            return self.width, self.height
        if self.resize_mode == "stretch":
            return self.resize, self.resize
        short = min(width, height)
        if width <= height:
            return self.resize, max(1, int(self.resize * height / short))
        return max(1, int(self.resize * width / short)), self.resize

    def apply(self, img: Image.Image) -> npt.NDArray[np.uint8]:
        """Convert, resize and crop one Pillow image; returns C-contiguous uint8 (C, H, W).

        Pillow errors propagate: callers map them to their own error (a file error names the
        file, an upload error names the form field).
        """
        out = img.convert(self.mode) if img.mode != self.mode else img
        size = self.resized_size(*out.size)
        if size != out.size:
            out = out.resize(size, INTERPOLATIONS[self.interpolation])
        w, h = out.size
        if (w, h) != (self.width, self.height):
            if w < self.width or h < self.height:  # a very thin image: stretch what is short
                out = out.resize((max(w, self.width), max(h, self.height)),
                                 INTERPOLATIONS[self.interpolation])
                w, h = out.size
            left = int(round((w - self.width) / 2.0))  # torchvision's CenterCrop offsets
            top = int(round((h - self.height) / 2.0))
            out = out.crop((left, top, left + self.width, top + self.height))
        pixels = np.asarray(out, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels)

    def describe(self, width: int, height: int) -> str | None:
        """What :meth:`apply` does to a ``width`` x ``height`` image, or None when nothing."""
        rw, rh = self.resized_size(width, height)
        steps = []
        if self.resize is None:
            if (rw, rh) != (width, height):
                steps.append(f"{self.interpolation} to {self.width}x{self.height} "
                             "(aspect ratio not kept)")
            return "; ".join(steps) or None
        if (rw, rh) != (width, height):
            what = ("stretch" if self.resize_mode == "stretch"
                    else "resize of the shorter side")
            steps.append(f"{self.interpolation} {what} to {self.resize} "
                         f"({width}x{height} -> {rw}x{rh})")
        if (rw, rh) != (self.width, self.height):
            steps.append(f"centre crop to {self.width}x{self.height}")
        return "; ".join(steps) or None

    def to_record(self) -> dict[str, Any]:
        """The manifest's ``input.transform`` record."""
        rec: dict[str, Any] = {
            "version": TRANSFORM_VERSION, "mode": self.mode, "resize_shorter": self.resize,
            "crop": [self.height, self.width], "interpolation": self.interpolation,
            "order": "convert mode, resize shorter side (none: stretch to the crop size), "
                     "centre crop (offsets as torchvision's CenterCrop)"}
        if self.resize_mode == "stretch":
            rec["resize_mode"] = "stretch"
            rec["resize_shorter"] = None
            rec["resize_square"] = self.resize
            rec["order"] = ("convert mode, stretch to resize_square x resize_square, centre "
                            "crop (offsets as torchvision's CenterCrop)")
        return rec

    @classmethod
    def from_input(cls, inp: dict[str, Any]) -> InputTransform:
        """The transform of a manifest's ``input`` block; a block without ``transform`` (a
        bundle made before it was recorded) stretches to the input size."""
        channels, height, width = int(inp["channels"]), int(inp["height"]), int(inp["width"])
        rec = inp.get("transform")
        if not rec:
            return cls(channels, height, width)
        crop = rec.get("crop", [height, width])
        if [int(crop[0]), int(crop[1])] != [height, width]:
            raise ConfigError(f"input.transform.crop {crop} differs from the input size "
                              f"{height}x{width}", field="input.transform")
        mode = str(rec.get("resize_mode", "shorter"))
        resize = rec.get("resize_square") if mode == "stretch" else rec.get("resize_shorter")
        return cls(channels, height, width, None if resize is None else int(resize),
                   str(rec.get("interpolation", "bilinear")), mode)


def decode_file(path: str, transform: InputTransform) -> npt.NDArray[np.uint8]:
    """Open an image file and apply ``transform`` (errors propagate; see :meth:`apply`)."""
    with Image.open(path) as img:
        return transform.apply(img)


def thumbnail_size(height: int, width: int, side: int) -> tuple[int, int]:
    """``(h, w)`` of a display thumbnail: the longer side at most ``side``, aspect kept."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def make_thumbnails(images: npt.NDArray[np.uint8], side: int) -> npt.NDArray[np.uint8]:
    """Downscale uint8 (N, C, H, W) images so the longer side is at most ``side`` (Pillow
    box filter); images already that small are returned as they are."""
    n, c, h, w = images.shape
    th, tw = thumbnail_size(h, w, side)
    if (th, tw) == (h, w):
        return images
    out = np.empty((n, c, th, tw), np.uint8)
    for k in range(n):
        arr = images[k, 0] if c == 1 else images[k].transpose(1, 2, 0)
        small = Image.fromarray(arr).resize((tw, th), Image.Resampling.BOX)
        px = np.asarray(small, np.uint8)
        out[k] = px[None] if px.ndim == 2 else px.transpose(2, 0, 1)
    return out
