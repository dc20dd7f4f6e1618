"""Fashion-MNIST loader and IDX parser."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from service.data import (
    DEFAULT_FMNIST_DIR,
    FMNIST_CLASS_NAMES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    ArrayImageSet,
    load_fashion_mnist,
    read_idx,
)
from service.errors import ConfigError, CorruptData, DataNotFound


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Serialise a uint8 array as IDX (big-endian header, then the raw bytes)."""
    if magic is None:
        magic = 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_split(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    split: str = "test",
    compress: bool = True,
) -> tuple[Path, Path]:
    """Write one split's two IDX files into ``folder``; return (images path, labels path)."""
    prefix = "t10k" if split == "test" else "train"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, arr in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        data = idx_bytes(arr)
        path = folder / (stem + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(data) if compress else data)
        paths.append(path)
    return paths[0], paths[1]


def small_data(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


@pytest.mark.skipif(
    not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {DEFAULT_FMNIST_DIR} "
    "(sudo apt-get install -y dataset-fashion-mnist)",
)
def test_real_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HASHAUDIT_FMNIST_DIR", raising=False)
    ds = load_fashion_mnist(split="test")
    assert isinstance(ds, ArrayImageSet)
    assert ds.name == "fashion-mnist-test"
    assert len(ds) == 10_000
    assert ds.images.shape == (10_000, 1, 28, 28)
    assert ds.images.dtype == np.uint8
    assert ds.image_shape == (1, 28, 28)
    assert ds.labels.shape == (10_000, 10)
    assert ds.labels.dtype == np.uint8
    assert (ds.labels.sum(axis=1) == 1).all()
    # The test split is balanced: 1000 items per class.
    assert ds.labels.sum(axis=0).tolist() == [1000] * 10
    assert ds.class_names == list(FMNIST_CLASS_NAMES)
    assert ds.class_names[9] == "Ankle boot"
    assert ds.images.max() == 255
    image, label = ds[0]
    assert image.shape == (1, 28, 28)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert label.shape == (10,)


@pytest.mark.parametrize("compress", [True, False])
def test_roundtrip_own_files(tmp_path: Path, compress: bool) -> None:
    images, labels = small_data()
    write_split(tmp_path, images, labels, compress=compress)
    ds = load_fashion_mnist(tmp_path, split="test")
    assert ds.images.shape == (7, 1, 28, 28)
    np.testing.assert_array_equal(ds.images[:, 0], images)
    np.testing.assert_array_equal(ds.labels.argmax(axis=1), labels)
    assert ds.labels.sum() == 7
    x, y = ds.batch([2, 3])
    assert x.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(x[0, 0].numpy(), images[2] / 255.0, rtol=0, atol=1e-7)
    assert y.argmax(dim=1).tolist() == [2, 3]


def test_train_split_and_gz_preferred(tmp_path: Path) -> None:
    images, labels = small_data(5)
    write_split(tmp_path, images, labels, split="train", compress=True)
    # A stale plain copy next to the .gz must be ignored.
    write_split(tmp_path, images[:2], labels[:2], split="train", compress=False)
    ds = load_fashion_mnist(tmp_path, split="train")
    assert len(ds) == 5
    assert ds.name == "fashion-mnist-train"


def test_env_var_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = small_data(3)
    write_split(tmp_path, images, labels)
    monkeypatch.setenv("HASHAUDIT_FMNIST_DIR", str(tmp_path))
    assert len(load_fashion_mnist(split="test")) == 3


def test_missing_dir_mentions_apt(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFound) as info:
        load_fashion_mnist(missing, split="test")
    msg = str(info.value)
    assert "sudo apt-get install -y dataset-fashion-mnist" in msg
    assert "HASHAUDIT_FMNIST_DIR" in msg
    assert str(missing / "t10k-images-idx3-ubyte") in msg


def test_missing_labels_file_named(tmp_path: Path) -> None:
    images, labels = small_data()
    _, labels_path = write_split(tmp_path, images, labels)
    labels_path.unlink()
    with pytest.raises(DataNotFound, match="t10k-labels-idx1-ubyte") as info:
        load_fashion_mnist(tmp_path, split="test")
    assert "apt-get" in str(info.value)


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file(tmp_path: Path, compress: bool) -> None:
    images, labels = small_data()
    write_split(tmp_path, images, labels, compress=False)
    data = idx_bytes(images)[:-100]
    name = "t10k-images-idx3-ubyte"
    (tmp_path / name).unlink()
    target = tmp_path / (name + (".gz" if compress else ""))
    target.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(CorruptData, match="truncated") as info:
        load_fashion_mnist(tmp_path, split="test")
    assert str(target) in str(info.value)


def test_cut_gzip_stream(tmp_path: Path) -> None:
    images, labels = small_data()
    img_path, _ = write_split(tmp_path, images, labels)
    img_path.write_bytes(img_path.read_bytes()[:-50])
    with pytest.raises(CorruptData, match="gzip") as info:
        load_fashion_mnist(tmp_path, split="test")
    assert str(img_path) in str(info.value)


def test_bad_magic_swapped_files(tmp_path: Path) -> None:
    images, labels = small_data()
    img_path, lab_path = write_split(tmp_path, images, labels)
    img_bytes, lab_bytes = img_path.read_bytes(), lab_path.read_bytes()
    img_path.write_bytes(lab_bytes)
    lab_path.write_bytes(img_bytes)
    with pytest.raises(CorruptData, match="magic") as info:
        load_fashion_mnist(tmp_path, split="test")
    msg = str(info.value)
    assert str(img_path) in msg and "0x00000801" in msg and "0x00000803" in msg


def test_trailing_bytes(tmp_path: Path) -> None:
    images, labels = small_data()
    _, lab_path = write_split(tmp_path, images, labels, compress=False)
    lab_path.write_bytes(lab_path.read_bytes() + b"\x00")
    with pytest.raises(CorruptData, match="trailing"):
        load_fashion_mnist(tmp_path, split="test")


def test_label_out_of_range(tmp_path: Path) -> None:
    images, labels = small_data()
    labels[4] = 10
    _, lab_path = write_split(tmp_path, images, labels)
    with pytest.raises(CorruptData, match="label 10 at position 4") as info:
        load_fashion_mnist(tmp_path, split="test")
    assert str(lab_path) in str(info.value)


def test_count_mismatch(tmp_path: Path) -> None:
    images, labels = small_data()
    write_split(tmp_path, images, labels[:-1])
    with pytest.raises(CorruptData, match="7 images .* 6 labels"):
        load_fashion_mnist(tmp_path, split="test")


def test_wrong_image_size(tmp_path: Path) -> None:
    images = np.zeros((2, 32, 32), dtype=np.uint8)
    write_split(tmp_path, images, np.zeros(2, dtype=np.uint8))
    with pytest.raises(CorruptData, match="32x32"):
        load_fashion_mnist(tmp_path, split="test")


def test_bad_split_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_fashion_mnist(tmp_path, split="val")  # type: ignore[arg-type]
    assert info.value.field == "split"


def test_read_idx_generic(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(arr))
    out = read_idx(path, IDX_IMAGES_MAGIC)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable
    with pytest.raises(CorruptData, match="magic"):
        read_idx(path, IDX_LABELS_MAGIC)
    short = tmp_path / "short.idx"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(CorruptData, match="too short"):
        read_idx(short, IDX_LABELS_MAGIC)
    with pytest.raises(DataNotFound):
        read_idx(tmp_path / "absent.idx", IDX_LABELS_MAGIC)
