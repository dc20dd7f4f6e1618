"""Synthetic multi-label RGB scenes built from Fashion-MNIST items, written as a DeepHash list set.

No photo data set (NUS-WIDE, MS-COCO) can be downloaded where HashAudit is developed, yet the
paper-scale experiments need RGB multi-label images at 64 or 224 pixels that go through the
same loader a user's COCO folder would. This module makes such images offline.

A scene is a ``size x size`` RGB canvas holding 1 to 4 (by default) Fashion-MNIST items:

* Background: one of five random kinds -- linear gradient, radial gradient, smooth coloured
  noise, stripes (soft or hard) or a rotated checkerboard -- in random colours, plus a little
  pixel grain. It is drawn independently of the items, so it carries no class signal.
* Items: each is resized (bicubic) to a random side of ``min_scale..max_scale`` times the
  canvas side, mirrored with probability 1/2, and given a random tint. Its grey value,
  normalised to a peak of 1, gives both its opacity (``min(1, 3 * grey)``: the silhouette is
  solid, edges are soft) and its shading (``tint * (0.3 + 0.7 * grey)``: the garment's texture
  shows as light and dark tint). The tint's brightness is chosen to stand out from the
  background under the item.
* Placement: items are painted in order at random positions inside the canvas; overlaps are
  allowed, but a position is only taken if every item painted before keeps at least
  ``min_visible`` of its opacity mass uncovered. After ``tries`` refused positions the item is
  shrunk (factors 0.8 and 0.64) and, failing that too, left out of the scene.

The label is the union (multi-hot) of the classes of the items actually placed.

Randomness: the items of the ``n`` scenes of a split come from one generator seeded with
``(seed, stream, 0)``: item counts, then the pool's positions in a random order (the pool is
reshuffled only if the scenes need more items than it holds, so no item appears twice before
every item has appeared once). Each scene then draws its background, sizes, tints and positions
from its own generator ``(seed, stream, 1, index)``, so a scene does not depend on how many
scenes are made around it. With the same numpy and Pillow the files are byte-identical.

On disk (:func:`write_scene_dataset`)::

    OUT/images/database/000000.png ...   database scenes (from Fashion-MNIST train items)
    OUT/images/query/000000.png ...      query scenes (from Fashion-MNIST test items)
    OUT/database.txt                     DeepHash-pytorch lists: ``path l1 ... l10`` per line
    OUT/train.txt                        a seeded subset of the database lines
    OUT/test.txt                         the query lines
    OUT/layout.jsonl                     per scene: its items (source index, class, box, ...)
    OUT/dataset.json                     generator, version, parameters, counts, class names,
                                         sha256 of every list file (written last)
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import logging
import math
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from service import __version__
from service.data._checks import non_negative_int, positive_int
from service.data.base import ArrayImageSet, PathLikeStr
from service.errors import ConfigError

logger = logging.getLogger(__name__)

SCENES_GENERATOR = "hashaudit.scenes"
SCENES_VERSION = 1
"""Bumped whenever the same arguments would give different pixels or files."""

LIST_FILES: dict[str, str] = {"database": "database.txt", "train": "train.txt",
                              "query": "test.txt"}
"""List file of each split (DeepHash-pytorch names: the query list is ``test.txt``)."""

LAYOUT_FILE = "layout.jsonl"
MANIFEST_FILE = "dataset.json"
IMAGE_FORMATS: dict[str, str] = {"png": ".png", "jpeg": ".jpg"}
JPEG_QUALITY = 95
BACKGROUND_KINDS: tuple[str, ...] = ("linear", "radial", "noise", "stripes", "checker")

STREAMS: dict[str, int] = {"database": 0, "query": 1}
"""Random stream of each generated split (the train list is a subset of the database)."""

_ALPHA_GAIN = 3.0
_SHADE_FLOOR = 0.3
_SHRINK = (1.0, 0.8, 0.64)
_MIN_SIDE = 6


@dataclass(frozen=True)
class SceneParams:
    """How scenes are drawn; the defaults are what ``hashaudit data scenes`` uses.

    Attributes:
        size: Canvas side in pixels.
        min_items: Fewest items drawn for a scene.
        max_items: Most items drawn for a scene.
        min_scale: Smallest item side as a fraction of the canvas side.
        max_scale: Largest item side as a fraction of the canvas side.
        min_visible: Fraction of each item's opacity mass that later items may not cover.
        tries: Positions tried per item size before shrinking it.
    """

    size: int = 64
    min_items: int = 1
    max_items: int = 4
    min_scale: float = 0.3
    max_scale: float = 0.6
    min_visible: float = 0.5
    tries: int = 20

    def checked(self) -> SceneParams:
        """Return ``self`` after validating it.

        Raises:
            ConfigError: A value is out of range; ``field`` names it.
        """
        if positive_int(self.size, "size") < 16:
            raise ConfigError(f"size must be at least 16 pixels, got {self.size}", field="size")
        lo, hi = positive_int(self.min_items, "min_items"), positive_int(self.max_items,
                                                                          "max_items")
        if hi < lo:
            raise ConfigError(f"max_items ({hi}) is below min_items ({lo})", field="max_items")
        if not 0.05 <= self.min_scale <= self.max_scale <= 1.0:
            raise ConfigError(
                f"need 0.05 <= min_scale <= max_scale <= 1, got {self.min_scale}, "
                f"{self.max_scale}", field="max_scale")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ConfigError(f"min_visible must be in [0, 1], got {self.min_visible}",
                              field="min_visible")
        positive_int(self.tries, "tries")
        return self


@dataclass(frozen=True)
class PlacedItem:
    """One item of a scene.

    Attributes:
        index: Position of the item in its source pool (a Fashion-MNIST split).
        label: Its class.
        x: Left edge of its square box on the canvas.
        y: Top edge of its box.
        side: Box side in pixels.
        flip: Whether it was mirrored left-right.
        rgb: Its tint (0..255 each).
        visible: Fraction of its opacity mass not covered by items painted after it.
    """

    index: int
    label: int
    x: int
    y: int
    side: int
    flip: bool
    rgb: tuple[int, int, int]
    visible: float

    def to_json(self) -> dict[str, object]:
        """A JSON-ready record (``visible`` rounded to 4 decimals)."""
        return {"index": self.index, "class": self.label,
                "box": [self.x, self.y, self.side, self.side], "flip": self.flip,
                "rgb": list(self.rgb), "visible": round(self.visible, 4)}


@dataclass(frozen=True)
class Scene:
    """A rendered scene: ``pixels`` is ``uint8`` ``(size, size, 3)``; ``items`` in paint order."""

    pixels: npt.NDArray[np.uint8]
    items: tuple[PlacedItem, ...]

    def labels(self, num_classes: int) -> npt.NDArray[np.uint8]:
        """Multi-hot ``uint8`` vector: the union of the items' classes."""
        out = np.zeros(num_classes, dtype=np.uint8)
        out[[it.label for it in self.items]] = 1
        return out


class SceneImageSet(ArrayImageSet):
    """An in-memory set of scenes (``(N, 3, size, size)``) that keeps each scene's items.

    Attributes:
        items: Per scene, its :class:`PlacedItem` records in paint order.
    """

    def __init__(self, images: npt.NDArray[np.uint8], labels: npt.ArrayLike,
                 class_names: list[str] | tuple[str, ...], name: str,
                 items: list[tuple[PlacedItem, ...]]) -> None:
        super().__init__(images, labels, class_names, name)
        if len(items) != len(self):
            raise ConfigError(f"{len(items)} item records for {len(self)} scenes", field="items")
        self.items: list[tuple[PlacedItem, ...]] = list(items)


# ----------------------------------------------------------------------------- items


def item_layers(grey: npt.NDArray[np.uint8], side: int,
                flip: bool) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Opacity and shading of one grey item resized to ``side x side``.

    Args:
        grey: The item, ``uint8`` ``(h, w)``.
        side: Output side in pixels.
        flip: Mirror it left-right.

    Returns:
        ``(alpha, shade)``, both ``float32`` ``(side, side)`` in ``[0, 1]``: ``alpha =
        min(1, 3 g)`` and ``shade = 0.3 + 0.7 g`` with ``g`` the resized grey value divided
        by its maximum.
    """
    img = Image.fromarray(np.ascontiguousarray(grey), "L").resize((side, side),
                                                                   Image.Resampling.BICUBIC)
    g = np.asarray(img, dtype=np.float32)
    if flip:
        g = g[:, ::-1]
    peak = float(g.max())
    g = g / peak if peak > 0 else g
    alpha = np.minimum(g * _ALPHA_GAIN, 1.0).astype(np.float32)
    shade = (_SHADE_FLOOR + (1.0 - _SHADE_FLOOR) * g).astype(np.float32)
    return alpha, shade


def _luminance(rgb: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _tint(rng: np.random.Generator, background_luma: float) -> npt.NDArray[np.float32]:
    """A random saturated colour whose brightness contrasts with ``background_luma``."""
    hue, sat = rng.random(), rng.uniform(0.45, 1.0)
    value = rng.uniform(0.25, 0.55) if background_luma > 0.5 else rng.uniform(0.8, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, value), dtype=np.float32)


# ----------------------------------------------------------------------------- backgrounds


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Pixel-centre coordinates in ``[0, 1)``: ``(X, Y)``, each ``(size, size)``, read-only."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(c, c)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _colour(rng: np.random.Generator) -> npt.NDArray[np.float32]:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.8),
                                        rng.uniform(0.15, 1.0)), dtype=np.float32)


def _mix(c1: npt.NDArray[np.float32], c2: npt.NDArray[np.float32],
         t: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``c1 (1 - t) + c2 t`` per pixel: ``(H, W)`` weights to ``(H, W, 3)`` colours."""
    return c1 + (c2 - c1) * t[:, :, None]


def background(rng: np.random.Generator, size: int, kind: str | None = None
               ) -> tuple[npt.NDArray[np.float32], str]:
    """A random background, ``float32`` ``(size, size, 3)`` in ``[0, 1]``.

    Args:
        rng: Source of randomness.
        size: Side in pixels.
        kind: One of :data:`BACKGROUND_KINDS`; ``None`` draws one uniformly.

    Returns:
        ``(pixels, kind)``.
    """
    if kind is None:
        kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    x, y = _grid(size)
    c1, c2 = _colour(rng), _colour(rng)
    angle = rng.uniform(0.0, 2 * math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    if kind == "linear":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        out = _mix(c1, c2, t)
    elif kind == "radial":
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.4, 1.2)
        out = _mix(c1, c2, np.minimum(np.hypot(x - cx, y - cy) / r, 1.0))
    elif kind == "noise":
        cells = int(rng.integers(2, 9))
        low = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(low, "RGB").resize((size, size),
                           Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        out = c1 + (field - c1) * rng.uniform(0.3, 0.8)
    elif kind == "stripes":
        period = rng.uniform(1 / 12, 1 / 3)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
        out = _mix(c1, c2, (t > 0.5).astype(np.float32) if rng.random() < 0.5 else t)
    elif kind == "checker":
        cell = rng.uniform(1 / 10, 1 / 3)
        v = -x * math.sin(angle) + y * math.cos(angle)
        t = (np.floor(u / cell) + np.floor(v / cell)) % 2
        out = _mix(c1, c2, t.astype(np.float32))
    else:
        raise ConfigError(f"unknown background kind {kind!r}; known: "
                          f"{', '.join(BACKGROUND_KINDS)}", field="kind")
    grain = rng.uniform(0.0, 0.04)
    out = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(grain)
    return np.clip(out, 0.0, 1.0).astype(np.float32), kind


# ----------------------------------------------------------------------------- scenes


def render_scene(rng: np.random.Generator, greys: npt.NDArray[np.uint8],
                 classes: npt.NDArray[np.integer], indices: npt.NDArray[np.integer],
                 params: SceneParams) -> Scene:
    """Paint the given items on a random background (see the module docstring).

    Args:
        rng: The scene's generator.
        greys: The items' grey images, ``uint8`` ``(k, h, w)``, in paint order.
        classes: Their classes, ``(k,)``.
        indices: Their positions in the source pool, ``(k,)`` (recorded only).
        params: Canvas size, scales, visibility bound, tries.

    Returns:
        The scene; items that found no place are left out of ``items`` and the pixels.
    """
    size = params.size
    canvas, _ = background(rng, size)
    visible_maps: list[npt.NDArray[np.float32]] = []  # per placed item: uncovered opacity
    masses: list[float] = []
    uncovered: list[float] = []
    placed: list[dict[str, object]] = []
    for grey, label, index in zip(greys, classes, indices, strict=True):
        side0 = size * rng.uniform(params.min_scale, params.max_scale)
        flip = bool(rng.random() < 0.5)
        spot = None
        for factor in _SHRINK:
            side = max(_MIN_SIDE, min(size, int(round(side0 * factor))))
            alpha, shade = item_layers(grey, side, flip)
            mass = float(alpha.sum())
            if mass <= 0:
                break
            for _ in range(params.tries):
                x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                covered = [float((m[y:y + side, x:x + side] * alpha).sum())
                           for m in visible_maps]
                if all(u - c >= params.min_visible * t
                       for u, c, t in zip(uncovered, covered, masses, strict=True)):
                    spot = (x, y, side, alpha, shade, mass, covered)
                    break
            if spot is not None:
                break
        if spot is None:
            continue
        x, y, side, alpha, shade, mass, covered = spot
        box = (slice(y, y + side), slice(x, x + side))
        for k, m in enumerate(visible_maps):
            m[box] *= 1.0 - alpha
            uncovered[k] -= covered[k]
        region = canvas[box]
        luma = float(_luminance(region.reshape(-1, 3)).mean())
        tint = _tint(rng, luma)
        a = alpha[:, :, None]
        canvas[box] = region * (1.0 - a) + (tint * shade[:, :, None]) * a
        vm = np.zeros((size, size), dtype=np.float32)
        vm[box] = alpha
        visible_maps.append(vm)
        masses.append(mass)
        uncovered.append(mass)
        placed.append({"index": int(index), "label": int(label), "x": x, "y": y, "side": side,
                       "flip": flip, "rgb": tuple(int(round(c * 255)) for c in tint)})
    pixels = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    items = tuple(PlacedItem(**p, visible=max(u, 0.0) / m)  # type: ignore[arg-type]
                  for p, u, m in zip(placed, uncovered, masses, strict=True))
    return Scene(pixels, items)


def _pool_arrays(pool: ArrayImageSet) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Grey images ``(N, h, w)`` and class indices of a single-label grey pool."""
    if len(pool) == 0:
        raise ConfigError("cannot build scenes from an empty item pool", field="pool")
    if pool.image_shape[0] != 1:
        raise ConfigError(f"scene items must be grey (1 channel), the pool has "
                          f"{pool.image_shape[0]}", field="pool")
    counts = pool.labels.sum(axis=1)
    if not (counts == 1).all():
        bad = int(np.flatnonzero(counts != 1)[0])
        raise ConfigError(f"scene items must have exactly one class; item {bad} has "
                          f"{int(counts[bad])}", field="pool")
    return pool.images[:, 0], pool.labels.argmax(axis=1).astype(np.int64)


def plan_items(pool_size: int, n: int, seed: int, stream: int,
               params: SceneParams) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Which pool items each of ``n`` scenes gets.

    Returns:
        ``(offsets, order)``: scene ``i`` gets ``order[offsets[i]:offsets[i + 1]]``;
        ``offsets`` has ``n + 1`` entries. ``order`` runs through random permutations of the
        pool, so items repeat only once the pool is used up.
    """
    rng = np.random.default_rng([seed, stream, 0])
    counts = rng.integers(params.min_items, params.max_items + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    rounds = [rng.permutation(pool_size) for _ in range(-(-total // pool_size))]
    return offsets, np.concatenate(rounds)[:total].astype(np.int64)


def _scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a split (independent of the other scenes)."""
    return np.random.default_rng([seed, stream, 1, index])


def iter_scenes(pool: ArrayImageSet, n: int, seed: int, stream: int = 0,
                params: SceneParams | None = None, start: int = 0) -> Iterator[Scene]:
    """Yield scenes ``start .. n - 1`` of a split of ``n`` scenes, in order.

    Args:
        pool: Single-label grey items (e.g. a Fashion-MNIST split).
        n: Scenes in the split.
        seed: Non-negative seed.
        stream: Separates splits drawn with the same seed (see :data:`STREAMS`).
        params: Scene parameters (default :class:`SceneParams`).
        start: First scene to yield (the ones before are skipped, not drawn).

    Raises:
        ConfigError: A bad argument or pool.
    """
    params = (params or SceneParams()).checked()
    n = positive_int(n, "n")
    seed = non_negative_int(seed, "seed")
    greys, classes = _pool_arrays(pool)
    offsets, order = plan_items(len(pool), n, seed, stream, params)
    for i in range(start, n):
        ids = order[offsets[i]:offsets[i + 1]]
        yield render_scene(_scene_rng(seed, stream, i), greys[ids], classes[ids], ids, params)


def make_scene_set(pool: ArrayImageSet, n: int, seed: int, stream: int = 0,
                   params: SceneParams | None = None, name: str | None = None) -> SceneImageSet:
    """Render ``n`` scenes into memory (the same scenes :func:`write_scene_dataset` writes).

    Returns:
        A :class:`SceneImageSet` with images ``(n, 3, size, size)``, the pool's class names
        and each scene's items.
    """
    scenes = list(iter_scenes(pool, n, seed, stream, params))
    num_classes = pool.num_classes
    images = np.stack([s.pixels.transpose(2, 0, 1) for s in scenes])
    labels = np.stack([s.labels(num_classes) for s in scenes])
    return SceneImageSet(images, labels, pool.class_names,
                         name or f"{pool.name}-scenes{images.shape[-1]}",
                         [s.items for s in scenes])


# ----------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(pixels: npt.NDArray[np.uint8], path: Path, fmt: str) -> None:
    img = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        img.save(path, format="PNG")
    else:  # 4:4:4 chroma: small items keep their colour edges
        img.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


_CHUNK = 64


@dataclass(frozen=True)
class _Chunk:
    """Scenes ``start .. start + len(offsets) - 2`` of a split with everything needed to draw
    and write them (picklable, so a worker process gets only its items)."""

    split: str
    seed: int
    start: int
    offsets: npt.NDArray[np.int64]
    greys: npt.NDArray[np.uint8]
    classes: npt.NDArray[np.int64]
    ids: npt.NDArray[np.int64]
    num_classes: int
    params: SceneParams
    root: str
    fmt: str


def _chunks(pool: ArrayImageSet, split: str, n: int, seed: int, params: SceneParams,
            root: str, fmt: str) -> Iterator[_Chunk]:
    greys, classes = _pool_arrays(pool)
    offsets, order = plan_items(len(pool), n, seed, STREAMS[split], params)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        ids = order[offsets[start]:offsets[stop]]
        yield _Chunk(split, seed, start, offsets[start:stop + 1] - offsets[start], greys[ids],
                     classes[ids], ids, pool.num_classes, params, root, fmt)


def _write_chunk(chunk: _Chunk) -> list[tuple[str, str]]:
    """Draw and save one chunk; return its (list line, layout JSON line) pairs in order."""
    rows = []
    ext = IMAGE_FORMATS[chunk.fmt]
    for j in range(len(chunk.offsets) - 1):
        i = chunk.start + j
        sl = slice(chunk.offsets[j], chunk.offsets[j + 1])
        scene = render_scene(_scene_rng(chunk.seed, STREAMS[chunk.split], i), chunk.greys[sl],
                             chunk.classes[sl], chunk.ids[sl], chunk.params)
        rel = f"images/{chunk.split}/{i:06d}{ext}"
        _save(scene.pixels, Path(chunk.root) / rel, chunk.fmt)
        label = scene.labels(chunk.num_classes)
        record = json.dumps({"path": rel, "split": chunk.split,
                             "labels": np.flatnonzero(label).tolist(),
                             "items": [it.to_json() for it in scene.items]})
        rows.append((f"{rel} {' '.join(str(int(v)) for v in label)}", record))
    return rows


class _Inline:
    """``executor.map`` in this process (``workers == 1``)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @staticmethod
    def map(fn: Callable[[_Chunk], list[tuple[str, str]]],
            tasks: Iterator[_Chunk]) -> Iterator[list[tuple[str, str]]]:
        return map(fn, tasks)


def write_scene_dataset(
    out: PathLikeStr,
    database_pool: ArrayImageSet,
    query_pool: ArrayImageSet,
    *,
    database: int,
    train: int,
    query: int,
    seed: int = 0,
    fmt: str = "png",
    params: SceneParams | None = None,
    workers: int = 1,
    progress: Callable[[int], object] | None = None,
) -> dict[str, object]:
    """Render and write a scene data set in the DeepHash-pytorch list layout.

    The layout is in the module docstring. Database scenes use only ``database_pool`` items,
    query scenes only ``query_pool`` items. ``dataset.json`` is written last, so a folder
    without it is incomplete.

    Args:
        out: Output folder; it must not exist or be empty.
        database_pool: Items of the database scenes (Fashion-MNIST train).
        query_pool: Items of the query scenes (Fashion-MNIST test); same classes.
        database: Number of database scenes.
        train: Size of the training list, a seeded subset of the database (``<= database``).
        query: Number of query scenes.
        seed: Non-negative seed.
        fmt: ``"png"`` (lossless) or ``"jpeg"`` (quality 95, 4:4:4 chroma).
        params: Scene parameters (default :class:`SceneParams`).
        workers: Processes that render and encode (``1``: this one). The files do not depend
            on it.
        progress: Called with the number of images written, after each chunk of them.

    Returns:
        The record written to ``dataset.json``.

    Raises:
        ConfigError: A bad count, format or seed, a non-empty ``out``, or pools with different
            classes; ``field`` names the argument.
    """
    params = (params or SceneParams()).checked()
    if fmt not in IMAGE_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}",
                          field="format")
    counts = {"database": positive_int(database, "database"),
              "train": non_negative_int(train, "train"), "query": positive_int(query, "query")}
    if counts["train"] > counts["database"]:
        raise ConfigError(f"train ({train}) cannot exceed database ({database}): the training "
                          "list is a subset of the database", field="train")
    seed = non_negative_int(seed, "seed")
    workers = positive_int(workers, "workers")
    if list(database_pool.class_names) != list(query_pool.class_names):
        raise ConfigError("the database and query pools have different classes",
                          field="query_pool")
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"output folder {root} exists and is not empty; choose a new or "
                          "empty folder", field="out")
    lines: dict[str, list[str]] = {"database": [], "query": []}
    root.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # no fork of a process that loaded torch
    with (open(root / LAYOUT_FILE, "w", encoding="utf-8") as layout,
          ProcessPoolExecutor(workers, mp_context=context) if workers > 1 else _Inline() as ex):
        for split, pool in (("database", database_pool), ("query", query_pool)):
            (root / "images" / split).mkdir(parents=True)
            tasks = _chunks(pool, split, counts[split], seed, params, str(root), fmt)
            for rows in ex.map(_write_chunk, tasks):
                for line, record in rows:
                    lines[split].append(line)
                    layout.write(record + "\n")
                if progress is not None:
                    progress(len(rows))
    pick = np.random.default_rng([seed, 2]).choice(counts["database"], counts["train"],
                                                    replace=False)
    lines["train"] = [lines["database"][k] for k in np.sort(pick)]
    files = {}
    for split in ("database", "train", "query"):
        path = root / LIST_FILES[split]
        path.write_text("".join(f"{line}\n" for line in lines[split]), encoding="utf-8")
        files[LIST_FILES[split]] = _sha256(path)
    files[LAYOUT_FILE] = _sha256(root / LAYOUT_FILE)
    record: dict[str, object] = {
        "generator": SCENES_GENERATOR, "version": SCENES_VERSION,
        "hashaudit_version": __version__, "seed": seed, "size": params.size, "format": fmt,
        "counts": counts, "lists": {s: LIST_FILES[s] for s in ("database", "train", "query")},
        "class_names": list(database_pool.class_names),
        "sources": {"database": database_pool.name, "query": query_pool.name},
        "params": asdict(params), "sha256": files,
    }
    (root / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %d database and %d query scenes (%d px, %s) to %s",
                counts["database"], counts["query"], params.size, fmt, root)
    return record
