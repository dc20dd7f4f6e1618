"""The database archive of ``POST /models``: lists checked, listed files written to disk.

The API extracts the archive with the audit uploads' extractor (``service.jobs.uploads``:
the same limits on size, members, list lines and names) and hands the files here. The
archive holds ``database.txt`` at its root (DeepHash-pytorch list: ``path l1 ... lC``, paths
relative to the archive root) and, optionally, ``test.txt`` or ``query.txt`` (queries, the
same format). Every listed file must be in the archive; only listed files (and the lists) are
written, under ``dest``, which then serves as the bundle's data source (the bundle keeps
thumbnails and reads full images from there, as it would from the user's own disk).
"""

from __future__ import annotations

from pathlib import Path

from service.data.deephash_list import parse_list_lines
from service.errors import BadInput, HashAuditError
from service.parsing import archive_member_path, missing_members_message

DATABASE_LIST = "database.txt"
QUERY_LISTS = ("test.txt", "query.txt")
_SHOWN = 5


def _bad(field: str, message: str) -> BadInput:
    return BadInput(f"{field}: {message}", field=field)


def _entries(files: dict[str, bytes], list_name: str, field: str) -> tuple[list[str], int]:
    """Normalised image paths of one list and its number of label columns."""
    try:
        text = files[list_name].decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad(field, f"{list_name} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    paths: list[str] = []
    missing: list[tuple[int, str]] = []
    columns = 0
    try:
        for line_no, entry, values in parse_list_lines(text.split("\n"), list_name):
            columns = len(values)
            norm = archive_member_path(entry)
            if norm is None:
                raise _bad(field, f"{list_name}, line {line_no}: image path {entry[:80]!r} is "
                                  "absolute or climbs out of the archive")
            if norm not in files:
                missing.append((line_no, entry))
            paths.append(norm)
    except HashAuditError as exc:
        if isinstance(exc, BadInput) and exc.field == field:
            raise
        raise _bad(field, exc.message) from None
    if not paths:
        raise _bad(field, f"{list_name}: the list holds no entries")
    if missing:
        raise _bad(field, missing_members_message(
            list_name, missing, [repr(p[:80]) for _, p in missing[:_SHOWN]]))
    return paths, columns


def unpack_model_archive(files: dict[str, bytes], dest: Path,
                         field: str = "archive") -> tuple[Path, Path | None, int]:
    """Check the lists of an extracted archive and write them and their images under
    ``dest``; returns ``(database list, query list or None, label columns)``.

    Raises:
        BadInput: no ``database.txt`` at the root, two query lists, a malformed list, label
            columns that differ between the lists, or a listed file not in the archive.
    """
    if DATABASE_LIST not in files:
        raise _bad(field, f"put the database list {DATABASE_LIST} ('path l1 ... lC' per line, "
                          "paths relative to the archive root) at the archive's root; found "
                          f"{sorted(n for n in files if n.endswith('.txt'))[:5] or 'no list'}")
    queries = [n for n in QUERY_LISTS if n in files]
    if len(queries) > 1:
        raise _bad(field, f"one query list at most: {' or '.join(QUERY_LISTS)}")
    db_paths, db_cols = _entries(files, DATABASE_LIST, field)
    wanted = {DATABASE_LIST, *db_paths}
    q_list = None
    if queries:
        q_paths, q_cols = _entries(files, queries[0], field)
        if q_cols != db_cols:
            raise _bad(field, f"{queries[0]} has {q_cols} label columns, {DATABASE_LIST} "
                              f"{db_cols}")
        wanted |= {queries[0], *q_paths}
        q_list = dest / queries[0]
    root = dest.resolve()
    for name in sorted(wanted):
        target = (dest / name).resolve()
        if root not in target.parents:  # extract_archive already refused such names
            raise _bad(field, f"member {name[:80]!r} would land outside the data folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[name])
    return dest / DATABASE_LIST, q_list, db_cols
