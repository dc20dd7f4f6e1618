"""Synthetic multi-label RGB scenes (service.data.scenes) and `hashaudit data scenes`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import needs_fmnist
from service.cli import main
from service.data import ArrayImageSet, load_deephash_list, load_fashion_mnist
from service.data.scenes import (
    BACKGROUND_KINDS,
    SceneParams,
    background,
    item_layers,
    make_scene_set,
    write_scene_dataset,
)
from service.errors import ConfigError

SIZE = 32
COUNTS = {"database": 40, "train": 16, "query": 10}


@pytest.fixture(scope="module")
def pools() -> tuple[ArrayImageSet, ArrayImageSet]:
    """Real Fashion-MNIST: train items for database scenes, test items for query scenes."""
    needs_fmnist()
    return load_fashion_mnist(split="train"), load_fashion_mnist(split="test")


@pytest.fixture(scope="module")
def written(pools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "set"
    write_scene_dataset(out, *pools, **COUNTS, seed=4, params=SceneParams(size=SIZE))
    return out


def layout(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "layout.jsonl").read_text().splitlines()]


def all_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(pools, written: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_scene_dataset(again, *pools, **COUNTS, seed=4, params=SceneParams(size=SIZE),
                        workers=2)
    first, second = all_files(written), all_files(again)
    assert len(first) == COUNTS["database"] + COUNTS["query"] + 5
    assert first == second
    other = tmp_path / "other"
    write_scene_dataset(other, *pools, **COUNTS, seed=5, params=SceneParams(size=SIZE))
    assert all_files(other)["images/database/000000.png"] != first["images/database/000000.png"]


def test_labels_are_the_union_of_the_placed_items(pools, written: Path) -> None:
    rows = layout(written)
    lists = {"database": "database.txt", "query": "test.txt"}
    label_rows = {
        split: {ln.split()[0]: [int(v) for v in ln.split()[1:]]
                for ln in (written / name).read_text().splitlines()}
        for split, name in lists.items()}
    sizes = []
    for row in rows:
        pool = pools[0] if row["split"] == "database" else pools[1]
        classes = {it["class"] for it in row["items"]}
        # each recorded class is the class of the recorded source item
        for it in row["items"]:
            assert pool.labels[it["index"]].argmax() == it["class"]
        expected = [int(k in classes) for k in range(10)]
        assert label_rows[row["split"]][row["path"]] == expected
        assert row["labels"] == sorted(classes)
        sizes.append(len(row["items"]))
    assert min(sizes) >= 1 and max(sizes) <= 4 and len(set(sizes)) > 1
    assert sum(sum(r) > 1 for r in label_rows["database"].values()) > 10  # multi-label


def test_every_item_stays_at_least_half_visible_and_is_painted(pools, written: Path) -> None:
    """Recompute each item's uncovered opacity from the recorded boxes, and check the top item's
    opaque pixels carry its tint."""
    for row in layout(written):
        pool = pools[0] if row["split"] == "database" else pools[1]
        alphas, shades = [], []
        for it in row["items"]:
            x, y, side, _ = it["box"]
            assert 0 <= x and 0 <= y and x + side <= SIZE and y + side <= SIZE
            a, s = item_layers(pool.images[it["index"], 0], side, it["flip"])
            canvas_a = np.zeros((SIZE, SIZE), np.float64)
            canvas_a[y:y + side, x:x + side] = a
            canvas_s = np.zeros((SIZE, SIZE), np.float64)
            canvas_s[y:y + side, x:x + side] = s
            alphas.append(canvas_a)
            shades.append(canvas_s)
        for k, it in enumerate(row["items"]):
            cover = np.prod([1 - a for a in alphas[k + 1:]], axis=0) if k + 1 < len(alphas) \
                else 1.0
            visible = (alphas[k] * cover).sum() / alphas[k].sum()
            assert visible >= 0.5 - 1e-4, (row["path"], k, visible)
            assert visible == pytest.approx(it["visible"], abs=1e-3)
        top = row["items"][-1]
        pixels = np.asarray(Image.open(written / row["path"]), dtype=np.float64)
        opaque = alphas[-1] >= 1.0
        want = np.asarray(top["rgb"], np.float64)[None, :] * shades[-1][opaque][:, None]
        assert opaque.sum() > 0
        assert np.abs(pixels[opaque] - want).max() <= 2.0, row["path"]


def test_lists_load_with_the_deephash_loader(written: Path) -> None:
    record = json.loads((written / "dataset.json").read_text())
    names = record["class_names"]
    sets = {split: load_deephash_list(written / name, written, channels=3, size=(SIZE, SIZE),
                                      class_names=names)
            for split, name in record["lists"].items()}
    for split, s in sets.items():
        assert len(s) == COUNTS[split] and s.labels.shape == (COUNTS[split], 10)
        image, label = s[0]
        assert tuple(image.shape) == (3, SIZE, SIZE) and label.sum() >= 1
    with Image.open(sets["query"].paths[0]) as img:
        assert img.mode == "RGB" and img.size == (SIZE, SIZE) and img.format == "PNG"
    db_lines = (written / "database.txt").read_text().splitlines()
    train_lines = (written / "train.txt").read_text().splitlines()
    assert set(train_lines) <= set(db_lines) and len(set(train_lines)) == COUNTS["train"]
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((written / name).read_bytes()).hexdigest() == digest
    assert record["counts"] == COUNTS and record["size"] == SIZE and record["seed"] == 4


def test_query_and_database_scenes_share_no_item(pools, written: Path) -> None:
    rows = layout(written)
    used = {"database": [], "query": []}
    for row in rows:
        used[row["split"]] += [it["index"] for it in row["items"]]
    for split, pool in zip(("database", "query"), pools, strict=True):
        # within a split no item repeats while the pool lasts
        assert len(set(used[split])) == len(used[split])
        used[split] = {pool.images[i].tobytes() for i in used[split]}
    assert not used["database"] & used["query"]


def test_memory_scenes_equal_the_written_images(pools, written: Path) -> None:
    mem = make_scene_set(pools[1], COUNTS["query"], seed=4, stream=1,
                         params=SceneParams(size=SIZE))
    assert mem.images.shape == (COUNTS["query"], 3, SIZE, SIZE)
    for i in range(COUNTS["query"]):
        disk = np.asarray(Image.open(written / f"images/query/{i:06d}.png"))
        np.testing.assert_array_equal(disk.transpose(2, 0, 1), mem.images[i])
    assert [len(items) for items in mem.items] == [len(r["items"]) for r in layout(written)
                                                   if r["split"] == "query"]


def test_backgrounds_vary_and_hold_no_items() -> None:
    rng = np.random.default_rng(0)
    for kind in BACKGROUND_KINDS:
        pixels, got = background(rng, 48, kind)
        assert got == kind and pixels.shape == (48, 48, 3)
        assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.01
    with pytest.raises(ConfigError):
        background(rng, 48, "plaid")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"params": SceneParams(size=8)}, "size"),
    ({"params": SceneParams(min_items=3, max_items=2)}, "max_items"),
    ({"params": SceneParams(min_scale=0.7, max_scale=0.5)}, "max_scale"),
    ({"fmt": "gif"}, "format"),
    ({"train": 50}, "train"),
    ({"database": 0}, "database"),
    ({"workers": 0}, "workers"),
])
def test_bad_arguments_name_the_field(pools, tmp_path: Path, kwargs, field) -> None:
    args = {**COUNTS, **kwargs}
    with pytest.raises(ConfigError) as err:
        write_scene_dataset(tmp_path / "x", *pools, **args)
    assert err.value.field == field
    assert not (tmp_path / "x").exists()


def test_cli_writes_what_it_says(tmp_path: Path, capsys) -> None:
    needs_fmnist()
    out = tmp_path / "jpeg"
    assert main(["data", "scenes", "--out", str(out), "--size", "32", "--database", "30",
                 "--train", "12", "--query", "8", "--seed", "1", "--format", "jpeg",
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "wrote 38 32 px jpeg scenes" in said and str(out) in said
    assert "database.txt (30), train.txt (12), test.txt (8)" in said
    record = json.loads((out / "dataset.json").read_text())
    assert record["format"] == "jpeg" and record["counts"] == {"database": 30, "train": 12,
                                                               "query": 8}
    files = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.jpg"))
    assert len(files) == 38 and files[0] == "images/database/000000.jpg"
    with Image.open(out / files[-1]) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    listed = [ln.split()[0] for name in ("database.txt", "test.txt")
              for ln in (out / name).read_text().splitlines()]
    assert sorted(listed) == files
    # a non-empty folder is refused, nothing is overwritten
    before = (out / "database.txt").read_bytes()
    assert main(["data", "scenes", "--out", str(out), "--size", "32", "--database", "5",
                 "--train", "1", "--query", "2", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "database.txt").read_bytes() == before
