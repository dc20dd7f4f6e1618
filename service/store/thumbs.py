"""Gallery thumbnails stored as one lossless PNG atlas (row-major tiles).

A PNG atlas is about half the size of raw uint8 for Fashion-MNIST-like images, which keeps a
20,000-image gallery well inside a git-friendly bundle. Decoding is exact.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from service.errors import BundleError

_MODES = {1: "L", 3: "RGB"}


def atlas_columns(n: int) -> int:
    """Tiles per atlas row: about twice as wide as tall."""
    return max(1, math.ceil(math.sqrt(2 * n)))


def encode_atlas(thumbs: np.ndarray) -> tuple[bytes, int]:
    """(N, C, H, W) uint8 -> (PNG bytes, columns)."""
    n, c, h, w = thumbs.shape
    if c not in _MODES:
        raise ValueError(f"thumbnails need 1 or 3 channels, got {c}")
    cols = atlas_columns(n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w, c), dtype=np.uint8)
    grid[:n] = thumbs.transpose(0, 2, 3, 1)
    grid = grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode=_MODES[c])
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    return buf.getvalue(), cols


def decode_atlas(data: bytes, n: int, c: int, h: int, w: int, cols: int) -> np.ndarray:
    """PNG atlas -> (N, C, H, W) uint8; checks the atlas size against the layout."""
    rows = math.ceil(n / cols)
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, rows * h * cols * w + 1)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError) as exc:
        raise BundleError(f"thumbnail atlas is not a readable PNG: {exc}") from exc
    if img.size != (cols * w, rows * h) or img.mode != _MODES.get(c):
        raise BundleError(
            f"thumbnail atlas is {img.size} {img.mode}, layout implies "
            f"{(cols * w, rows * h)} {_MODES.get(c)}"
        )
    a = np.asarray(img)
    if c == 1:
        a = a[..., None]
    a = a.reshape(rows, h, cols, w, c).transpose(0, 2, 4, 1, 3).reshape(rows * cols, c, h, w)
    return np.ascontiguousarray(a[:n])
