"""Multi-label mosaics built from a single-label image set.

Each mosaic is a ``grid x grid`` arrangement of randomly drawn items of a base set. Every
tile is the base image shrunk by area averaging so that the whole mosaic keeps the base
image size ``(H, W)``: with ``H`` and ``W`` divisible by ``grid`` each tile is exactly a
``grid x grid`` average pooling of its source image (e.g. four 14x14 tiles from 28x28
Fashion-MNIST images by 2x2 average pooling). Otherwise the tile rows and columns get
``floor`` or ``ceil`` of ``H / grid`` and ``W / grid`` pixels and adaptive average pooling is
used. Averages are rounded to the nearest integer (half to even). The mosaic's label is the
union (element-wise OR) of its tiles' labels.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional

from service.data._checks import non_negative_int, positive_int
from service.data.base import ArrayImageSet, IndexLike, as_index_array
from service.errors import ConfigError

logger = logging.getLogger(__name__)

_POOL_CHUNK = 8192


class MosaicImageSet(ArrayImageSet):
    """An :class:`ArrayImageSet` of mosaics that remembers which base items form each one.

    Attributes:
        grid: Tiles per side.
        tile_indices: ``int64`` array ``(N, grid * grid)``: positions in the base set of the
            tiles of each mosaic, row-major (tile ``k`` sits in row ``k // grid``, column
            ``k % grid``).
    """

    def __init__(
        self,
        images: npt.NDArray[np.uint8],
        labels: npt.ArrayLike,
        class_names: list[str],
        name: str,
        *,
        grid: int,
        tile_indices: npt.NDArray[np.int64],
    ) -> None:
        """Wrap mosaic pixels, labels and their tile indices.

        Args:
            images: ``uint8`` mosaics ``(N, C, H, W)``.
            labels: Multi-hot labels ``(N, num_classes)``.
            class_names: The base set's class names.
            name: Name of the set.
            grid: Tiles per side.
            tile_indices: ``(N, grid * grid)`` positions in the base set.

        Raises:
            ConfigError: The shapes do not agree.
        """
        super().__init__(images, labels, class_names, name)
        tiles = np.asarray(tile_indices, dtype=np.int64)
        if tiles.shape != (len(self), grid * grid):
            raise ConfigError(
                f"tile_indices must have shape {(len(self), grid * grid)}, got {tiles.shape}",
                field="tile_indices",
            )
        self.grid: int = grid
        self.tile_indices: npt.NDArray[np.int64] = tiles

    def subset(self, indices: IndexLike) -> MosaicImageSet:
        """Return the selected mosaics, keeping their tile indices.

        Args:
            indices: Positions into this set (or a boolean mask).

        Returns:
            A new :class:`MosaicImageSet` with the same classes, name and grid.
        """
        idx = as_index_array(indices, len(self))
        return MosaicImageSet(
            self.images[idx],
            self.labels[idx],
            self.class_names,
            self.name,
            grid=self.grid,
            tile_indices=self.tile_indices[idx],
        )


def _edges(length: int, grid: int) -> list[int]:
    """Split ``length`` pixels into ``grid`` nearly equal runs; return the ``grid + 1`` edges."""
    return [(k * length) // grid for k in range(grid + 1)]


def _pool(images: npt.NDArray[np.uint8], out_hw: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """Area-average ``uint8`` images ``(N, C, H, W)`` to ``out_hw``, rounding to ``uint8``."""
    out = np.empty((images.shape[0], images.shape[1], *out_hw), dtype=np.uint8)
    for start in range(0, images.shape[0], _POOL_CHUNK):
        chunk = torch.from_numpy(images[start : start + _POOL_CHUNK]).to(torch.float32)
        pooled = functional.adaptive_avg_pool2d(chunk, out_hw)
        out[start : start + _POOL_CHUNK] = (
            torch.round(pooled).clamp_(0, 255).to(torch.uint8).numpy()
        )
    return out


def make_mosaic_set(
    base: ArrayImageSet,
    n: int,
    seed: int,
    grid: int = 2,
    name: str | None = None,
) -> MosaicImageSet:
    """Build ``n`` random ``grid x grid`` mosaics of items of ``base``.

    The tiles are drawn uniformly with replacement with ``np.random.default_rng(seed)``
    (one call, ``integers(0, len(base), size=(n, grid * grid))``), so the result depends
    only on ``base``, ``n``, ``seed`` and ``grid``. Tile shrinking is described in the
    module docstring.

    Args:
        base: In-memory source set (usually single-label, e.g. Fashion-MNIST).
        n: Number of mosaics, ``>= 1``.
        seed: Non-negative random seed.
        grid: Tiles per side, ``1 <= grid <= min(H, W)``.
        name: Name of the result; default ``"<base.name>-mosaic<grid>x<grid>"``.

    Returns:
        A :class:`MosaicImageSet` with the base's class names and image shape, labels equal
        to the OR of the tiles' labels and the tile positions in ``tile_indices``.

    Raises:
        ConfigError: ``n``, ``seed`` or ``grid`` are out of range, or ``base`` is empty.
    """
    n = positive_int(n, "n")
    grid = positive_int(grid, "grid")
    seed_value = non_negative_int(seed, "seed")
    if len(base) == 0:
        raise ConfigError("cannot build mosaics from an empty base set", field="base")
    channels, height, width = base.image_shape
    if grid > min(height, width):
        raise ConfigError(f"grid {grid} exceeds the base image size {height}x{width}", field="grid")

    rng = np.random.default_rng(seed_value)
    tile_indices = rng.integers(0, len(base), size=(n, grid * grid), dtype=np.int64)
    used, inverse = np.unique(tile_indices, return_inverse=True)
    inverse = inverse.reshape(tile_indices.shape)
    sources = base.images[used]

    rows, cols = _edges(height, grid), _edges(width, grid)
    mosaics = np.empty((n, channels, height, width), dtype=np.uint8)
    pooled_by_size: dict[tuple[int, int], npt.NDArray[np.uint8]] = {}
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        r0, r1, c0, c1 = rows[r], rows[r + 1], cols[c], cols[c + 1]
        tile_hw = (r1 - r0, c1 - c0)
        if tile_hw not in pooled_by_size:
            pooled_by_size[tile_hw] = _pool(sources, tile_hw)
        mosaics[:, :, r0:r1, c0:c1] = pooled_by_size[tile_hw][inverse[:, k]]

    labels = base.labels[tile_indices].max(axis=1)
    result_name = name if name is not None else f"{base.name}-mosaic{grid}x{grid}"
    logger.debug("built %d %dx%d mosaics from %s (seed %d)", n, grid, grid, base.name, seed_value)
    return MosaicImageSet(
        mosaics,
        labels,
        base.class_names,
        result_name,
        grid=grid,
        tile_indices=tile_indices,
    )
