"""Pixel conversions and the shift/flip augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.data import random_shift_flip, to_float, to_uint8
from service.errors import ConfigError


def test_uint8_round_trip_exact() -> None:
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    f = to_float(every)
    assert f.dtype == torch.float32
    assert float(f.min()) == 0.0 and float(f.max()) == 1.0
    back = to_uint8(f)
    assert back.dtype == torch.uint8
    assert torch.equal(back, torch.from_numpy(every))
    assert torch.equal(to_uint8(to_float(torch.from_numpy(every))), torch.from_numpy(every))


def test_to_uint8_rounds_and_clamps() -> None:
    x = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 1.7])
    assert to_uint8(x).tolist() == [0, 0, 0, 1, 255, 255]


def test_conversion_errors() -> None:
    with pytest.raises(ConfigError):
        to_float(np.zeros(3, dtype=np.float32))
    with pytest.raises(ConfigError):
        to_uint8(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ConfigError):
        to_uint8(torch.tensor([float("nan")]))


def test_shift_flip_shape_range_determinism() -> None:
    batch = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    original = batch.clone()
    a = random_shift_flip(batch, torch.Generator().manual_seed(5))
    b = random_shift_flip(batch, torch.Generator().manual_seed(5))
    c = random_shift_flip(batch, torch.Generator().manual_seed(6))
    assert a.shape == batch.shape and a.dtype == batch.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(batch, original), "input must not be modified"


def test_shift_flip_semantics() -> None:
    base = torch.arange(1, 26, dtype=torch.float32).reshape(1, 1, 5, 5) / 25.0
    batch = base.repeat(64, 1, 1, 1)
    out = random_shift_flip(batch, torch.Generator().manual_seed(0), max_shift=1, flip=True)
    candidates = []
    for img in (base[0, 0], base[0, 0].flip(-1)):
        padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
        candidates += [padded[dy : dy + 5, dx : dx + 5] for dy in range(3) for dx in range(3)]
    seen = set()
    for k in range(64):
        matches = [j for j, cand in enumerate(candidates) if torch.equal(out[k, 0], cand)]
        assert matches, f"item {k} is not a shifted/flipped copy"
        seen.add(matches[0])
    assert len(seen) > 6, "the batch should show several different shifts and flips"


def test_shift_flip_identity_and_validation() -> None:
    batch = torch.rand(4, 3, 8, 8)
    same = random_shift_flip(batch, torch.Generator().manual_seed(0), max_shift=0, flip=False)
    assert torch.equal(same, batch)
    no_flip = random_shift_flip(batch, torch.Generator().manual_seed(0), max_shift=0, flip=True)
    for k in range(4):
        assert torch.equal(no_flip[k], batch[k]) or torch.equal(no_flip[k], batch[k].flip(-1))
    with pytest.raises(ConfigError):
        random_shift_flip(batch[0], torch.Generator())
    with pytest.raises(ConfigError):
        random_shift_flip(batch, torch.Generator(), max_shift=-1)
    with pytest.raises(ConfigError):
        random_shift_flip(batch.to(torch.uint8), torch.Generator())
