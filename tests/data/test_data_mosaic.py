"""Multi-label mosaics."""

from __future__ import annotations

import numpy as np
import pytest

from service.data import ArrayImageSet, MosaicImageSet, make_mosaic_set
from service.errors import ConfigError


def make_base(n: int = 40, size: int = 28, channels: int = 1) -> ArrayImageSet:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
    labels = np.zeros((n, 10), dtype=np.uint8)
    labels[np.arange(n), rng.integers(0, 10, n)] = 1
    return ArrayImageSet(images, labels, [f"c{k}" for k in range(10)], name="fashion-mnist")


def test_labels_are_union_and_pixels_are_pooled_tiles() -> None:
    base = make_base()
    mos = make_mosaic_set(base, n=25, seed=7)
    assert isinstance(mos, MosaicImageSet)
    assert mos.name == "fashion-mnist-mosaic2x2"
    assert mos.images.shape == (25, 1, 28, 28) and mos.images.dtype == np.uint8
    assert mos.image_shape == base.image_shape
    assert mos.class_names == base.class_names
    assert mos.tile_indices.shape == (25, 4)
    for i in range(25):
        tiles = mos.tile_indices[i]
        expected = np.bitwise_or.reduce(base.labels[tiles], axis=0)
        np.testing.assert_array_equal(mos.labels[i], expected)
        for k, t in enumerate(tiles):
            r, c = divmod(k, 2)
            pooled = base.images[t, 0].astype(np.float64).reshape(14, 2, 14, 2).mean(axis=(1, 3))
            np.testing.assert_array_equal(
                mos.images[i, 0, 14 * r : 14 * (r + 1), 14 * c : 14 * (c + 1)],
                np.round(pooled).astype(np.uint8),
            )
    assert (mos.labels.sum(axis=1) >= 1).all() and (mos.labels.sum(axis=1) <= 4).all()
    assert (mos.labels.sum(axis=1) > 1).any()


def test_deterministic_given_seed() -> None:
    base = make_base()
    a = make_mosaic_set(base, n=12, seed=1)
    b = make_mosaic_set(base, n=12, seed=1)
    c = make_mosaic_set(base, n=12, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.tile_indices, b.tile_indices)
    assert not np.array_equal(a.tile_indices, c.tile_indices)


def test_other_grids_and_rgb() -> None:
    base = make_base(n=8, size=28, channels=3)
    mos = make_mosaic_set(base, n=5, seed=0, grid=3, name="m3")
    assert mos.name == "m3" and mos.images.shape == (5, 3, 28, 28)
    assert mos.tile_indices.shape == (5, 9)
    # A constant base image gives constant tiles whatever the pooling geometry.
    flat = ArrayImageSet(
        np.full((2, 1, 28, 28), 77, dtype=np.uint8), np.eye(2, dtype=np.uint8), ["a", "b"]
    )
    assert (make_mosaic_set(flat, n=3, seed=0, grid=3).images == 77).all()
    assert make_mosaic_set(flat, n=3, seed=0, grid=4).images.shape == (3, 1, 28, 28)


def test_subset_keeps_tiles() -> None:
    mos = make_mosaic_set(make_base(), n=10, seed=0)
    sub = mos.subset([9, 3])
    assert isinstance(sub, MosaicImageSet)
    np.testing.assert_array_equal(sub.tile_indices, mos.tile_indices[[9, 3]])
    np.testing.assert_array_equal(sub.images, mos.images[[9, 3]])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0, "seed": 0}, "n"),
        ({"n": 3, "seed": -1}, "seed"),
        ({"n": 3, "seed": 0, "grid": 0}, "grid"),
        ({"n": 3, "seed": 0, "grid": 29}, "grid"),
        ({"n": 2.5, "seed": 0}, "n"),
    ],
)
def test_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_mosaic_set(make_base(n=4), **kwargs)
    assert info.value.field == field
