"""``hashaudit index``: encode the user's database into an imported bundle's gallery.

The database is a DeepHash-pytorch list (``path l1 ... lC`` per line, paths relative to
``root``) or an image folder (one class per sub-folder); queries (optional) likewise. Images
are prepared with the bundle's recorded input transform, decoded by a pool of threads and
encoded in batches on the chosen device (CUDA when there is one). Work is cut into chunks of
``chunk`` images; each finished chunk (packed codes and display thumbnails) is written to a
work folder at once, so an interrupted run resumes where it stopped when started again with
the same arguments (another bundle, data or chunk size starts afresh).

Instead of encoding, ``codes`` takes the database codes DeepHash-pytorch saves
(``trn_binary.npy``: float +-1, one row per database line in list order; a 0, torch.sign of
an exact 0, counts as +1 as it does here) and ``labels`` its ``trn_label.npy``. A seeded
sample of the database is re-encoded here and compared first: if any sampled code differs
(by more than ``bit_tolerance`` bits) the codes are refused, with how many differ. The images
are still decoded once, for the thumbnails.

The result is written as a normal bundle (gallery, thumbnails, queries, splits, figures,
``dataset.reference`` to the user's list or folder): the bundle folder is replaced by a
complete new one in a single rename, so a bundle is never half written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.data.base import FileImageSet
from service.data.preprocess import InputTransform, make_thumbnails
from service.data.sources import load_source, source_record
from service.data.splits import index_digest
from service.errors import BadInput, BundleError, ConfigError, DataNotFound
from service.evaluation import protocol_record, retrieval_figures
from service.nets.hasher import Hasher, encode_uint8
from service.retrieval.codes import pack_bits, unpack_bits
from service.store.bundle import (
    EMBED_QUERY_BYTES,
    THUMB_SIDE,
    Gallery,
    QuerySet,
    load_hasher,
    save_bundle,
)
from service.store.manifest import Manifest

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
MAX_CHUNK = 65536
MAX_BATCH = 4096
MAX_SAMPLE = 100_000


@dataclass(frozen=True)
class IndexSpec:
    """Where the database (and queries) are and how to encode them.

    Attributes:
        database: a DeepHash list file or an image folder.
        root: image root of list files (required for lists).
        query: a list file or image folder of queries (optional).
        class_names: one per label column (lists; default ``class_0`` ...).
        num_query: a seeded sample of this many queries (default: all).
        seed: sampling seed (queries, and the codes check).
        codes / labels: precomputed database codes and labels (``.npy``).
        check_sample: database images re-encoded to check ``codes``.
        bit_tolerance: a sampled code differing in at most this many bits still counts as
            the same.
        batch_size: images per forward pass.
        chunk: images per resumable chunk.
        workers: decoding threads.
        work: work folder (default: ``.index-<name>`` beside the bundle).
    """

    database: Path
    root: Path | None = None
    query: Path | None = None
    class_names: list[str] | None = None
    num_query: int | None = None
    seed: int = 0
    codes: Path | None = None
    labels: Path | None = None
    check_sample: int = 100
    bit_tolerance: int = 0
    batch_size: int = 64
    chunk: int = 1024
    workers: int = 4
    work: Path | None = None

    def check(self) -> None:
        for key, value, lo, hi in (("batch_size", self.batch_size, 1, MAX_BATCH),
                                   ("chunk", self.chunk, 1, MAX_CHUNK),
                                   ("workers", self.workers, 1, 64),
                                   ("check_sample", self.check_sample, 1, MAX_SAMPLE),
                                   ("bit_tolerance", self.bit_tolerance, 0, 4096),
                                   ("seed", self.seed, 0, 2**32 - 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{key}: an integer from {lo} to {hi}, got {value!r}",
                                  field=key)
        if self.num_query is not None and not 1 <= self.num_query <= 10_000_000:
            raise ConfigError("num_query: at least 1", field="num_query")
        if self.labels is not None and self.codes is None:
            raise ConfigError("labels: only with codes (the precomputed database codes)",
                              field="labels")


def _source(spec: IndexSpec, t: InputTransform) -> tuple[str, dict[str, Any]]:
    """The data source kind and options of the user's database (absolute paths)."""
    db = Path(spec.database)
    common = {"channels": t.channels, "size": [t.height, t.width], "resize": t.resize,
              "interpolation": t.interpolation, "resize_mode": t.resize_mode}
    if not db.exists():
        raise DataNotFound(f"database: {db} does not exist", field="database")
    q = Path(spec.query) if spec.query is not None else None
    if q is not None and not q.exists():
        raise DataNotFound(f"query: {q} does not exist", field="query")
    if db.is_dir():
        if q is not None and not q.is_dir():
            raise ConfigError("query: the database is an image folder, so the queries must "
                              "be one too", field="query")
        if spec.class_names is not None:
            raise ConfigError("class_names: an image folder's classes are its sub-folders",
                              field="class_names")
        return "image_folder", {"database_root": str(db.resolve()),
                                "query_root": None if q is None else str(q.resolve()),
                                **common}
    if spec.root is None:
        raise ConfigError("root: the folder the list's image paths are relative to is "
                          "required with a list file", field="root")
    if q is not None and q.is_dir():
        raise ConfigError("query: the database is a list file, so the queries must be one "
                          "too", field="query")
    return "deephash_list", {"database_list": str(db.resolve()),
                             "query_list": None if q is None else str(q.resolve()),
                             "image_root": str(Path(spec.root).resolve()),
                             "class_names": spec.class_names, **common}


def _load_npy(path: Path, field: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataNotFound(f"{field}: {path} not found", field=field) from None
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput(f"{field}: {path.name} is not a readable .npy array ({exc})",
                       field=field) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf" or arr.ndim != 2:
        raise BadInput(f"{field}: {path.name} must hold a 2-D numeric array, got "
                       f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}",
                       field=field)
    return arr


def _read_codes(spec: IndexSpec, n: int, bits: int, labels: np.ndarray) -> np.ndarray:
    """Precomputed codes as int8 +-1 (checked: shape, values, and labels when given)."""
    assert spec.codes is not None
    codes = _load_npy(Path(spec.codes), "codes")
    name = Path(spec.codes).name
    if codes.shape != (n, bits):
        raise BadInput(f"codes: {name} has shape {codes.shape}; the database has {n} images "
                       f"and the model {bits} bits", field="codes")
    if not np.isin(codes, (-1, 0, 1)).all():
        raise BadInput(f"codes: {name} holds values other than -1, 0 and +1 (sign codes)",
                       field="codes")
    if spec.labels is not None:
        lab = _load_npy(Path(spec.labels), "labels")
        if lab.shape != labels.shape:
            raise BadInput(f"labels: {Path(spec.labels).name} has shape {lab.shape}, the "
                           f"database list {labels.shape}", field="labels")
        differ = int((lab.astype(np.int64) != labels.astype(np.int64)).any(1).sum())
        if differ:
            raise BadInput(f"labels: {differ} of {n} rows of {Path(spec.labels).name} differ "
                           "from the database list's labels; the files are not of this "
                           "database, or not in its order", field="labels")
    return np.where(codes >= 0, 1, -1).astype(np.int8)


def _decode(pool: FileImageSet, positions: np.ndarray, workers: int) -> np.ndarray:
    out = np.empty((len(positions), *pool.image_shape), np.uint8)

    def one(k: int) -> None:
        out[k] = pool.load_uint8(int(positions[k]))

    if workers > 1 and len(positions) > 1:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(one, range(len(positions))))
    else:
        for k in range(len(positions)):
            one(k)
    return out


def check_codes(hasher: Hasher, pool: FileImageSet, codes: np.ndarray, spec: IndexSpec,
                list_name: str) -> dict[str, Any]:
    """Re-encode a seeded sample of the database and compare with ``codes``; refuses (with
    how many sampled codes differ) on any difference above ``bit_tolerance``."""
    n = len(codes)
    k = min(spec.check_sample, n)
    sample = np.sort(np.random.default_rng(spec.seed).choice(n, k, replace=False))
    mine = encode_uint8(hasher, _decode(pool, sample, spec.workers), spec.batch_size)
    bits = (mine != codes[sample]).sum(1)
    bad = np.flatnonzero(bits > spec.bit_tolerance)
    rec = {"file": Path(spec.codes).name if spec.codes else None, "sampled": int(k),
           "seed": spec.seed, "bit_tolerance": spec.bit_tolerance,
           "differing": int(len(bad)), "max_bits_differing": int(bits.max(initial=0))}
    if len(bad):
        first = int(sample[bad[0]])
        raise BadInput(
            f"codes: {len(bad)} of {k} sampled database codes differ from "
            f"{rec['file']} by more than {spec.bit_tolerance} bit(s) when re-encoded here "
            f"(the first: line {first + 1} of {list_name}, {int(bits[bad[0]])} of "
            f"{codes.shape[1]} bits). The codes were not made by this checkpoint with this "
            "preprocessing: check the import's --resize, --crop, --mean and --std, or drop "
            "--codes to encode the database here", field="codes")
    return rec


class _Work:
    """Chunk files of one indexing job in a work folder (atomic writes, resumable)."""

    def __init__(self, folder: Path, job: dict[str, Any]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        job_file = folder / JOB_FILE
        text = json.dumps(job, sort_keys=True)
        if job_file.is_file() and job_file.read_text() != text:
            log.info("work folder %s holds another job; starting afresh", folder)
            for p in folder.glob("*.npz"):
                p.unlink()
        job_file.write_text(text)

    def path(self, part: str, k: int) -> Path:
        return self.folder / f"{part}_{k:06d}.npz"

    def load(self, part: str, k: int) -> dict[str, np.ndarray] | None:
        p = self.path(part, k)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}

    def save(self, part: str, k: int, **arrays: np.ndarray) -> None:
        p = self.path(part, k)
        tmp = p.with_name(p.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, p)


def _encode_part(part: str, pool: FileImageSet, positions: np.ndarray, hasher: Hasher,
                 spec: IndexSpec, work: _Work, *, codes: np.ndarray | None, thumbs: bool,
                 keep_images: bool, progress: Callable[[int], None] | None
                 ) -> dict[str, np.ndarray]:
    """Codes (packed), thumbnails and (``keep_images``) the images of ``positions``, chunk by
    chunk; chunks already in the work folder are read back, not recomputed."""
    out: dict[str, list[np.ndarray]] = {"codes": [], "thumbs": [], "images": []}
    done = computed = 0
    for k, start in enumerate(range(0, len(positions), spec.chunk)):
        pos = positions[start:start + spec.chunk]
        got = work.load(part, k)
        if got is None:
            t0 = time.perf_counter()
            images = _decode(pool, pos, spec.workers)
            packed = pack_bits(codes[pos] if codes is not None
                               else encode_uint8(hasher, images, spec.batch_size))
            got = {"codes": packed}
            if thumbs:
                got["thumbs"] = make_thumbnails(images, THUMB_SIDE)
            if keep_images:
                got["images"] = images
            work.save(part, k, **got)
            computed += len(pos)
            log.debug("%s chunk %d: %d images in %.2f s", part, k, len(pos),
                      time.perf_counter() - t0)
        for key in out:
            if key in got:
                out[key].append(got[key])
        done += len(pos)
        if progress is not None:
            progress(len(pos))
    log.info("%s: %d images, %d encoded now, %d from the work folder", part, done, computed,
             done - computed)
    return {k: np.concatenate(v) for k, v in out.items() if v}


def index_bundle(folder: Path | str, spec: IndexSpec, device: str = "cpu",
                 progress: Callable[[int], None] | None = None,
                 total: Callable[[int], None] | None = None,
                 command: str | None = None) -> Manifest:
    """Index ``folder`` (an imported bundle) with the database of ``spec``; returns the new
    manifest. ``total(n)`` is told the number of images first, ``progress(k)`` each chunk's.

    Raises:
        BundleError: not an imported bundle, or it has generators (their training data
            would no longer be the gallery's).
        DataNotFound / CorruptData / ConfigError / BadInput: bad data or options (the
            message names the field); mismatching precomputed codes.
    """
    spec.check()
    folder = Path(folder)
    manifest, hasher = load_hasher(folder, device)
    name = manifest.name
    if "provenance" not in manifest.extra:
        raise BundleError(f"{name}: not an imported bundle; `hashaudit index` fills the gallery "
                          "of bundles made by `hashaudit import`", field="bundle")
    if manifest.generators:
        raise BundleError(f"{name}: has {len(manifest.generators)} trained generator(s); "
                          "indexing another database would leave them trained on images no "
                          "longer in the gallery. Import the checkpoint again under another "
                          "name to index it anew", field="bundle")
    t = InputTransform.from_input(manifest.input)
    kind, options = _source(spec, t)
    db_pool, q_pool = load_source({"kind": kind, **options})
    assert isinstance(db_pool, FileImageSet) and isinstance(q_pool, FileImageSet)
    reference = source_record({"kind": kind, **options}, (len(db_pool), len(q_pool)))
    n, bits = len(db_pool), int(hasher.bits)
    q_ids = np.arange(len(q_pool), dtype=np.int64)
    if spec.num_query is not None and spec.num_query < len(q_pool):
        q_ids = np.sort(np.random.default_rng(spec.seed).choice(len(q_pool), spec.num_query,
                                                                replace=False))
    codes_in = check = None
    list_name = Path(spec.database).name
    if spec.codes is not None:
        codes_in = _read_codes(spec, n, bits, db_pool.labels)
        check = check_codes(hasher, db_pool, codes_in, spec, list_name)
        log.info("codes: %d sampled codes of %s match", check["sampled"], check["file"])
    embed = int(np.prod(t.shape)) <= EMBED_QUERY_BYTES
    hasher_sha = next(f["sha256"] for f in manifest.files
                      if f["path"] == manifest.hasher.get("weights", "hasher.safetensors"))
    job = {"hasher": hasher_sha, "reference": reference, "transform": t.to_record(),
           "chunk": spec.chunk,
           "codes": None if codes_in is None else hashlib.sha256(codes_in.tobytes()).hexdigest(),
           "queries": index_digest(q_ids), "embed_queries": embed}
    work = _Work(Path(spec.work) if spec.work else folder.parent / f".index-{name}", job)
    if total is not None:
        total(n + len(q_ids))
    t0 = time.perf_counter()
    db = _encode_part("db", db_pool, np.arange(n), hasher, spec, work, codes=codes_in,
                      thumbs=True, keep_images=False, progress=progress)
    q: dict[str, np.ndarray] = {}
    if len(q_ids):
        q = _encode_part("q", q_pool, q_ids, hasher, spec, work, codes=None, thumbs=False,
                         keep_images=embed, progress=progress)
    seconds = time.perf_counter() - t0
    db_codes = unpack_bits(db["codes"], bits)
    figures: dict[str, Any] = {}
    if len(q_ids):
        figures = retrieval_figures(unpack_bits(q["codes"], bits), q_pool.labels[q_ids],
                                    db_codes, db_pool.labels)
        log.info("clean mAP@all %.4f, mAP@1000 %.4f, P@r2 %.4f (%d queries, %d database)",
                 figures["map_all"], figures["map_1000"], figures["p_r2"], len(q_ids), n)
    db_ids = np.arange(n, dtype=np.int64)
    source_name = Path(spec.database).stem if kind == "deephash_list" else \
        Path(spec.database).resolve().name
    splits = {"query": q_ids, "database": db_ids, "train": db_ids}
    manifest = manifest.replace(
        dataset={
            "name": source_name, "source": {"kind": kind, **options}, "reference": reference,
            "class_names": list(db_pool.class_names),
            "splits": {"protocol": "hashaudit-index-v1", "seed": spec.seed,
                       "database": "every image of the database, in list order",
                       "query": ("every query" if len(q_ids) == len(q_pool) else
                                 f"a seeded sample of {len(q_ids)} of {len(q_pool)} queries"),
                       "train": "the database (an imported model's training split is not "
                                "known; generators train on the database)",
                       "num_query": int(len(q_ids)), "num_database": n, "num_train": n,
                       "sha256": {"query": index_digest(q_ids),
                                  "database": index_digest(db_ids),
                                  "train": index_digest(db_ids)}},
            "sizes": {"train": n, "database": n, "query": int(len(q_ids))},
        },
        evaluation={"protocol": protocol_record(), "figures": figures} if figures else {},
        extra={**manifest.extra, "indexed": True, "index": {
            "command": command, "device": str(device), "seconds": round(seconds, 1),
            "codes": "encoded by this hasher" if check is None else
            {"precomputed": check["file"], "check": check},
            "labels": None if spec.labels is None else Path(spec.labels).name}},
    )
    gallery = Gallery(db["codes"], db_pool.labels, db_ids, db["thumbs"])
    q_labels = q_pool.labels[q_ids]
    queries = QuerySet(q["images"] if embed and len(q_ids) else
                       np.zeros((0, *t.shape), np.uint8), q_labels, q_ids)
    replace_folder(folder, lambda tmp: save_bundle(tmp, manifest, hasher.cpu(), gallery,
                                                   queries, splits, embed_queries=embed))
    shutil.rmtree(work.folder, ignore_errors=True)
    return Manifest.from_json((folder / "manifest.json").read_text())


def replace_folder(folder: Path, write: Callable[[Path], Any]) -> None:
    """Write a complete new version of ``folder`` beside it (``write(tmp)``), then swap it in
    with two renames; on any failure the old folder stays (or is put back)."""
    tmp = folder.parent / f".{folder.name}.indexing"
    old = folder.parent / f".{folder.name}.replaced"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    folder.rename(old)
    try:
        tmp.rename(folder)
    except OSError:
        old.rename(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
