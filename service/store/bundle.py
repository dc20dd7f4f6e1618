"""Saving and loading frozen bundles.

Layout of ``model_store/<name>/``::

    manifest.json        the Manifest (its ``files`` list names every payload file)
    hasher.safetensors   hasher weights (architecture rebuilt from the manifest)
    gallery.safetensors  codes (packed bits), labels (multi-hot), ids
    thumbnails.png       gallery thumbnails as one lossless PNG atlas (layout in the manifest);
                         display-sized: the longer side is at most THUMB_SIDE pixels
    queries.safetensors  the protocol's query labels and ids, and their images (uint8) when
                         they are small (``extra.queries.embedded``); larger query images are
                         read through the data source
    splits.safetensors   query / database / train indices of the recorded protocol
    SHA256SUMS           ``sha256sum -c`` format, covering every file above

A bundle never copies its training images: ``dataset.reference`` in the manifest records the
data source (kind, options, sha256 of its files; see :mod:`service.data.sources`) and
:meth:`Bundle.train_split`, :meth:`Bundle.database_set` and large query sets read through it,
after checking that it is unchanged. Bundles made before the reference was recorded (format
1, such as the shipped 28 px default) keep their full-size database images as thumbnails and
are read from there.

Loading verifies SHA256SUMS first, then rebuilds the architecture from the manifest and
loads weights with ``strict=True``; any mismatch raises a BundleError that names the file.
Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.data.base import ArrayImageSet, ImageSet
from service.data.preprocess import InputTransform
from service.data.sources import open_source
from service.errors import BundleError, ChecksumMismatch
from service.nets import Hasher, build_hasher
from service.retrieval.codes import pack_bits, unpack_bits
from service.store.files import (
    MANIFEST,
    SUMS,
    finalize,
    load_tensors,
    sha256_file,
    write_payload,
)
from service.store.generator_parts import (
    load_generator,
    load_patterns,
    load_prototype,
    pick_generator,
)
from service.store.manifest import Manifest
from service.store.thumbs import decode_atlas, encode_atlas

HASHER_FILE = "hasher.safetensors"
GALLERY_FILE = "gallery.safetensors"
SPLITS_FILE = "splits.safetensors"
QUERIES_FILE = "queries.safetensors"
THUMBS_FILE = "thumbnails.png"
THUMB_SIDE = 64  # longer side of a gallery thumbnail, whatever the model input size
EMBED_QUERY_BYTES = 3 * 64 * 64  # query images up to this size per image live in the bundle


@dataclass
class Gallery:
    """The searchable database of a bundle."""

    codes_packed: np.ndarray  # (N, ceil(K/8)) uint8
    labels: np.ndarray  # (N, C) uint8 multi-hot
    ids: np.ndarray  # (N,) int64, position in the source split
    thumbnails: np.ndarray  # (N, C, H, W) uint8

    def __len__(self) -> int:
        return len(self.ids)

    def codes(self, bits: int) -> np.ndarray:
        """Codes as (N, bits) int8 in {-1, +1}."""
        return unpack_bits(self.codes_packed, bits)

    @classmethod
    def from_codes(
        cls, codes: np.ndarray, labels: np.ndarray, ids: np.ndarray, thumbnails: np.ndarray
    ) -> Gallery:
        return cls(pack_bits(codes), labels.astype(np.uint8), ids.astype(np.int64),
                   thumbnails.astype(np.uint8))


class QuerySet:
    """The protocol's query split: labels and ids, and the images (uint8 (Q, C, H, W)),
    which are either stored in the bundle or read through the data source on first use."""

    def __init__(self, images: np.ndarray | Callable[[], np.ndarray], labels: np.ndarray,
                 ids: np.ndarray) -> None:
        self.labels = labels  # (Q, C) uint8 multi-hot
        self.ids = ids  # (Q,) int64, position in the source test split
        self._images = images if isinstance(images, np.ndarray) else None
        self._load = None if isinstance(images, np.ndarray) else images

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            assert self._load is not None
            self._images = self._load()
        return self._images

    @property
    def embedded(self) -> bool:
        """Whether the images were stored in the bundle (or already loaded)."""
        return self._load is None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Bundle:
    """A loaded bundle: manifest, hasher (eval mode), gallery and protocol splits."""

    path: Path
    manifest: Manifest
    hasher: Hasher
    gallery: Gallery
    queries: QuerySet
    splits: dict[str, np.ndarray]
    sha: str  # sha256 of SHA256SUMS: identifies the exact bundle contents
    _parts: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def device(self) -> torch.device:
        return next(self.hasher.parameters()).device

    def train_positions(self, num: int | None = None, seed: int = 0) -> np.ndarray:
        """Gallery positions of the hasher's training split (a seeded subset of ``num`` when
        given). Empty when the gallery does not hold the train split."""
        pos = {int(i): k for k, i in enumerate(self.gallery.ids)}
        idx = np.array([pos[int(i)] for i in self.splits.get("train", []) if int(i) in pos],
                       np.int64)
        if num is not None and num < len(idx):
            idx = np.sort(np.random.default_rng(seed).choice(idx, num, replace=False))
        return idx

    @property
    def reference(self) -> dict[str, Any] | None:
        """The data source record (None for a format-1 bundle that holds its images)."""
        ref = self.manifest.dataset.get("reference")
        return ref if isinstance(ref, dict) else None

    @property
    def transform(self) -> InputTransform:
        """How an image becomes this bundle's model input (recorded in the manifest)."""
        return InputTransform.from_input(self.manifest.input)

    def data_source(self) -> tuple[ImageSet, ImageSet]:
        """The (database pool, query pool) of the recorded data source, checked unchanged."""
        if "source" not in self._parts:
            ref = self.reference
            if ref is None:
                raise BundleError(f"{self.name}: the manifest records no data source",
                                  field="dataset.reference")
            self._parts["source"] = open_source(ref, self.name)
        pools: tuple[ImageSet, ImageSet] = self._parts["source"]
        return pools

    def database_set(self, positions: np.ndarray | None = None) -> ImageSet:
        """Full-size database images at gallery ``positions`` (all by default), in gallery
        order: read through the data source, or the gallery itself in a format-1 bundle."""
        pos = np.arange(len(self.gallery)) if positions is None else np.asarray(positions)
        if self.reference is None:
            return ArrayImageSet(self.gallery.thumbnails[pos], self.gallery.labels[pos],
                                 self.manifest.class_names, f"{self.name}-database")
        db, _ = self.data_source()
        return db.subset(self.gallery.ids[pos])

    def train_split(self, num: int | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and labels of :meth:`train_positions` (the hasher's training images),
        decoded into memory."""
        return self.images_at(self.train_positions(num, seed))

    def images_at(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and labels of the database items at gallery positions ``idx``,
        decoded into memory (e.g. a validation split taken from the training side)."""
        s = self.database_set(idx)
        images = s.images if isinstance(s, ArrayImageSet) else \
            s.materialize(min(8, os.cpu_count() or 1)).images  # type: ignore[attr-defined]
        if images.shape[1:] != self.transform.shape:
            raise BundleError(f"{self.name}: the training images are {images.shape[1:]}, the "
                              f"model input is {self.transform.shape}", field="bundle")
        return images.copy() if isinstance(s, ArrayImageSet) else images, \
            self.gallery.labels[idx].copy()

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, made once per loaded bundle and kept with it: objects that other
        packages derive from the bundle (e.g. the attacks' database context on its device)."""
        key = f"derived:{key}"
        if key not in self._parts:
            self._parts[key] = build()
        return self._parts[key]

    def prototype(self) -> torch.nn.Module | None:
        """The bundle's PrototypeNet (None when no generator was trained yet)."""

        if "prototype" not in self._parts:
            p = load_prototype(self.path, self.manifest, load_tensors)
            self._parts["prototype"] = p.to(self.device) if p is not None else None
        return self._parts["prototype"]

    def patterns(self) -> Any:
        """The bundle's universal patterns (a :class:`~service.attacks.universal.PatternSet`
        on the bundle's device), or None when none were fitted."""
        if "patterns" not in self._parts:
            p = load_patterns(self.path, self.manifest, load_tensors)
            self._parts["patterns"] = p.to(self.device) if p is not None else None
        return self._parts["patterns"]

    def generator_parts(self, attack: str, eps: float) -> dict[str, Any]:
        """Prototype, decoder, generator and trained eps for ``attack`` at ``eps`` (cached)."""

        entry = pick_generator(self.manifest, attack, eps)
        key = entry["file"]
        if key not in self._parts:
            dec, gen = load_generator(self.path, entry, load_tensors)
            self._parts[key] = (None if dec is None else dec.to(self.device),
                                gen.to(self.device))
        dec, gen = self._parts[key]
        proto = self.prototype() if dec is not None else None
        if dec is not None and proto is None:
            raise BundleError(f"{self.name}: generator {key} present but no PrototypeNet")
        parts = {"prototype": proto, "decoder": dec, "generator": gen, "eps": entry["eps"],
                 "entry": entry}
        if entry.get("base"):
            parts["patterns"] = self.patterns()
        return parts


def _np(t: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(t))


def save_bundle(
    folder: Path,
    manifest: Manifest,
    hasher: Hasher,
    gallery: Gallery,
    queries: QuerySet,
    splits: dict[str, np.ndarray],
    embed_queries: bool | None = None,
) -> Manifest:
    """Write a complete bundle; returns the manifest with its file list filled in.

    ``embed_queries`` (default: only when the manifest records no data source, or each query
    image has at most ``EMBED_QUERY_BYTES`` bytes) stores the query images in the bundle;
    otherwise they are read through the data source when first needed."""
    folder.mkdir(parents=True, exist_ok=True)
    write_payload(folder, HASHER_FILE, dict(hasher.state_dict()))
    write_payload(folder, GALLERY_FILE, {
        "codes_packed": _np(gallery.codes_packed), "labels": _np(gallery.labels),
        "ids": _np(gallery.ids),
    })
    png, cols = encode_atlas(gallery.thumbnails)
    (folder / THUMBS_FILE).write_bytes(png)
    n, c, h, w = gallery.thumbnails.shape
    manifest = manifest.replace(extra={**manifest.extra, "thumbnails": {
        "file": THUMBS_FILE, "count": int(n), "channels": int(c), "height": int(h),
        "width": int(w), "columns": int(cols), "order": "row-major tiles, gallery order"}})
    if manifest.dataset.get("reference") is None:
        embed = True
    elif embed_queries is None:
        embed = int(np.prod(queries.images.shape[1:])) <= EMBED_QUERY_BYTES
    else:
        embed = bool(embed_queries)
    manifest = manifest.replace(extra={**manifest.extra, "queries": {
        "embedded": bool(embed), "count": len(queries)}})
    payload = {"labels": _np(queries.labels), "ids": _np(queries.ids)}
    if embed:
        payload["images"] = _np(queries.images)
    write_payload(folder, QUERIES_FILE, payload)
    write_payload(folder, SPLITS_FILE, {k: _np(v.astype(np.int64)) for k, v in splits.items()})
    return finalize(folder, manifest,
                    [HASHER_FILE, GALLERY_FILE, THUMBS_FILE, QUERIES_FILE, SPLITS_FILE])


def verify_bundle(folder: Path) -> dict[str, str]:
    """Check SHA256SUMS against the files; returns {path: sha}. Raises on any mismatch."""
    sums = folder / SUMS
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    if not sums.is_file():
        raise BundleError(f"{folder} has no {SUMS}; it is not a complete bundle")
    recorded: dict[str, str] = {}
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise BundleError(f"{sums} line {n} is malformed")
        name = parts[1].lstrip("*")
        if "/" in name or name.startswith("."):
            raise BundleError(f"{sums} line {n} names a path outside the bundle: {name!r}")
        recorded[name] = parts[0]
    for name, sha in recorded.items():
        p = folder / name
        if not p.is_file():
            raise BundleError(f"{folder.name}: {name} is listed in {SUMS} but missing")
        actual = sha256_file(p)
        if actual != sha:
            raise ChecksumMismatch(
                f"{folder.name}: checksum mismatch for {name} (expected {sha[:12]}..., "
                f"found {actual[:12]}...); the file is corrupt or was modified. Restore it or "
                "rebuild the bundle with `hashaudit train bundle`."
            )
    if MANIFEST not in recorded:
        raise BundleError(f"{folder.name}: {SUMS} does not cover {MANIFEST}")
    return recorded


def build_bundle_hasher(manifest: Manifest) -> Hasher:
    """Rebuild the hasher architecture recorded in a manifest (random weights)."""
    h, i = manifest.hasher, manifest.input
    return build_hasher(
        h["arch"], int(h["bits"]), num_classes=int(h.get("num_classes", 0)),
        in_channels=int(i["channels"]), mean=i["mean"], std=i["std"],
        arch_kwargs=h.get("arch_kwargs", {}),
    )


def load_hasher(folder: Path | str,
                device: str | torch.device = "cpu") -> tuple[Manifest, Hasher]:
    """Verify a bundle folder's checksums and load its manifest and hasher (eval mode,
    gradients disabled); the gallery is not read. :func:`load_bundle` starts with this, and
    ``hashaudit index`` uses it alone on an imported bundle whose gallery is still empty."""
    folder = Path(folder)
    recorded = verify_bundle(folder)
    manifest = Manifest.from_json((folder / MANIFEST).read_text(), f"{folder.name}/{MANIFEST}")
    for entry in manifest.files:
        if entry["path"] not in recorded or recorded[entry["path"]] != entry["sha256"]:
            raise ChecksumMismatch(
                f"{folder.name}: {entry['path']} in the manifest does not match {SUMS}"
            )
    hasher = build_bundle_hasher(manifest)
    try:
        hasher.load_state_dict(load_tensors(folder, manifest.hasher.get("weights", HASHER_FILE)),
                               strict=True)
    except RuntimeError as exc:
        raise BundleError(
            f"{folder.name}: hasher weights do not fit the architecture in the manifest: {exc}"
        ) from exc
    hasher.eval().requires_grad_(False).to(device)
    return manifest, hasher


def load_bundle(folder: Path | str, device: str | torch.device = "cpu") -> Bundle:
    """Verify and load a bundle; the hasher is in eval mode with gradients disabled.

    An imported bundle that was not indexed yet (``extra.indexed`` false: weights, no
    gallery) is refused with a message saying how to index it."""
    folder = Path(folder)
    manifest, hasher = load_hasher(folder, device)
    if manifest.extra.get("indexed") is False:
        raise BundleError(
            f"{folder.name}: imported but not indexed yet, so it has no gallery to search; "
            f"run `hashaudit index {folder.name} --database LIST --root DIR [--query LIST]`",
            field="bundle")
    g = load_tensors(folder, GALLERY_FILE)
    t = manifest.extra.get("thumbnails")
    if not t:
        raise BundleError(f"{folder.name}: the manifest lacks the thumbnail atlas layout")
    thumbs = decode_atlas((folder / t["file"]).read_bytes(), int(t["count"]),
                          int(t["channels"]), int(t["height"]), int(t["width"]),
                          int(t["columns"]))
    gallery = Gallery(g["codes_packed"].numpy(), g["labels"].numpy(), g["ids"].numpy(), thumbs)
    n, c = len(gallery.ids), len(manifest.class_names)
    i = manifest.input
    expect = {
        "codes_packed": (n, (manifest.bits + 7) // 8), "labels": (n, c),
        "thumbnails": (n, int(t["channels"]), int(t["height"]), int(t["width"])),
    }
    for key, shape in expect.items():
        if tuple(getattr(gallery, key).shape) != shape:
            raise BundleError(
                f"{folder.name}: gallery {key} has shape {tuple(getattr(gallery, key).shape)}, "
                f"the manifest implies {shape}"
            )
    q = load_tensors(folder, QUERIES_FILE)
    q_shape = (int(i["channels"]), int(i["height"]), int(i["width"]))
    splits = {k: v.numpy() for k, v in load_tensors(folder, SPLITS_FILE).items()}
    q_labels, q_ids = q["labels"].numpy(), q["ids"].numpy()
    bundle = Bundle(folder, manifest, hasher, gallery, QuerySet(np.zeros(0), q_labels, q_ids),
                    splits, sha256_file(folder / SUMS))
    if "images" in q:
        bundle.queries = QuerySet(q["images"].numpy(), q_labels, q_ids)
    elif bundle.reference is not None:
        bundle.queries = QuerySet(lambda: _source_queries(bundle), q_labels, q_ids)
    else:
        raise BundleError(f"{folder.name}: {QUERIES_FILE} holds no images and the manifest "
                          "records no data source to read them from")
    if (bundle.queries.embedded and bundle.queries.images.shape[1:] != q_shape) or \
            q_labels.shape[1] != c:
        raise BundleError(f"{folder.name}: query images or labels do not match the manifest")
    return bundle


def _source_queries(bundle: Bundle) -> np.ndarray:
    """The query images of a bundle whose queries are not embedded, checked against the
    bundle's query labels."""
    _, qpool = bundle.data_source()
    s = qpool.subset(bundle.queries.ids)
    if not np.array_equal(s.labels, bundle.queries.labels):
        raise BundleError(f"{bundle.name}: the data source's query labels differ from the "
                          "bundle's", field="dataset.reference")
    images: np.ndarray = s.materialize(min(8, os.cpu_count() or 1)).images  # type: ignore
    return images
