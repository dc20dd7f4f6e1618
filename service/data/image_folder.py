"""Loader for a folder of class sub-folders (``root/<class>/**/<image>``).

Each non-hidden sub-folder of the root is one class; classes are sorted by folder name and
labels are one-hot. Images are found recursively inside each class folder by file extension
(case-insensitive); hidden files and folders (names starting with ``.``) are skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from service.data.base import FileImageSet, PathLikeStr, check_size
from service.data.preprocess import InputTransform
from service.errors import DataNotFound

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""File extensions :func:`load_image_folder` accepts by default."""


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Lower-case the extensions and give each a leading dot."""
    out = []
    for ext in extensions:
        e = ext.lower().strip()
        out.append(e if e.startswith(".") else f".{e}")
    return tuple(out)


def _images_under(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Return the image files below ``folder`` in a deterministic (sorted) order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if not fname.startswith(".") and fname.lower().endswith(extensions):
                found.append(Path(dirpath) / fname)
    return found


def load_image_folder(
    root: PathLikeStr,
    channels: int = 3,
    size: tuple[int, int] = (224, 224),
    resize: int | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    name: str | None = None,
    interpolation: str = "bilinear",
    resize_mode: str = "shorter",
) -> FileImageSet:
    """Index a class-per-sub-folder image tree as a lazily decoded :class:`FileImageSet`.

    A class folder without any image is kept as a class (so class indices depend only on
    the folder names) and a warning is logged.

    Args:
        root: Folder whose sub-folders are the classes.
        channels: 1 (grayscale) or 3 (RGB); see :class:`FileImageSet`.
        size: ``(H, W)`` of the decoded images (the crop size); see :class:`FileImageSet`.
        resize: Shorter side before the centre crop (``None``: stretch to ``size``).
        extensions: Accepted file extensions, with or without the leading dot.
        name: Name of the set; default the root folder's name.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (see :class:`InputTransform`).
        resize_mode: ``"shorter"`` or ``"stretch"`` (see :class:`InputTransform`).

    Returns:
        The set, ordered by class then path, with one-hot labels and the sorted folder
        names as ``class_names``.

    Raises:
        DataNotFound: The root does not exist, has no class sub-folders, or none of them
            holds an image with one of the accepted extensions.
        ConfigError: ``channels`` or ``size`` are invalid.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise DataNotFound(f"image folder not found: {folder}", field="root")
    exts = _normalise_extensions(extensions)
    class_dirs = sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not class_dirs:
        loose = len(_images_under(folder, exts))
        detail = f" ({loose} images lie directly in it)" if loose else ""
        raise DataNotFound(
            f"image folder {folder} has no class sub-folders{detail}; put the images of "
            "each class in a sub-folder named after the class",
            field="root",
        )
    paths: list[Path] = []
    class_index: list[int] = []
    for k, class_dir in enumerate(class_dirs):
        files = _images_under(class_dir, exts)
        if not files:
            logger.warning("class folder %s holds no images with extensions %s", class_dir, exts)
        paths.extend(files)
        class_index.extend([k] * len(files))
    if not paths:
        raise DataNotFound(
            f"no images with extensions {', '.join(exts)} found in the {len(class_dirs)} "
            f"class sub-folders of {folder}",
            field="root",
        )
    labels = np.zeros((len(paths), len(class_dirs)), dtype=np.uint8)
    labels[np.arange(len(paths)), np.asarray(class_index)] = 1
    logger.debug("indexed %d images in %d classes under %s", len(paths), len(class_dirs), folder)
    return FileImageSet(
        paths,
        labels,
        [d.name for d in class_dirs],
        channels=channels,
        size=size,
        transform=InputTransform(channels, *check_size(size), resize, interpolation,
                                 resize_mode),
        name=name if name is not None else folder.resolve().name,
    )
