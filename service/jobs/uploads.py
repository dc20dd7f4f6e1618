"""Uploaded query sets for audits: a zip or tar of images plus a DeepHash-style list file.

The archive is checked when it is uploaded (structure, list format, label count, every listed
file present, limits); the images themselves are decoded by the chunk that uses them, so a
corrupt image fails its audit with a message naming the file. Files are kept in the audit
store (Redis), so workers on other machines can read them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from service.data.deephash_list import load_deephash_list
from service.errors import BadInput, HashAuditError, PayloadTooLarge, UnknownName
from service.jobs.store import AuditStore

UPLOAD_TTL = 7 * 24 * 3600
LIST_NAMES = ("labels.txt", "list.txt", "queries.txt")


def _members(data: bytes, field: str) -> dict[str, bytes]:
    """name -> bytes of the regular files in a zip or (compressed) tar archive."""
    out: dict[str, bytes] = {}
    try:
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        out[info.filename] = z.read(info)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
                for m in t.getmembers():
                    if m.isfile():
                        f = t.extractfile(m)
                        if f is not None:
                            out[m.name] = f.read()
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise BadInput(f"{field}: not a readable zip or tar archive ({exc})", field=field) from None
    return out


def _safe(name: str) -> str | None:
    norm = os.path.normpath(name).replace("\\", "/")
    if norm.startswith(("/", "../")) or norm == ".." or os.path.isabs(name):
        return None
    return norm[2:] if norm.startswith("./") else norm


def parse_query_archive(data: bytes, class_names: list[str], max_files: int,
                        field: str = "archive") -> tuple[list[str], np.ndarray, list[bytes]]:
    """(names, multi-hot labels, file bytes) in list-file order; errors name the problem."""
    members = _members(data, field)
    files: dict[str, bytes] = {}
    for name, blob in members.items():
        safe = _safe(name)
        if safe is None:
            raise BadInput(f"{field}: unsafe path {name!r} in the archive", field=field)
        files[safe] = blob
    lists = [n for n in files if Path(n).name in LIST_NAMES and "/" not in n.strip("/")]
    if not lists:
        lists = [n for n in files if n.endswith(".txt")]
    if len(lists) != 1:
        raise BadInput(f"{field}: put exactly one list file (labels.txt: 'path l1 ... lC' per "
                       f"line) at the archive root; found {sorted(lists) or 'none'}", field=field)
    if len(files) - 1 > max_files:
        raise PayloadTooLarge(f"{field}: {len(files) - 1} files; at most {max_files} queries "
                              "per upload", field=field)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, blob in files.items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
        try:
            ds = load_deephash_list(root / lists[0], root, channels=1, size=(8, 8),
                                    class_names=class_names)
        except HashAuditError as exc:
            msg = exc.message.replace(str(root) + "/", "").replace(str(root), "")
            raise BadInput(f"{field}: {msg}", field=field) from None
        rel = [str(Path(p).relative_to(root)) for p in ds.paths]
    if len(rel) > max_files:
        raise PayloadTooLarge(f"{field}: {len(rel)} entries; at most {max_files}", field=field)
    return rel, np.asarray(ds.labels, np.uint8), [files[r] for r in rel]


def save_upload(store: AuditStore, model: str, names: list[str], labels: np.ndarray,
                blobs: list[bytes]) -> dict[str, Any]:
    upload_id = uuid.uuid4().hex[:16]
    meta = {"id": upload_id, "model": model, "count": len(names), "names": names,
            "labels": labels.tolist(), "created_at": time.time(),
            "bytes": int(sum(len(b) for b in blobs))}
    key = store.upload_key(upload_id)
    store.kv.hset(key, mapping={"meta": json.dumps(meta),
                                **{f"f{i}": b for i, b in enumerate(blobs)}})
    store.kv.expire(key, UPLOAD_TTL)
    return {k: meta[k] for k in ("id", "model", "count", "bytes", "created_at")}


def upload_meta(store: AuditStore, upload_id: str) -> dict[str, Any]:
    raw = store.kv.hget(store.upload_key(upload_id), "meta")
    if raw is None:
        raise UnknownName(f"queries.upload_id: no upload {upload_id!r} (expired or never made)",
                          field="queries.upload_id")
    return json.loads(raw)


def upload_files(store: AuditStore, upload_id: str,
                 positions: np.ndarray) -> tuple[dict[str, Any], list[bytes]]:
    meta = upload_meta(store, upload_id)
    key = store.upload_key(upload_id)
    out = []
    for p in positions.tolist():
        blob = store.kv.hget(key, f"f{p}")
        if blob is None:
            raise UnknownName(f"queries.upload_id: upload {upload_id} lost file {p}",
                              field="queries.upload_id")
        out.append(blob)
    return meta, out
