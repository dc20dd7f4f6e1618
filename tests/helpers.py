"""Test helpers importable from every test module (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FMNIST_DIR = Path(os.environ.get("HASHAUDIT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
REPO = Path(__file__).resolve().parent.parent

TINY_ARGS = [
    "hasher", "--name", "tiny", "--num-train", "1000", "--num-database", "1000",
    "--num-query", "100", "--epochs", "4", "--bits", "16", "--arch-kwargs", '{"width": 8}',
    "--batch-size", "64", "--lr", "3e-3", "--device", "cpu", "--no-progress",
]

TINY_GENERATOR_ARGS = [
    "generator", "--epochs", "3", "--num-train", "1000", "--width", "8", "--batch-size", "50",
    "--lr", "1e-3", "--device", "cpu", "--no-progress",
]


def needs_fmnist() -> None:
    """Fail (not skip) without the data: the suite promises to run on real data."""
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {FMNIST_DIR}: run `make data` "
                    "(apt-get install -y dataset-fashion-mnist)")
