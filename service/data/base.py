"""Common representation of labelled image sets.

Every loader in :mod:`service.data` returns an :class:`ImageSet`: a
:class:`torch.utils.data.Dataset` whose items are ``(image, label)`` pairs where

* ``image`` is a ``float32`` tensor of shape ``image_shape == (C, H, W)`` with values in
  ``[0, 1]`` (the stored ``uint8`` pixel divided by 255), and
* ``label`` is a ``float32`` multi-hot tensor of shape ``(num_classes,)``.

Two concrete kinds exist:

* :class:`ArrayImageSet` keeps all pixels in memory as one ``uint8`` array and offers a fast
  vectorised :meth:`ArrayImageSet.batch`.
* :class:`FileImageSet` keeps a list of image files and decodes them lazily with PIL; small
  sets can be loaded into memory with :meth:`FileImageSet.materialize`.
"""

from __future__ import annotations

import abc
import logging
import operator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import Dataset

from service.data.preprocess import InputTransform, decode_file
from service.errors import ConfigError, CorruptData, DataNotFound

logger = logging.getLogger(__name__)

IndexLike: TypeAlias = (
    Sequence[int] | npt.NDArray[np.integer] | npt.NDArray[np.bool_] | torch.Tensor
)
"""Anything :meth:`ImageSet.subset` accepts: integer positions or a boolean mask."""

PathLikeStr: TypeAlias = str | PathLike[str]

CHANNEL_MODES: dict[int, str] = {1: "L", 3: "RGB"}
"""PIL mode used for each supported channel count of a :class:`FileImageSet`."""


def as_index_array(indices: IndexLike, length: int) -> npt.NDArray[np.int64]:
    """Normalise positions into a set of ``length`` items to a 1-D ``int64`` array.

    Args:
        indices: Integer positions (list, range, numpy array or tensor) or a boolean mask of
            exactly ``length`` entries. Negative positions are not accepted.
        length: Number of items in the set the positions refer to.

    Returns:
        A new 1-D ``int64`` array of positions, in the given order (duplicates kept).

    Raises:
        IndexError: A position is negative or ``>= length``, the array is not 1-D, or a
            boolean mask has the wrong length.
        ConfigError: The values are neither integers nor booleans.
    """
    if isinstance(indices, torch.Tensor):
        arr = indices.detach().cpu().numpy()
    else:
        arr = np.asarray(indices)
    if arr.ndim != 1:
        raise IndexError(f"indices must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        if arr.shape[0] != length:
            raise IndexError(f"boolean mask has {arr.shape[0]} entries for a set of {length} items")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"indices must be integers, got dtype {arr.dtype}", field="indices")
    out = arr.astype(np.int64, copy=True)
    bad = np.flatnonzero((out < 0) | (out >= length))
    if bad.size:
        raise IndexError(f"index {int(out[bad[0]])} out of range for a set of {length} items")
    return out


def _validate_labels(labels: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.uint8]:
    """Check a multi-hot label matrix and return it as a C-contiguous ``uint8`` array."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ConfigError(f"labels must be 2-D (N, C), got shape {arr.shape}", field="labels")
    if arr.shape[1] != num_classes:
        raise ConfigError(
            f"labels have {arr.shape[1]} columns but there are {num_classes} class names",
            field="labels",
        )
    if not (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(
            f"labels must be integer 0/1 values, got dtype {arr.dtype}", field="labels"
        )
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ConfigError("labels must contain only 0 and 1", field="labels")
    return np.ascontiguousarray(arr, dtype=np.uint8)


class ImageSet(Dataset[tuple[torch.Tensor, torch.Tensor]], abc.ABC):
    """Base class of all labelled image sets.

    Subclasses implement :meth:`__getitem__` and :meth:`subset`; the base class stores and
    validates the metadata shared by every set.

    Attributes:
        name: Short human-readable name, e.g. ``"fashion-mnist-test"``.
        class_names: One name per label column.
        labels: ``uint8`` multi-hot matrix of shape ``(N, C)`` with ``C == len(class_names)``.
        image_shape: ``(C, H, W)`` of the image tensors :meth:`__getitem__` returns.
    """

    def __init__(
        self,
        *,
        name: str,
        class_names: Sequence[str],
        labels: npt.ArrayLike,
        image_shape: tuple[int, int, int],
    ) -> None:
        """Store and validate the shared metadata.

        Args:
            name: Human-readable name of the set.
            class_names: One name per label column.
            labels: Multi-hot 0/1 matrix of shape ``(N, len(class_names))``.
            image_shape: ``(C, H, W)`` of the returned image tensors.

        Raises:
            ConfigError: The labels are not a 0/1 matrix matching ``class_names`` or the
                image shape is not three positive integers.
        """
        self.name: str = str(name)
        self.class_names: list[str] = [str(c) for c in class_names]
        self.labels: npt.NDArray[np.uint8] = _validate_labels(labels, len(self.class_names))
        shape = tuple(int(d) for d in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(
                f"image_shape must be (C, H, W) > 0, got {image_shape}", field="image_shape"
            )
        self.image_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])

    @property
    def num_classes(self) -> int:
        """Number of label columns."""
        return len(self.class_names)

    def __len__(self) -> int:
        """Return the number of items."""
        return int(self.labels.shape[0])

    def _check_index(self, index: int) -> int:
        """Resolve a (possibly negative) Python index, raising ``IndexError`` when out of range."""
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.name!r} of {n} items")
        return i

    def label_tensor(self, index: int) -> torch.Tensor:
        """Return the ``float32`` multi-hot label of one item, shape ``(num_classes,)``."""
        return torch.from_numpy(self.labels[self._check_index(index)].astype(np.float32))

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image, label)`` for one item.

        Args:
            index: Position of the item; negative positions count from the end.

        Returns:
            ``float32`` image of shape ``image_shape`` in ``[0, 1]`` and ``float32`` label of
            shape ``(num_classes,)``.
        """

    @abc.abstractmethod
    def subset(self, indices: IndexLike) -> ImageSet:
        """Return a set holding only the given items, in the given order.

        Args:
            indices: Positions into this set, or a boolean mask of ``len(self)`` entries.

        Returns:
            A set of the same kind with the same ``class_names``, ``image_shape`` and name.
        """

    def batch(self, indices: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Return several items stacked into one batch.

        The base implementation stacks :meth:`__getitem__` results; subclasses may override
        it with something faster.

        Args:
            indices: Positions into this set (or a boolean mask).

        Returns:
            Images of shape ``(B, C, H, W)`` and labels of shape ``(B, num_classes)``, both
            ``float32``.
        """
        idx = as_index_array(indices, len(self))
        if idx.size == 0:
            return (
                torch.empty((0, *self.image_shape), dtype=torch.float32),
                torch.empty((0, self.num_classes), dtype=torch.float32),
            )
        items = [self[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def __repr__(self) -> str:
        """Return a short description with name, size, classes and image shape."""
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
            f"classes={self.num_classes}, image_shape={self.image_shape})"
        )


class ArrayImageSet(ImageSet):
    """An image set held entirely in memory.

    Attributes:
        images: ``uint8`` array of shape ``(N, C, H, W)``.
    """

    def __init__(
        self,
        images: npt.NDArray[np.uint8],
        labels: npt.ArrayLike,
        class_names: Sequence[str],
        name: str = "array-set",
    ) -> None:
        """Wrap an image array and its labels (the array is not copied when already suitable).

        Args:
            images: ``uint8`` array of shape ``(N, C, H, W)``.
            labels: Multi-hot 0/1 matrix of shape ``(N, len(class_names))``.
            class_names: One name per label column.
            name: Human-readable name of the set.

        Raises:
            ConfigError: ``images`` is not a 4-D ``uint8`` array or its length differs from
                that of ``labels``.
        """
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ConfigError(f"images must be uint8, got dtype {arr.dtype}", field="images")
        if arr.ndim != 4:
            raise ConfigError(
                f"images must be 4-D (N, C, H, W), got shape {arr.shape}", field="images"
            )
        super().__init__(
            name=name,
            class_names=class_names,
            labels=labels,
            image_shape=(arr.shape[1], arr.shape[2], arr.shape[3]),
        )
        if arr.shape[0] != self.labels.shape[0]:
            raise ConfigError(
                f"{arr.shape[0]} images but {self.labels.shape[0]} label rows", field="images"
            )
        self.images: npt.NDArray[np.uint8] = np.ascontiguousarray(arr)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image, label)``; see :meth:`ImageSet.__getitem__`."""
        i = self._check_index(index)
        image = torch.from_numpy(self.images[i].astype(np.float32)).div_(255.0)
        return image, torch.from_numpy(self.labels[i].astype(np.float32))

    def batch(self, indices: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Return several items as one batch with a single vectorised gather.

        Args:
            indices: Positions into this set (or a boolean mask).

        Returns:
            ``float32`` images ``(B, C, H, W)`` in ``[0, 1]`` and ``float32`` labels ``(B, C)``.
        """
        idx = as_index_array(indices, len(self))
        images = torch.from_numpy(self.images[idx]).to(torch.float32).div_(255.0)
        labels = torch.from_numpy(self.labels[idx]).to(torch.float32)
        return images, labels

    def subset(self, indices: IndexLike) -> ArrayImageSet:
        """Return an :class:`ArrayImageSet` of the selected items.

        The selected pixel rows are copied (numpy fancy indexing), so the result does not
        keep the full parent array alive.

        Args:
            indices: Positions into this set (or a boolean mask).

        Returns:
            A new set with the same ``class_names`` and ``name``.
        """
        idx = as_index_array(indices, len(self))
        return ArrayImageSet(self.images[idx], self.labels[idx], self.class_names, self.name)


class FileImageSet(ImageSet):
    """An image set whose pixels are decoded lazily from files.

    Every access opens the file with PIL and applies the set's
    :class:`~service.data.preprocess.InputTransform`: conversion to mode ``"L"``
    (``channels=1``) or ``"RGB"`` (``channels=3``) -- an alpha channel is dropped, palette
    images are expanded -- then, with ``resize`` given, a bilinear resize of the shorter side
    to ``resize`` and a centre crop to ``size``; without it, a bilinear stretch to exactly
    ``size`` (aspect ratio not kept). EXIF orientation is not applied.

    Attributes:
        paths: One file per item.
        channels: 1 or 3.
        size: ``(H, W)`` of the decoded images.
    """

    def __init__(
        self,
        paths: Sequence[PathLikeStr],
        labels: npt.ArrayLike,
        class_names: Sequence[str],
        *,
        channels: int = 3,
        size: tuple[int, int] = (224, 224),
        name: str = "file-set",
        resize: int | None = None,
        transform: InputTransform | None = None,
    ) -> None:
        """Create the set; files are not opened until accessed.

        Args:
            paths: One image file per item.
            labels: Multi-hot 0/1 matrix of shape ``(len(paths), len(class_names))``.
            class_names: One name per label column.
            channels: 1 for grayscale (PIL mode ``"L"``) or 3 for ``"RGB"``.
            size: ``(H, W)`` of every decoded image (the crop size).
            name: Human-readable name of the set.
            resize: Shorter side before the centre crop; ``None`` stretches to ``size``.
            transform: The whole input transform (interpolation and resize mode too); when
                given, ``resize`` is ignored and its channels and size must be
                ``channels`` and ``size``.

        Raises:
            ConfigError: ``channels`` is not 1 or 3, ``size`` is not two positive integers,
                the number of paths differs from the number of label rows, or ``transform``
                disagrees with ``channels`` and ``size``.
        """
        if isinstance(channels, bool) or channels not in CHANNEL_MODES:
            raise ConfigError(f"channels must be 1 or 3, got {channels!r}", field="channels")
        height, width = check_size(size)
        super().__init__(
            name=name,
            class_names=class_names,
            labels=labels,
            image_shape=(channels, height, width),
        )
        self.paths: list[Path] = [Path(p) for p in paths]
        if len(self.paths) != self.labels.shape[0]:
            raise ConfigError(
                f"{len(self.paths)} paths but {self.labels.shape[0]} label rows", field="paths"
            )
        self.channels: int = int(channels)
        self.size: tuple[int, int] = (height, width)
        if transform is None:
            transform = InputTransform(self.channels, height, width, resize)
        elif transform.shape != (self.channels, height, width):
            raise ConfigError(f"transform makes {transform.shape} images, the set holds "
                              f"{(self.channels, height, width)}", field="transform")
        self.transform = transform

    def load_uint8(self, index: int) -> npt.NDArray[np.uint8]:
        """Decode one image to a ``uint8`` array of shape ``image_shape``.

        Args:
            index: Position of the item.

        Returns:
            The decoded, converted and resized pixels, ``(C, H, W)``.

        Raises:
            DataNotFound: The file no longer exists.
            CorruptData: PIL cannot decode the file; the message names it.
        """
        path = self.paths[self._check_index(index)]
        return decode_with(path, self.transform)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image, label)``; see :meth:`ImageSet.__getitem__` and :meth:`load_uint8`."""
        i = self._check_index(index)
        pixels = self.load_uint8(i)
        image = torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
        return image, torch.from_numpy(self.labels[i].astype(np.float32))

    def subset(self, indices: IndexLike) -> FileImageSet:
        """Return a lazily decoded set of the selected files.

        Args:
            indices: Positions into this set (or a boolean mask).

        Returns:
            A new :class:`FileImageSet` with the same classes, channels, size and name.
        """
        idx = as_index_array(indices, len(self))
        return FileImageSet(
            [self.paths[int(i)] for i in idx],
            self.labels[idx],
            self.class_names,
            channels=self.channels,
            size=self.size,
            name=self.name,
            transform=self.transform,
        )

    def materialize(self, workers: int = 1) -> ArrayImageSet:
        """Decode every image into memory.

        Meant for sets that fit in memory: the result needs ``N * C * H * W`` bytes.

        Args:
            workers: Decoding threads (Pillow releases the GIL while decoding).

        Returns:
            An :class:`ArrayImageSet` with the same labels, class names and name.

        Raises:
            DataNotFound: A file no longer exists.
            CorruptData: A file cannot be decoded; the message names it.
        """
        images = np.empty((len(self), *self.image_shape), dtype=np.uint8)

        def load(i: int) -> None:
            images[i] = self.load_uint8(i)

        if workers > 1 and len(self) > 1:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(load, range(len(self)), chunksize=64):
                    pass
        else:
            for i in range(len(self)):
                load(i)
        logger.debug("materialized %s: %d images, %d bytes", self.name, len(self), images.nbytes)
        return ArrayImageSet(images, self.labels.copy(), self.class_names, self.name)


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """Validate an ``(H, W)`` pair of positive integers."""
    try:
        height, width = (operator.index(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigError(
            f"size must be (height, width) integers, got {size!r}", field="size"
        ) from None
    if height < 1 or width < 1:
        raise ConfigError(f"size must be positive, got {size!r}", field="size")
    return height, width


def decode_image(path: PathLikeStr, channels: int, size: tuple[int, int],
                 resize: int | None = None) -> npt.NDArray[np.uint8]:
    """Decode an image file to ``uint8`` ``(channels, H, W)`` as :class:`FileImageSet` does.

    Args:
        path: Image file.
        channels: 1 (PIL mode ``"L"``) or 3 (``"RGB"``).
        size: ``(H, W)``, the crop size.
        resize: Shorter side before the centre crop; ``None`` stretches bilinearly to ``size``.

    Returns:
        The pixels as a C-contiguous ``uint8`` array.

    Raises:
        ConfigError: ``channels`` is not 1 or 3, or ``size``/``resize`` are invalid.
        DataNotFound: The file does not exist.
        CorruptData: PIL cannot decode the file; the message names it.
    """
    height, width = check_size(size)
    return decode_with(path, InputTransform(channels, height, width, resize))


def decode_with(path: PathLikeStr, transform: InputTransform) -> npt.NDArray[np.uint8]:
    """Decode an image file with ``transform``; errors as :func:`decode_image`."""
    file = Path(path)
    try:
        return decode_file(str(file), transform)
    except FileNotFoundError:
        raise DataNotFound(f"image file not found: {file}", field="path") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptData(f"cannot decode image file {file}: {exc}", field="path") from exc
