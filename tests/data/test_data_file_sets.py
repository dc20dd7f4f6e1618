"""FileImageSet, the DeepHash list loader and the image-folder loader, on real PNG/JPEG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.data import ArrayImageSet, FileImageSet, load_deephash_list, load_image_folder
from service.errors import ConfigError, CorruptData, DataNotFound

# 6 images, 3 classes, multi-hot.
LABELS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]],
    dtype=np.uint8,
)


def make_image(path: Path, value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    """Write a solid-colour image (``size`` is PIL's (W, H)) with a colour derived from value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, ...] = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def deephash_tree(tmp_path: Path) -> tuple[Path, Path]:
    """Create images/img{i}.png|jpg and a list file; return (list file, image root)."""
    root = tmp_path / "root"
    lines = []
    for i, row in enumerate(LABELS):
        ext = "png" if i % 2 == 0 else "jpg"
        rel = f"images/sub{i % 2}/img{i}.{ext}"
        make_image(root / rel, 40 * i)
        lines.append(rel + " " + " ".join(str(v) for v in row))
        if i == 2:
            lines.append("   ")  # blank lines are skipped
    list_file = tmp_path / "database.txt"
    list_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return list_file, root


def write_list(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_deephash_list_loads(deephash_tree: tuple[Path, Path]) -> None:
    list_file, root = deephash_tree
    ds = load_deephash_list(list_file, root, channels=3, size=(16, 8))
    assert isinstance(ds, FileImageSet)
    assert len(ds) == 6
    assert ds.name == "database"
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    np.testing.assert_array_equal(ds.labels, LABELS)
    assert ds.image_shape == (3, 16, 8)
    image, label = ds[0]
    assert image.shape == (3, 16, 8) and image.dtype == torch.float32
    assert label.tolist() == [1.0, 0.0, 0.0]
    # img0 is a PNG of colour (0, 255, 0): lossless, so the values are exact after resizing.
    assert torch.equal(image[1], torch.ones(16, 8))
    assert torch.equal(image[0], torch.zeros(16, 8))
    # img4 is PNG (160, 95, 80).
    image4, _ = ds[4]
    np.testing.assert_allclose(image4[:, 0, 0].numpy(), np.array([160, 95, 80]) / 255.0, atol=1e-6)
    # JPEG is lossy: only approximately equal.
    image1, _ = ds[1]
    np.testing.assert_allclose(image1[:, 4, 4].numpy(), np.array([40, 215, 20]) / 255.0, atol=0.05)


def test_deephash_list_grayscale_and_class_names(deephash_tree: tuple[Path, Path]) -> None:
    list_file, root = deephash_tree
    ds = load_deephash_list(list_file, root, channels=1, size=(5, 5), class_names=["a", "b", "c"])
    assert ds.class_names == ["a", "b", "c"]
    image, _ = ds[2]
    assert image.shape == (1, 5, 5)
    with pytest.raises(ConfigError) as info:
        load_deephash_list(list_file, root, class_names=["a", "b"])
    assert info.value.field == "class_names"


def test_materialize_and_subset(deephash_tree: tuple[Path, Path]) -> None:
    list_file, root = deephash_tree
    ds = load_deephash_list(list_file, root, channels=3, size=(6, 6))
    arr = ds.materialize()
    assert isinstance(arr, ArrayImageSet)
    assert arr.images.shape == (6, 3, 6, 6) and arr.images.dtype == np.uint8
    np.testing.assert_array_equal(arr.labels, LABELS)
    for i in range(6):
        assert torch.equal(arr[i][0], ds[i][0])
    sub = ds.subset([5, 0])
    assert isinstance(sub, FileImageSet)
    assert sub.class_names == ds.class_names and sub.image_shape == ds.image_shape
    np.testing.assert_array_equal(sub.labels, LABELS[[5, 0]])
    assert torch.equal(sub[1][0], ds[0][0])
    xb, yb = ds.batch([1, 3])
    assert xb.shape == (2, 3, 6, 6) and yb.shape == (2, 3)
    assert torch.equal(xb[1], ds[3][0])


def test_file_set_in_dataloader(deephash_tree: tuple[Path, Path]) -> None:
    list_file, root = deephash_tree
    ds = load_deephash_list(list_file, root, size=(4, 4))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(4, 3, 4, 4), (2, 3, 4, 4)]


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (["a.png 1 0 1", "b.png 1 0"], r"line 2: 2 label columns, expected 3 as on line 1"),
        (["", "a.png 1 0 1", "b.png 1 2 0"], r"line 3: label value '2' is not 0 or 1"),
        (["a.png 1 0 1", "b.png 1 0 x"], r"line 2: label value 'x'"),
        (["a.png"], r"line 1: no label columns"),
        (["a.png 1 0 0", "../outside.png 0 1 0"], r"line 2: .*escapes the image root"),
        (["a.png 1 0 0", "sub/../../outside.png 0 1 0"], r"line 2: .*escapes the image root"),
        (["/etc/passwd 1 0 0"], r"line 1: .*absolute"),
        (["", "  "], r"no entries"),
    ],
)
def test_deephash_bad_lines(tmp_path: Path, lines: list[str], pattern: str) -> None:
    root = tmp_path / "root"
    make_image(root / "a.png", 1)
    make_image(root / "b.png", 2)
    make_image(tmp_path / "outside.png", 3)
    list_file = write_list(tmp_path, lines)
    with pytest.raises(CorruptData, match=pattern) as info:
        load_deephash_list(list_file, root)
    assert str(list_file) in str(info.value)


def test_deephash_dotdot_inside_root_is_fine(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image(root / "a.png", 1)
    list_file = write_list(tmp_path, ["sub/../a.png 1"])
    assert len(load_deephash_list(list_file, root)) == 1


def test_deephash_missing_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image(root / "a.png", 1)
    list_file = write_list(tmp_path, ["a.png 1 0", "gone/b.png 0 1"])
    with pytest.raises(DataNotFound, match=r"line 2: .*gone/b\.png"):
        load_deephash_list(list_file, root)


def test_deephash_missing_list_or_root(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="list file not found"):
        load_deephash_list(tmp_path / "none.txt", tmp_path)
    list_file = write_list(tmp_path, ["a.png 1"])
    with pytest.raises(DataNotFound, match="image root"):
        load_deephash_list(list_file, tmp_path / "no-root")


def test_corrupt_image_raises_on_access(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_image(root / "good.png", 7)
    bad = root / "bad.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    list_file = write_list(tmp_path, ["good.png 1 0", "bad.png 0 1"])
    ds = load_deephash_list(list_file, root, size=(4, 4))  # existence only: loads fine
    assert ds[0][0].shape == (3, 4, 4)
    with pytest.raises(CorruptData) as info:
        ds[1]
    assert str(bad) in str(info.value)
    with pytest.raises(CorruptData, match="bad.png"):
        ds.materialize()


def test_file_set_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        FileImageSet([tmp_path / "a.png"], [[1]], ["a"], channels=2)
    assert info.value.field == "channels"
    with pytest.raises(ConfigError) as info:
        FileImageSet([tmp_path / "a.png"], [[1]], ["a"], size=(0, 4))
    assert info.value.field == "size"
    with pytest.raises(ConfigError):
        FileImageSet([tmp_path / "a.png"], [[1], [0]], ["a"])
    ds = FileImageSet([tmp_path / "a.png"], [[1]], ["a"], size=(3, 3))
    with pytest.raises(DataNotFound, match="a.png"):
        ds[0]
    with pytest.raises(IndexError):
        ds[1]


@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    # Unsorted creation order; mixed extensions and modes; a nested folder and noise files.
    make_image(root / "zebra" / "z1.PNG", 10)
    make_image(root / "apple" / "a1.jpg", 20)
    make_image(root / "apple" / "a2.png", 30, mode="L")
    make_image(root / "apple" / "nested" / "a3.bmp", 40)
    make_image(root / "mango" / "m1.webp", 50, mode="RGBA")
    (root / "mango" / "notes.txt").write_text("not an image")
    make_image(root / ".hidden" / "h.png", 60)
    make_image(root / "loose.png", 70)
    return root


def test_image_folder(folder_tree: Path) -> None:
    ds = load_image_folder(folder_tree, channels=3, size=(8, 8))
    assert ds.class_names == ["apple", "mango", "zebra"]
    assert len(ds) == 5
    assert ds.name == "classes"
    np.testing.assert_array_equal(ds.labels.argmax(axis=1), [0, 0, 0, 1, 2])
    assert (ds.labels.sum(axis=1) == 1).all()
    assert [p.name for p in ds.paths] == ["a1.jpg", "a2.png", "a3.bmp", "m1.webp", "z1.PNG"]
    x, y = ds[1]
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full((3, 8, 8), 30 / 255.0))
    assert y.tolist() == [1.0, 0.0, 0.0]
    arr = ds.materialize()
    assert arr.images.shape == (5, 3, 8, 8)
    gray = load_image_folder(folder_tree, channels=1, size=(4, 6), extensions=("png",))
    assert len(gray) == 2 and gray.image_shape == (1, 4, 6)
    assert gray[0][0].shape == (1, 4, 6)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="not found"):
        load_image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFound, match="no class sub-folders"):
        load_image_folder(empty)
    make_image(empty / "loose.png", 1)
    with pytest.raises(DataNotFound, match="1 images lie directly in it"):
        load_image_folder(empty)
    (empty / "cats").mkdir()
    (empty / "cats" / "readme.txt").write_text("x")
    with pytest.raises(DataNotFound, match="no images with extensions"):
        load_image_folder(empty)


def test_image_folder_keeps_empty_class(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_image(tmp_path / "b" / "x.png", 1)
    (tmp_path / "a").mkdir()
    ds = load_image_folder(tmp_path, size=(2, 2))
    assert ds.class_names == ["a", "b"]
    assert ds.labels.tolist() == [[0, 1]]
    assert "holds no images" in caplog.text
