"""Parsing of user-facing values shared by the CLI, the API and the jobs: eps and label sets."""

from __future__ import annotations

import argparse
import math
import posixpath
from collections.abc import Iterable, Sequence

import numpy as np

from service.errors import AttackInputError

MAX_EPS_CHARS = 64
MAX_INDEX_DIGITS = 9  # a class index has at most this many digits (no huge ints parsed)


def _show(value: object, n: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


def class_index(token: str, n_classes: int) -> int | None:
    """``token`` as a class index if it is one: ASCII digits only (no '²', Arabic-Indic or
    full-width digits, no sign, no spaces), within ``0 .. n_classes - 1``; else None."""
    if not token.isascii() or not token.isdigit() or len(token) > MAX_INDEX_DIGITS:
        return None
    value = int(token)
    return value if value < n_classes else None


def eps_value(text: str | float, field: str = "eps") -> float:
    """'8/255', '0.0314' or a number -> float in (0, 1]; errors name ``field``."""
    if isinstance(text, bool):
        raise AttackInputError(f"{field}: {text!r} is not an eps (write 8/255 or 0.0314)",
                               field=field)
    if isinstance(text, int | float):
        try:
            value = float(text)
        except OverflowError:
            value = math.inf
    else:
        s = str(text).strip()
        try:
            if not s.isascii() or len(s) > MAX_EPS_CHARS:
                raise ValueError(s)
            if "/" in s:
                num, den = s.split("/", 1)
                value = float(num) / float(den)
            else:
                value = float(s)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise AttackInputError(
                f"{field}: {_show(text)} is not an eps (write 8/255 or 0.0314)", field=field
            ) from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise AttackInputError(f"{field}: must lie in (0, 1], got {_show(text)}", field=field)
    return value


def parse_eps(text: str) -> float:
    """argparse type for eps: '8/255' or '0.0314' -> float."""
    try:
        return eps_value(text)
    except AttackInputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def label_tokens(values: str | Iterable[str]) -> list[str]:
    """Split '0,3' / ['0', 'Coat,Bag'] into stripped, non-empty tokens."""
    items = [values] if isinstance(values, str) else list(values)
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()]


def label_vector(values: str | Iterable[str], class_names: Sequence[str],
                 field: str = "labels") -> np.ndarray:
    """Class indices or names -> multi-hot ``uint8`` vector; errors name the bad value.

    Raises:
        AttackInputError: a token is neither an index in range nor a class name, or no label
            was given. ``field`` is the offending input's name.
    """
    names = list(class_names)
    vec = np.zeros(len(names), np.uint8)
    tokens = label_tokens(values)
    for tok in tokens:
        index = class_index(tok, len(names))
        if index is not None:
            vec[index] = 1
        elif tok in names:
            vec[names.index(tok)] = 1
        else:
            raise AttackInputError(
                f"{field}: {_show(tok)} is neither a class index 0..{len(names) - 1} (ASCII "
                f"digits) nor a class name ({', '.join(names)})", field=field)
    if not tokens:
        raise AttackInputError(f"{field}: give at least one label (index or class name)",
                               field=field)
    return vec


def archive_member_path(entry: str) -> str | None:
    """The archive member a list entry names (``\\`` read as ``/``, normalised), or None when
    the entry is absolute or climbs out of the archive."""
    path = entry.replace("\\", "/")
    norm = posixpath.normpath(path)
    if path.startswith("/") or norm == ".." or norm.startswith("../"):
        return None
    return norm


def missing_members_message(list_name: str, missing: Sequence[tuple[int, str]],
                            shown: Sequence[str]) -> str:
    """One line for list entries whose files are not in the archive: how many, the first few
    (``shown``: already formatted for display) by line, and how many more."""
    listed = "; ".join(f"line {n}: {p}" for (n, _), p in zip(missing, shown, strict=False))
    more = len(missing) - len(shown)
    return (f"{list_name}: {len(missing)} listed image file(s) not in the archive: {listed}"
            + (f" (and {more} more)" if more > 0 else ""))
