"""Fashion-MNIST loader with a self-contained IDX parser.

The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) are looked up in a folder, each
either gzip-compressed (``.gz``) or plain. On Debian they come with the
``dataset-fashion-mnist`` package under :data:`DEFAULT_FMNIST_DIR`; the environment variable
``HASHAUDIT_FMNIST_DIR`` points elsewhere.

IDX format (big-endian): two zero bytes, a type byte (``0x08`` = unsigned byte), a byte with
the number of dimensions ``d``, ``d`` 32-bit sizes, then ``prod(sizes)`` data bytes. Images
therefore start with magic ``0x00000803`` (3 dims) and labels with ``0x00000801`` (1 dim).
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import numpy.typing as npt

from service.data.base import ArrayImageSet, PathLikeStr
from service.errors import ConfigError, CorruptData, DataNotFound

logger = logging.getLogger(__name__)

DEFAULT_FMNIST_DIR: Path = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the files."""

FMNIST_ENV_VAR = "HASHAUDIT_FMNIST_DIR"
"""Environment variable that overrides :data:`DEFAULT_FMNIST_DIR`."""

FMNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""The ten Fashion-MNIST classes, in label order."""

FMNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Per split: base names (without ``.gz``) of the image file and the label file."""

IDX_IMAGES_MAGIC = 0x00000803
"""Magic number of an IDX file of unsigned bytes with three dimensions."""

IDX_LABELS_MAGIC = 0x00000801
"""Magic number of an IDX file of unsigned bytes with one dimension."""

FMNIST_IMAGE_SIZE = 28

INSTALL_HINT = (
    "install it with: sudo apt-get install -y dataset-fashion-mnist (Debian) "
    f"or set {FMNIST_ENV_VAR} to a folder holding the four IDX files"
)

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def default_fmnist_dir() -> Path:
    """Return the folder used when no root is given.

    Returns:
        ``$HASHAUDIT_FMNIST_DIR`` when set and non-empty, else :data:`DEFAULT_FMNIST_DIR`.
    """
    env = os.environ.get(FMNIST_ENV_VAR, "").strip()
    return Path(env) if env else DEFAULT_FMNIST_DIR


def find_idx_file(root: PathLikeStr, base_name: str) -> Path:
    """Locate ``base_name.gz`` or ``base_name`` in ``root`` (the compressed name wins).

    Args:
        root: Folder to look in.
        base_name: File name without ``.gz``, e.g. ``"t10k-images-idx3-ubyte"``.

    Returns:
        The path of the existing file.

    Raises:
        DataNotFound: Neither name exists; the message names the missing path and says how
            to install the data.
    """
    folder = Path(root)
    for candidate in (folder / f"{base_name}.gz", folder / base_name):
        if candidate.is_file():
            return candidate
    where = "" if folder.is_dir() else f" (folder {folder} does not exist)"
    raise DataNotFound(
        f"Fashion-MNIST file not found: {folder / base_name}.gz (nor uncompressed "
        f"{folder / base_name}){where}; {INSTALL_HINT}",
        field="root",
    )


def _read_exact(fh: BinaryIO, count: int) -> bytearray:
    """Read up to ``count`` bytes in chunks (so a lying header cannot force a huge allocation)."""
    buf = bytearray()
    while len(buf) < count:
        chunk = fh.read(min(_CHUNK, count - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _parse_idx_stream(fh: BinaryIO, path: Path, expected_magic: int) -> npt.NDArray[np.uint8]:
    """Parse an open (already decompressed) IDX stream; see :func:`read_idx`."""
    head = _read_exact(fh, 4)
    if len(head) < 4:
        raise CorruptData(
            f"{path}: file too short for an IDX header ({len(head)} bytes)", field="path"
        )
    magic = int.from_bytes(head, "big")
    if magic != expected_magic:
        hint = ""
        if magic == IDX_LABELS_MAGIC:
            hint = " (this looks like a label file)"
        elif magic == IDX_IMAGES_MAGIC:
            hint = " (this looks like an image file)"
        raise CorruptData(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}{hint}",
            field="path",
        )
    ndim = head[3]
    dim_bytes = _read_exact(fh, 4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise CorruptData(
            f"{path}: truncated IDX header (expected {ndim} dimension sizes)", field="path"
        )
    dims = tuple(int.from_bytes(dim_bytes[4 * k : 4 * k + 4], "big") for k in range(ndim))
    count = math.prod(dims)
    data = _read_exact(fh, count)
    if len(data) < count:
        raise CorruptData(
            f"{path}: truncated IDX data: header declares shape {dims} = {count} bytes "
            f"but only {len(data)} follow",
            field="path",
        )
    if fh.read(1):
        raise CorruptData(
            f"{path}: unexpected trailing bytes after the {count} data bytes of shape {dims}",
            field="path",
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_idx(path: PathLikeStr, expected_magic: int) -> npt.NDArray[np.uint8]:
    """Read an unsigned-byte IDX file, gzip-compressed or plain (detected from its content).

    Args:
        path: The IDX file.
        expected_magic: :data:`IDX_IMAGES_MAGIC`, :data:`IDX_LABELS_MAGIC` or any other
            ``0x000008dd`` value.

    Returns:
        A writable ``uint8`` array with the shape the header declares.

    Raises:
        DataNotFound: The file does not exist.
        CorruptData: Bad gzip stream, wrong magic number, truncated header or data, or
            trailing bytes; the message names the file and the problem.
    """
    file = Path(path)
    try:
        with open(file, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                    return _parse_idx_stream(fh, file, expected_magic)
            return _parse_idx_stream(raw, file, expected_magic)
    except FileNotFoundError:
        raise DataNotFound(f"IDX file not found: {file}; {INSTALL_HINT}", field="path") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptData(
            f"{file}: damaged or truncated gzip stream ({type(exc).__name__}: {exc})", field="path"
        ) from exc


def load_fashion_mnist(
    root: PathLikeStr | None = None,
    split: Literal["train", "test"] = "train",
) -> ArrayImageSet:
    """Load one Fashion-MNIST split into memory.

    Args:
        root: Folder holding the IDX files. ``None`` means :func:`default_fmnist_dir`, i.e.
            ``$HASHAUDIT_FMNIST_DIR`` if set, else :data:`DEFAULT_FMNIST_DIR`.
        split: ``"train"`` (60,000 items) or ``"test"`` (10,000 items, the ``t10k`` files).

    Returns:
        An :class:`ArrayImageSet` named ``"fashion-mnist-<split>"`` with images of shape
        ``(N, 1, 28, 28)`` (``uint8``), one-hot labels ``(N, 10)`` and
        :data:`FMNIST_CLASS_NAMES`.

    Raises:
        ConfigError: ``split`` is neither ``"train"`` nor ``"test"``.
        DataNotFound: A file is missing; the message names it and says how to install it.
        CorruptData: A file is damaged, has the wrong magic number or image size, a label is
            ``>= 10``, or the image and label counts differ.
    """
    if split not in FMNIST_FILES:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}", field="split")
    folder = Path(root) if root is not None else default_fmnist_dir()
    images_name, labels_name = FMNIST_FILES[split]
    images_path = find_idx_file(folder, images_name)
    labels_path = find_idx_file(folder, labels_name)

    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    if images.shape[1:] != (FMNIST_IMAGE_SIZE, FMNIST_IMAGE_SIZE):
        raise CorruptData(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {FMNIST_IMAGE_SIZE}x{FMNIST_IMAGE_SIZE}",
            field="path",
        )
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    num_classes = len(FMNIST_CLASS_NAMES)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise CorruptData(
            f"{labels_path}: label {int(labels[bad[0]])} at position {int(bad[0])} is not "
            f"below {num_classes} ({bad.size} bad labels)",
            field="path",
        )
    if images.shape[0] != labels.shape[0]:
        raise CorruptData(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels",
            field="path",
        )
    one_hot = np.zeros((labels.shape[0], num_classes), dtype=np.uint8)
    one_hot[np.arange(labels.shape[0]), labels] = 1
    logger.debug("loaded Fashion-MNIST %s: %d items from %s", split, labels.shape[0], folder)
    return ArrayImageSet(
        images[:, None, :, :],
        one_hot,
        FMNIST_CLASS_NAMES,
        name=f"fashion-mnist-{split}",
    )
