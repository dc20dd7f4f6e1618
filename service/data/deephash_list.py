"""Loader for image lists in the DeepHash-pytorch text format.

Each non-blank line holds an image path relative to an image root followed by the item's
multi-hot label, all separated by whitespace::

    images/0001.jpg 0 1 0 0 1
    images/0002.jpg 1 0 0 0 0

Every line must have the same number of label columns and every label value must be ``0``
or ``1``. Paths cannot contain whitespace, must be relative and must stay inside the image
root (a lexical check: ``..`` components that climb out of it are rejected; symbolic links
inside the root are followed as usual).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from service.data.base import FileImageSet, PathLikeStr, check_size
from service.data.preprocess import InputTransform
from service.errors import ConfigError, CorruptData, DataNotFound

logger = logging.getLogger(__name__)

_MAX_LISTED_MISSING = 5


def _resolve_entry(root: str, entry: str, list_file: Path, line_no: int) -> Path:
    """Join ``entry`` to ``root`` after checking it is relative and does not escape."""
    if (
        PurePosixPath(entry).is_absolute()
        or PureWindowsPath(entry).is_absolute()
        or PureWindowsPath(entry).drive
        or entry.startswith(("/", "\\"))
    ):
        raise CorruptData(
            f"{list_file}, line {line_no}: image path {entry!r} is absolute; paths must be "
            "relative to the image root",
            field="list_file",
        )
    joined = os.path.normpath(os.path.join(root, entry))
    if joined != root and not joined.startswith(root.rstrip(os.sep) + os.sep):
        raise CorruptData(
            f"{list_file}, line {line_no}: image path {entry!r} escapes the image root {root}",
            field="list_file",
        )
    return Path(joined)


def parse_list_lines(lines: Iterable[str], source: object
                     ) -> Iterator[tuple[int, str, list[int]]]:
    """``(line number, path, label values)`` of each non-blank line, checked as it comes.

    Shared by :func:`load_deephash_list` and the uploaded query sets of audits, so both read
    the format the same way. ``source`` names the list in messages.

    Raises:
        CorruptData: a line has no label column, a label value other than ``0``/``1``, or
            another number of label columns than the first entry (the message names the line).
    """
    num_columns: int | None = None
    first_line = 0
    for line_no, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        entry, values = tokens[0], tokens[1:]
        if not values:
            raise CorruptData(
                f"{source}, line {line_no}: no label columns after the path {entry!r}",
                field="list_file",
            )
        if num_columns is None:
            num_columns, first_line = len(values), line_no
        elif len(values) != num_columns:
            raise CorruptData(
                f"{source}, line {line_no}: {len(values)} label columns, expected "
                f"{num_columns} as on line {first_line}",
                field="list_file",
            )
        bad = [v for v in values if v not in ("0", "1")]
        if bad:
            raise CorruptData(
                f"{source}, line {line_no}: label value {bad[0][:20]!r} is not 0 or 1",
                field="list_file",
            )
        yield line_no, entry, [1 if v == "1" else 0 for v in values]


def load_deephash_list(
    list_file: PathLikeStr,
    image_root: PathLikeStr,
    channels: int = 3,
    size: tuple[int, int] = (224, 224),
    resize: int | None = None,
    class_names: Sequence[str] | None = None,
    name: str | None = None,
    interpolation: str = "bilinear",
    resize_mode: str = "shorter",
) -> FileImageSet:
    """Read a DeepHash-pytorch list file into a lazily decoded :class:`FileImageSet`.

    All image files are checked for existence here, so a missing file fails early.

    Args:
        list_file: The text file, one ``path l1 ... lC`` entry per line (UTF-8).
        image_root: Folder the paths are relative to.
        channels: 1 (grayscale) or 3 (RGB); see :class:`FileImageSet`.
        size: ``(H, W)`` of the decoded images (the crop size); see :class:`FileImageSet`.
        resize: Shorter side before the centre crop (``None``: stretch to ``size``).
        class_names: One name per label column; default ``"class_0"``, ``"class_1"``, ...
        name: Name of the set; default the list file's stem.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (see :class:`InputTransform`).
        resize_mode: ``"shorter"`` or ``"stretch"`` (see :class:`InputTransform`).

    Returns:
        The set, in file order, with the parsed multi-hot labels.

    Raises:
        DataNotFound: The list file, the image root or an image file is missing (the
            message names the path and the line).
        CorruptData: A line has no label, a label value other than 0/1, a different number
            of label columns than the first entry, an absolute path or a path escaping the
            image root (the message names the line); or the list holds no entries.
        ConfigError: ``class_names`` does not have one name per label column, or
            ``channels``/``size`` are invalid.
    """
    list_path = Path(list_file)
    root_path = Path(image_root)
    h, w = check_size(size)
    transform = InputTransform(channels, h, w, resize, interpolation, resize_mode)
    if not list_path.is_file():
        raise DataNotFound(f"DeepHash list file not found: {list_path}", field="list_file")
    if not root_path.is_dir():
        raise DataNotFound(f"image root folder not found: {root_path}", field="image_root")
    root = os.path.normpath(os.path.abspath(root_path))
    try:
        text = list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptData(f"{list_path}: not valid UTF-8 text ({exc})", field="list_file") from exc

    paths: list[Path] = []
    rows: list[list[int]] = []
    line_numbers: list[int] = []
    num_columns: int | None = None
    for line_no, entry, values in parse_list_lines(text.splitlines(), list_path):
        num_columns = len(values)
        paths.append(_resolve_entry(root, entry, list_path, line_no))
        rows.append(values)
        line_numbers.append(line_no)

    if num_columns is None:
        raise CorruptData(f"{list_path}: the list holds no entries", field="list_file")

    if class_names is None:
        names = [f"class_{k}" for k in range(num_columns)]
    else:
        names = [str(c) for c in class_names]
        if len(names) != num_columns:
            raise ConfigError(
                f"{len(names)} class names given but {list_path} has {num_columns} label columns",
                field="class_names",
            )

    missing = [(n, p) for n, p in zip(line_numbers, paths, strict=True) if not p.is_file()]
    if missing:
        shown = "; ".join(f"line {n}: {p}" for n, p in missing[:_MAX_LISTED_MISSING])
        extra = len(missing) - _MAX_LISTED_MISSING
        more = f" (and {extra} more)" if extra > 0 else ""
        raise DataNotFound(
            f"{list_path}: {len(missing)} image file(s) not found: {shown}{more}",
            field="image_root",
        )

    labels = np.asarray(rows, dtype=np.uint8)
    logger.debug("read %d entries with %d classes from %s", len(paths), num_columns, list_path)
    return FileImageSet(
        paths,
        labels,
        names,
        channels=channels,
        size=size,
        transform=transform,
        name=name if name is not None else list_path.stem,
    )
