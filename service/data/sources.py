"""Data sources a bundle config can name, and the reference a bundle keeps to them.

Each source yields (database pool, query pool) image sets: the database pool is a train
split, the query pool a test split, as in deep-hashing practice.

A bundle does not copy its training images. It records a *source reference*
(:func:`source_record`): the source kind, its options, and the sha256 of every file that
identifies the data (IDX files, list files; for an image folder, a digest of its file listing).
Generator, backdoor and hardening training and large query sets read the images back through
:func:`open_source`, which re-checks those digests first, so training never runs silently on
data that changed since the bundle was made.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.data.base import ArrayImageSet, FileImageSet, ImageSet
from service.data.deephash_list import load_deephash_list
from service.data.fashion_mnist import (
    FMNIST_FILES,
    default_fmnist_dir,
    find_idx_file,
    load_fashion_mnist,
)
from service.data.image_folder import load_image_folder
from service.data.mosaic import make_mosaic_set
from service.errors import BundleError, ConfigError, DataNotFound
from service.registry import Registry

SOURCES: Registry[tuple[ImageSet, ImageSet]] = Registry("data source")
FINGERPRINTS: dict[str, Callable[..., dict[str, str]]] = {}

# Keys of a [data] table that describe the split protocol rather than the source.
SPLIT_KEYS = ("num_query", "num_database", "num_train", "seed", "stratified")
SOURCE_VERSION = "hashaudit-source-v1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(*paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        if not p.is_file():
            raise DataNotFound(f"data file not found: {p}", field="data")
        out[str(p.resolve())] = _sha256(p)
    return out


def _size(size: tuple[int, int] | list[int] | int) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


@SOURCES.register("fashion_mnist")
def fashion_mnist(root: str | None = None) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)."""
    return load_fashion_mnist(root or None, "train"), load_fashion_mnist(root or None, "test")


def _fmnist_files(root: str | None = None, **_: Any) -> dict[str, str]:
    folder = Path(root) if root else default_fmnist_dir()
    return _files(*(find_idx_file(folder, n) for pair in FMNIST_FILES.values() for n in pair))


FINGERPRINTS["fashion_mnist"] = _fmnist_files
FINGERPRINTS["fashion_mnist_mosaic"] = _fmnist_files


@SOURCES.register("fashion_mnist_mosaic")
def fashion_mnist_mosaic(
    root: str | None = None, num_train_items: int = 20000, num_test_items: int = 2000,
    grid: int = 2, seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """Multi-label mosaics of Fashion-MNIST items (train mosaics from train, test from test)."""
    train, test = fashion_mnist(root)
    assert isinstance(train, ArrayImageSet) and isinstance(test, ArrayImageSet)
    return (make_mosaic_set(train, num_train_items, seed=seed, grid=grid),
            make_mosaic_set(test, num_test_items, seed=seed + 1, grid=grid))


def _empty_like(pool: FileImageSet, name: str) -> FileImageSet:
    """A query pool with no images (a data source that has only a database)."""
    return FileImageSet([], np.zeros((0, pool.num_classes), np.uint8), pool.class_names,
                        channels=pool.channels, size=pool.size, transform=pool.transform,
                        name=name)


@SOURCES.register("deephash_list")
def deephash_list(
    database_list: str, query_list: str | None, image_root: str, channels: int = 3,
    size: tuple[int, int] | list[int] = (224, 224), resize: int | None = None,
    class_names: list[str] | None = None, interpolation: str = "bilinear",
    resize_mode: str = "shorter",
) -> tuple[ImageSet, ImageSet]:
    """DeepHash-pytorch style lists (``path l1 ... lC``) for the database and query pools.
    ``size`` is the model input (the crop); ``resize`` the shorter side before the centre crop
    (default: stretch to ``size``, as DeepHash-pytorch's test transform for square inputs);
    ``interpolation`` and ``resize_mode`` as in :class:`InputTransform`. Without
    ``query_list`` the query pool is empty (a database indexed without queries)."""
    sz = _size(size)
    opts = {"interpolation": interpolation, "resize_mode": resize_mode}
    db = load_deephash_list(database_list, image_root, channels, sz, resize, class_names,
                            **opts)
    if query_list is None:
        return db, _empty_like(db, "no-queries")
    return db, load_deephash_list(query_list, image_root, channels, sz, resize, class_names,
                                  **opts)


FINGERPRINTS["deephash_list"] = lambda database_list, query_list, **_: _files(
    *(Path(p) for p in (database_list, query_list) if p is not None))


def _scenes_meta(root: str) -> dict[str, Any]:
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataNotFound(f"{path} not found: `hashaudit data scenes` writes it last, so the "
                           "folder is not a complete scene data set", field="data.root")
    meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return meta


@SOURCES.register("scenes")
def scenes(root: str, size: int | None = None, resize: int | None = None,
           channels: int = 3) -> tuple[ImageSet, ImageSet]:
    """A synthetic scene set written by ``hashaudit data scenes`` (its database and test
    lists). ``size`` defaults to the scenes' size, ``resize`` to ``size``."""
    meta = _scenes_meta(root)
    sz = int(size or meta["size"])
    lists = meta["lists"]
    names = list(meta["class_names"])
    return (load_deephash_list(Path(root) / lists["database"], root, channels, (sz, sz),
                               resize or sz, names, name="scenes-database"),
            load_deephash_list(Path(root) / lists["query"], root, channels, (sz, sz),
                               resize or sz, names, name="scenes-query"))


def _scenes_files(root: str, **_: Any) -> dict[str, str]:
    lists = _scenes_meta(root)["lists"]
    return _files(Path(root) / "dataset.json", Path(root) / lists["database"],
                  Path(root) / lists["query"])


FINGERPRINTS["scenes"] = _scenes_files


@SOURCES.register("image_folder")
def image_folder(
    database_root: str, query_root: str | None, channels: int = 3,
    size: tuple[int, int] | list[int] = (224, 224), resize: int | None = None,
    interpolation: str = "bilinear", resize_mode: str = "shorter",
) -> tuple[ImageSet, ImageSet]:
    """Two image folders (one class per sub-folder) for the database and query pools (no
    ``query_root``: an empty query pool)."""
    sz = _size(size)
    opts = {"channels": channels, "size": sz, "resize": resize,
            "interpolation": interpolation, "resize_mode": resize_mode}
    db = load_image_folder(database_root, **opts)
    if query_root is None:
        return db, _empty_like(db, "no-queries")
    q = load_image_folder(query_root, **opts)
    if q.class_names != db.class_names:
        raise ConfigError("query and database folders must have the same class sub-folders",
                          field="data.query_root")
    return db, q


def _listing(root: str) -> tuple[str, str]:
    """A digest of a folder's file listing (relative paths and sizes, sorted)."""
    folder = Path(root)
    if not folder.is_dir():
        raise DataNotFound(f"image folder not found: {folder}", field="data")
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(f"{p.relative_to(folder)}\0{p.stat().st_size}\n".encode())
    return f"{folder.resolve()}/ (file listing)", h.hexdigest()


FINGERPRINTS["image_folder"] = lambda database_root, query_root, **_: dict(
    _listing(r) for r in (database_root, query_root) if r is not None)


def source_options(data_cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The kind and the loader options of a config's ``[data]`` table."""
    return (str(data_cfg.get("kind", "")),
            {k: v for k, v in data_cfg.items() if k not in SPLIT_KEYS and k != "kind"})


def load_source(data_cfg: dict[str, Any]) -> tuple[ImageSet, ImageSet]:
    """Load the (database pool, query pool) named by a config's ``[data]`` table."""
    kind, cfg = source_options(data_cfg)
    factory: Callable[..., tuple[ImageSet, ImageSet]] = SOURCES.get(kind, field="data.kind")
    try:
        return factory(**cfg)
    except TypeError as exc:
        raise ConfigError(f"bad [data] options for kind {kind!r}: {exc}",
                          field="data") from exc


def source_record(data_cfg: dict[str, Any], pool_sizes: tuple[int, int]) -> dict[str, Any]:
    """The reference a bundle records: kind, options, file digests and pool sizes."""
    kind, cfg = source_options(data_cfg)
    finger = FINGERPRINTS.get(kind)
    files = finger(**cfg) if finger else {}
    return {"version": SOURCE_VERSION, "kind": kind, "options": cfg, "files": files,
            "pool_sizes": {"database": int(pool_sizes[0]), "query": int(pool_sizes[1])}}


def open_source(record: dict[str, Any], bundle: str) -> tuple[ImageSet, ImageSet]:
    """Re-open a bundle's data source after checking that it is there and unchanged.

    Raises:
        DataNotFound: A recorded file is missing (the message names it and the bundle).
        BundleError: A file's sha256 or a pool's size differs from the record.
    """
    hint = ("the bundle does not copy its training images; it reads them through the data "
            "source recorded in its manifest (dataset.reference)")
    kind, opts = str(record.get("kind", "")), dict(record.get("options", {}))
    finger = FINGERPRINTS.get(kind)
    try:
        found = finger(**opts) if finger else {}
    except DataNotFound as exc:
        raise DataNotFound(f"{bundle}: data source missing: {exc}; {hint}",
                           field="dataset.reference") from None
    for path, sha in dict(record.get("files", {})).items():
        if path not in found:
            raise DataNotFound(f"{bundle}: data source file {path} not found; {hint}",
                               field="dataset.reference")
        if found[path] != sha:
            raise BundleError(
                f"{bundle}: data source file {path} changed since the bundle was made "
                f"(sha256 {sha[:12]}... recorded, {found[path][:12]}... now); restore it or "
                "rebuild the bundle", field="dataset.reference")
    db, q = load_source({"kind": kind, **opts})
    sizes = record.get("pool_sizes", {})
    for name, pool in (("database", db), ("query", q)):
        if name in sizes and int(sizes[name]) != len(pool):
            raise BundleError(f"{bundle}: the data source's {name} pool has {len(pool)} "
                              f"images, the bundle recorded {sizes[name]}",
                              field="dataset.reference")
    return db, q


def materialize(s: ImageSet, workers: int = 1) -> ArrayImageSet:
    """An in-memory version of ``s`` (no copy when it already is one)."""
    if isinstance(s, ArrayImageSet):
        return s
    return s.materialize(workers)  # type: ignore[attr-defined]
