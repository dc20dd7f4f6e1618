"""ArrayImageSet and the shared ImageSet behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.data import ArrayImageSet, ImageSet, as_index_array
from service.errors import ConfigError


def make_set(n: int = 10) -> ArrayImageSet:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 1, 4, 5), dtype=np.uint8)
    labels = np.zeros((n, 3), dtype=np.uint8)
    labels[np.arange(n), np.arange(n) % 3] = 1
    return ArrayImageSet(images, labels, ["a", "b", "c"], name="toy")


def test_getitem_and_batch_agree() -> None:
    ds = make_set()
    assert isinstance(ds, ImageSet)
    assert len(ds) == 10 and ds.image_shape == (1, 4, 5) and ds.num_classes == 3
    x, y = ds[3]
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert x.shape == (1, 4, 5) and y.shape == (3,)
    np.testing.assert_allclose(x.numpy(), ds.images[3] / 255.0, atol=1e-7)
    xb, yb = ds.batch(np.array([3, 7, 3]))
    assert xb.shape == (3, 1, 4, 5) and yb.shape == (3, 3)
    assert torch.equal(xb[0], x) and torch.equal(xb[2], x) and torch.equal(yb[0], y)
    assert torch.equal(ds[-1][0], ds[9][0])
    # Mutating a returned tensor must not touch the stored pixels.
    before = ds.images.copy()
    xb.zero_()
    x.zero_()
    np.testing.assert_array_equal(ds.images, before)


def test_subset_keeps_metadata() -> None:
    ds = make_set()
    sub = ds.subset([8, 2])
    assert isinstance(sub, ArrayImageSet)
    assert sub.class_names == ds.class_names and sub.name == "toy"
    np.testing.assert_array_equal(sub.images, ds.images[[8, 2]])
    np.testing.assert_array_equal(sub.labels, ds.labels[[8, 2]])
    mask = np.zeros(10, dtype=bool)
    mask[[1, 4]] = True
    assert len(ds.subset(mask)) == 2
    assert len(ds.subset(torch.tensor([0, 1, 2]))) == 3
    assert len(ds.subset([])) == 0
    assert ds.batch([])[0].shape == (0, 1, 4, 5)


def test_index_errors() -> None:
    ds = make_set()
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(IndexError):
        ds.subset([0, 10])
    with pytest.raises(IndexError):
        ds.batch([-1])
    with pytest.raises(IndexError):
        as_index_array(np.ones(3, dtype=bool), 10)
    with pytest.raises(ConfigError):
        as_index_array([0.5], 10)


def test_validation() -> None:
    images = np.zeros((2, 1, 3, 3), dtype=np.uint8)
    with pytest.raises(ConfigError) as info:
        ArrayImageSet(images.astype(np.float32), [[1], [0]], ["a"])  # type: ignore[arg-type]
    assert info.value.field == "images"
    with pytest.raises(ConfigError):
        ArrayImageSet(images[0], [[1], [0]], ["a"])
    with pytest.raises(ConfigError, match="columns"):
        ArrayImageSet(images, [[1, 0], [0, 1]], ["a"])
    with pytest.raises(ConfigError, match="only 0 and 1"):
        ArrayImageSet(images, [[2], [0]], ["a"])
    with pytest.raises(ConfigError, match="2 images but 3 label rows"):
        ArrayImageSet(images, [[1], [0], [1]], ["a"])


def test_dataloader() -> None:
    ds = make_set()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(batches[0][0], ds.batch(range(4))[0])
