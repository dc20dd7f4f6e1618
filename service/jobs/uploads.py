"""Uploaded query sets for audits: a zip or tar of images plus a DeepHash-style list file.

The archive is checked when it is uploaded (structure, member names, list format, labels,
every listed file present, limits); the images themselves are decoded by the chunk that uses
them, so a corrupt image fails its audit with a message naming the file. Files are kept in
the audit store (Redis), so workers on other machines can read them.

Archives are hostile input. Nothing here trusts a size an archive declares: members are read
in small pieces and every inflated byte is counted against the per-member and total limits
(and, for a compressed tar, the inflated tar stream itself), so a bomb is stopped after at
most one piece past the limit; entries are counted as they come (a zip's directory is sized
from its end record before it is parsed); list files are checked for line count and line
length while they inflate. Nothing is written to disk: names are checked against what a
filesystem could hold (length, depth, characters, a file beside a folder of the same name)
so a set that passes here also unpacks anywhere.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import posixpath
import struct
import tarfile
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from service.data.deephash_list import parse_list_lines
from service.errors import BadInput, HashAuditError, PayloadTooLarge, UnknownName
from service.jobs.audit_store import AuditStore
from service.parsing import archive_member_path, missing_members_message

UPLOAD_TTL = 7 * 24 * 3600
LIST_NAMES = ("labels.txt", "list.txt", "queries.txt")
PIECE = 64 * 1024  # bytes inflated per read
MAX_NAME_BYTES = 1024  # a member's whole path
MAX_COMPONENT_BYTES = 255  # one folder or file name (NAME_MAX of common filesystems)
MAX_DEPTH = 32  # folders in a member's path
ZIP_DIR_BYTES_PER_ENTRY = 2048  # a zip's central directory may hold this much per entry
TAR_BYTES_PER_MEMBER = 2048  # header (and padding) allowance of an inflated tar stream
_MISSING_SHOWN = 5


@dataclass(frozen=True)
class ArchiveLimits:
    """Limits on one uploaded archive (``HASHAUDIT_*`` settings; see :mod:`service.config`)."""

    unpacked_bytes: int = 512 * 1024 * 1024
    member_bytes: int = 32 * 1024 * 1024
    members: int = 25_000
    list_lines: int = 50_000
    list_line_bytes: int = 4096
    queries: int = 20_000

    @classmethod
    def from_settings(cls, s: Any) -> ArchiveLimits:
        return cls(unpacked_bytes=s.max_archive_unpacked_bytes,
                   member_bytes=s.max_archive_member_bytes, members=s.max_archive_members,
                   list_lines=s.max_list_lines, list_line_bytes=s.max_list_line_bytes,
                   queries=s.max_audit_queries)


def _show(name: str, n: int = 120) -> str:
    r = repr(name)
    return r if len(r) <= n else r[:n] + "...'"


def _too_large(field: str, what: str, limit: int, setting: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field}: {what}; the limit is {limit} ({setting})", field=field)


def _bad(field: str, message: str) -> BadInput:
    return BadInput(f"{field}: {message}", field=field)


class _Extraction:
    """What one archive holds so far, with the counters every limit is checked against."""

    def __init__(self, limits: ArchiveLimits, field: str) -> None:
        self.limits = limits
        self.field = field
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = set()
        self.entries = 0
        self.unpacked = 0

    def count_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.members:
            raise _too_large(self.field, f"more than {self.limits.members} members",
                             self.limits.members, "HASHAUDIT_MAX_ARCHIVE_MEMBERS")

    def name(self, raw: str) -> str:
        """The member's normalised path ('' for the root itself); 422 naming it if no
        filesystem could hold it or it climbs out of the archive."""
        f = self.field
        if any(ord(c) < 32 or ord(c) == 127 for c in raw):
            raise _bad(f, f"member {_show(raw)}: control characters (NUL, newline...) in the "
                          "name")
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            raise _bad(f, f"member {_show(raw)}: the name is not valid UTF-8") from None
        if size > MAX_NAME_BYTES:
            raise _bad(f, f"member {_show(raw)}: the name is {size} bytes long; at most "
                          f"{MAX_NAME_BYTES}")
        path = raw.replace("\\", "/")
        norm = posixpath.normpath(path) if path else "."
        if path.startswith("/") or norm == ".." or norm.startswith("../") or (
                len(path) > 1 and path[1] == ":"):
            raise _bad(f, f"unsafe path {_show(raw)} in the archive")
        if norm == ".":
            return ""
        parts = norm.split("/")
        if len(parts) > MAX_DEPTH:
            raise _bad(f, f"member {_show(raw)}: {len(parts) - 1} folders deep; at most "
                          f"{MAX_DEPTH - 1}")
        long = next((p for p in parts if len(p.encode("utf-8")) > MAX_COMPONENT_BYTES), None)
        if long is not None:
            raise _bad(f, f"member {_show(raw)}: the name part {_show(long, 40)} is longer than "
                          f"{MAX_COMPONENT_BYTES} bytes")
        return norm

    def add_dir(self, name: str) -> None:
        if name:
            self.dirs.add(name)

    def add_file(self, name: str, stream: IO[bytes], declared: int | None) -> None:
        """Inflate one member piece by piece, counting against the limits."""
        lim, f = self.limits, self.field
        if name in self.files:
            raise _bad(f, f"member {_show(name)} appears twice in the archive")
        if declared is not None and declared > lim.member_bytes:
            raise _too_large(f, f"member {_show(name)} inflates to {declared} bytes",
                             lim.member_bytes, "HASHAUDIT_MAX_ARCHIVE_MEMBER_BYTES")
        lines = _LineCheck(name, lim, f) if name.lower().endswith(".txt") else None
        pieces, size = [], 0
        while True:
            piece = stream.read(PIECE)
            if not piece:
                break
            size += len(piece)
            self.unpacked += len(piece)
            if size > lim.member_bytes:
                raise _too_large(f, f"member {_show(name)} inflates to more than "
                                    f"{lim.member_bytes} bytes", lim.member_bytes,
                                 "HASHAUDIT_MAX_ARCHIVE_MEMBER_BYTES")
            if self.unpacked > lim.unpacked_bytes:
                raise _too_large(f, f"the members inflate to more than {lim.unpacked_bytes} "
                                    "bytes", lim.unpacked_bytes,
                                 "HASHAUDIT_MAX_ARCHIVE_UNPACKED_BYTES")
            if lines is not None:
                lines.feed(piece)
            pieces.append(piece)
        if lines is not None:
            lines.close()
        self.files[name] = b"".join(pieces)

    def check_tree(self) -> None:
        """No file may also be a folder (``a`` beside ``a/b``): no filesystem holds both."""
        folders = set(self.dirs)
        for name in self.files:
            parts = name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        clash = sorted(folders & self.files.keys())
        if clash:
            raise _bad(self.field, f"member {_show(clash[0])} is both a file and a folder")


class _LineCheck:
    """Counts lines and line lengths of a text member as it inflates."""

    def __init__(self, name: str, limits: ArchiveLimits, field: str) -> None:
        self.name, self.limits, self.field = name, limits, field
        self.lines = 0
        self.current = 0

    def _end_line(self) -> None:
        self.lines += 1
        if self.lines > self.limits.list_lines:
            raise _too_large(self.field, f"{self.name} has more than {self.limits.list_lines} "
                                         "lines", self.limits.list_lines,
                             "HASHAUDIT_MAX_LIST_LINES")
        self.current = 0

    def _grow(self, n: int) -> None:
        self.current += n
        if self.current > self.limits.list_line_bytes:
            raise _too_large(self.field, f"{self.name}, line {self.lines + 1} is longer than "
                                         f"{self.limits.list_line_bytes} bytes",
                             self.limits.list_line_bytes, "HASHAUDIT_MAX_LIST_LINE_BYTES")

    def feed(self, piece: bytes) -> None:
        parts = piece.split(b"\n")
        for i, part in enumerate(parts):
            if i:
                self._end_line()
            self._grow(len(part))

    def close(self) -> None:
        if self.current:
            self._end_line()


class _CountingReader:
    """A read-only stream that refuses to yield more than ``limit`` bytes in all: it never
    asks the stream below for more than one byte past what is left."""

    def __init__(self, inner: Any, limit: int, field: str) -> None:
        self.inner, self.limit, self.field = inner, limit, field
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        left = self.limit - self.count
        n = left + 1 if n is None or n < 0 or n > left + 1 else n
        data = self.inner.read(n)
        self.count += len(data)
        if self.count > self.limit:
            raise _too_large(self.field, f"the tar stream inflates to more than {self.limit} "
                                         "bytes", self.limit,
                             "HASHAUDIT_MAX_ARCHIVE_UNPACKED_BYTES plus "
                             f"{TAR_BYTES_PER_MEMBER} bytes of headers per member")
        return data


def _zip_directory(f: IO[bytes]) -> tuple[int, int] | None:
    """(entries, central directory bytes) from a zip's end record, or None if not found."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    tail_len = min(size, 22 + 65535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        return None
    _, _, _, _, entries, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[pos:pos + 22])
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF) and pos >= 20:
        loc = tail[pos - 20:pos]
        if loc[:4] == b"PK\x06\x07":
            (offset,) = struct.unpack("<Q", loc[8:16])
            if offset + 56 <= size:
                f.seek(offset)
                rec = f.read(56)
                if rec[:4] == b"PK\x06\x06":
                    entries, cd_size = struct.unpack("<QQ", rec[32:48])
    return int(entries), int(cd_size)


def _read_zip(f: IO[bytes], ex: _Extraction) -> None:
    lim = ex.limits
    directory = _zip_directory(f)
    if directory is not None:
        entries, cd_size = directory
        if entries > lim.members:
            raise _too_large(ex.field, f"the zip lists {entries} members", lim.members,
                             "HASHAUDIT_MAX_ARCHIVE_MEMBERS")
        if cd_size > lim.members * ZIP_DIR_BYTES_PER_ENTRY:
            raise _too_large(ex.field, f"the zip's directory is {cd_size} bytes",
                             lim.members * ZIP_DIR_BYTES_PER_ENTRY,
                             f"HASHAUDIT_MAX_ARCHIVE_MEMBERS x {ZIP_DIR_BYTES_PER_ENTRY}")
    f.seek(0)
    with zipfile.ZipFile(f) as z:
        for info in z.infolist():
            ex.count_entry()
            name = ex.name(info.filename)
            if info.is_dir() or not name:
                ex.add_dir(name)
                continue
            with z.open(info) as member:
                ex.add_file(name, member, info.file_size)


_COMPRESSED = ((b"\x1f\x8b", gzip.GzipFile), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))


def _read_tar(f: IO[bytes], ex: _Extraction) -> None:
    f.seek(0)
    head = f.read(6)
    f.seek(0)
    raw: Any = f
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            raw = opener(fileobj=f, mode="rb")
            break
    lim = ex.limits
    stream = _CountingReader(raw, lim.unpacked_bytes + TAR_BYTES_PER_MEMBER * lim.members,
                             ex.field)
    with tarfile.open(fileobj=stream, mode="r|") as t:  # type: ignore[call-overload]
        for m in t:
            ex.count_entry()
            name = ex.name(m.name)
            if m.isdir() or not name:
                ex.add_dir(name)
            elif m.isfile():
                member = t.extractfile(m)
                if member is not None:
                    ex.add_file(name, member, None)  # sparse members inflate past m.size
            # links, devices and fifos are skipped: a listed one is reported missing


def extract_archive(src: bytes | IO[bytes], limits: ArchiveLimits,
                    field: str = "archive") -> dict[str, bytes]:
    """Normalised path -> bytes of every regular file in a zip or (compressed) tar.

    Raises:
        PayloadTooLarge: a limit was passed (the message names the setting).
        BadInput: not a readable archive, or a member name no filesystem could hold, that
            climbs out of the archive, appears twice or is both a file and a folder.
    """
    f: IO[bytes] = io.BytesIO(src) if isinstance(src, bytes | bytearray) else src
    f.seek(0)
    head = f.read(4)
    ex = _Extraction(limits, field)
    try:
        if head == b"PK\x03\x04" or head == b"PK\x05\x06":
            _read_zip(f, ex)
        else:
            _read_tar(f, ex)
    except HashAuditError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, OSError, EOFError,
            RuntimeError, NotImplementedError, ValueError, zlib.error, lzma.LZMAError,
            struct.error) as exc:
        why = str(exc)[:200] or type(exc).__name__
        raise _bad(field, f"not a readable zip or tar archive ({why})") from None
    ex.check_tree()
    return ex.files


def _find_list(files: dict[str, bytes], field: str) -> str:
    lists = [n for n in files if "/" not in n and n in LIST_NAMES]
    if not lists:
        lists = [n for n in files if n.lower().endswith(".txt")]
    if len(lists) != 1:
        raise _bad(field, "put exactly one list file (labels.txt: 'path l1 ... lC' per line) "
                          f"at the archive root; found {sorted(lists)[:5] or 'none'}")
    return lists[0]


def parse_query_archive(src: bytes | IO[bytes], class_names: list[str],
                        limits: ArchiveLimits | int, field: str = "archive"
                        ) -> tuple[list[str], np.ndarray, list[bytes]]:
    """(names, multi-hot labels, file bytes) in list-file order; errors name the problem.

    ``limits`` may be a bare query count (the other limits at their defaults).
    """
    if isinstance(limits, int):
        limits = ArchiveLimits(queries=limits)
    files = extract_archive(src, limits, field)
    list_name = _find_list(files, field)
    try:
        text = files[list_name].decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad(field, f"{list_name} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    n_classes = len(class_names)
    names: list[str] = []
    rows: list[list[int]] = []
    missing: list[tuple[int, str]] = []
    try:
        for line_no, entry, values in parse_list_lines(text.split("\n"), list_name):
            where = f"{list_name}, line {line_no}"
            if len(values) != n_classes:
                raise _bad(field, f"{where}: {len(values)} label columns; the model has "
                                  f"{n_classes} classes ({', '.join(class_names)})")
            if not any(values):
                raise _bad(field, f"{where}: no label set (all zeros); every query needs at "
                                  "least one class")
            if len(names) >= limits.queries:
                raise _too_large(field, f"{list_name} lists more than {limits.queries} images",
                                 limits.queries, "HASHAUDIT_MAX_AUDIT_QUERIES")
            norm = archive_member_path(entry)
            if norm is None:
                raise _bad(field, f"{where}: image path {_show(entry)} is absolute or climbs "
                                  "out of the archive")
            if norm not in files:
                missing.append((line_no, entry))
            names.append(norm)
            rows.append(values)
    except HashAuditError as exc:
        if isinstance(exc, BadInput) and exc.field == field:
            raise
        raise _bad(field, exc.message) from None
    if not names:
        raise _bad(field, f"{list_name}: the list holds no entries")
    if missing:
        raise _bad(field, missing_members_message(
            list_name, missing, [_show(p, 80) for _, p in missing[:_MISSING_SHOWN]]))
    return names, np.asarray(rows, np.uint8), [files[n] for n in names]


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
