"""Data sources a bundle config can name: each yields (database pool, query pool) image sets.

The database pool is a train split, the query pool a test split, as in deep-hashing practice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.data.base import ArrayImageSet, ImageSet
from service.data.deephash_list import load_deephash_list
from service.data.fashion_mnist import load_fashion_mnist
from service.data.image_folder import load_image_folder
from service.data.mosaic import make_mosaic_set
from service.errors import ConfigError
from service.registry import Registry

SOURCES: Registry[tuple[ImageSet, ImageSet]] = Registry("data source")

# Keys of a [data] table that describe the split protocol rather than the source.
SPLIT_KEYS = ("num_query", "num_database", "num_train", "seed", "stratified")


@SOURCES.register("fashion_mnist")
def fashion_mnist(root: str | None = None) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)."""
    return load_fashion_mnist(root or None, "train"), load_fashion_mnist(root or None, "test")


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


@SOURCES.register("deephash_list")
def deephash_list(
    database_list: str, query_list: str, image_root: str, channels: int = 3,
    size: tuple[int, int] | list[int] = (224, 224), class_names: list[str] | None = None,
) -> tuple[ImageSet, ImageSet]:
    """DeepHash-pytorch style lists (``path l1 ... lC``) for the database and query pools."""
    sz = (int(size[0]), int(size[1]))
    return (load_deephash_list(database_list, image_root, channels, sz, class_names),
            load_deephash_list(query_list, image_root, channels, sz, class_names))


@SOURCES.register("image_folder")
def image_folder(
    database_root: str, query_root: str, channels: int = 3,
    size: tuple[int, int] | list[int] = (224, 224),
) -> tuple[ImageSet, ImageSet]:
    """Two image folders (one class per sub-folder) for the database and query pools."""
    sz = (int(size[0]), int(size[1]))
    db = load_image_folder(database_root, channels=channels, size=sz)
    q = load_image_folder(query_root, channels=channels, size=sz)
    if q.class_names != db.class_names:
        raise ConfigError("query and database folders must have the same class sub-folders",
                          field="data.query_root")
    return db, q


def load_source(data_cfg: dict[str, Any]) -> tuple[ImageSet, ImageSet]:
    """Load the (database pool, query pool) named by a config's ``[data]`` table."""
    cfg = {k: v for k, v in data_cfg.items() if k not in SPLIT_KEYS and k != "kind"}
    factory: Callable[..., tuple[ImageSet, ImageSet]] = SOURCES.get(
        str(data_cfg.get("kind", "")), field="data.kind"
    )
    try:
        return factory(**cfg)
    except TypeError as exc:
        raise ConfigError(f"bad [data] options for kind {data_cfg.get('kind')!r}: {exc}",
                          field="data") from exc


def materialize(s: ImageSet) -> ArrayImageSet:
    """An in-memory version of ``s`` (no copy when it already is one)."""
    if isinstance(s, ArrayImageSet):
        return s
    return s.materialize()  # type: ignore[attr-defined]
