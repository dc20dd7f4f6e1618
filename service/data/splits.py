"""Query / database / training splits of the usual deep-hashing evaluation protocol.

* ``query``: items of the TEST split used as retrieval queries.
* ``database``: items of the TRAIN split that are ranked against each query.
* ``train``: items used to train the hashing network, a subset of ``database`` (indices
  into the TRAIN split, all of which are also in ``database``).

The three selections use independent random streams spawned from
``np.random.default_rng(seed)`` (in the order query, database, train), so changing e.g.
``num_query`` does not change which database items are drawn. All index arrays are sorted,
duplicate-free and ``int64``.

With ``stratified=True`` each selection is class-balanced: items are grouped by their first
positive label column (items without any label form one extra group), every group gets an
equal share of the requested count (groups too small to fill their share give the rest to
the others; a remainder that cannot be split evenly goes to randomly chosen groups) and the
members of each group are drawn uniformly without replacement.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.data._checks import non_negative_int, positive_int
from service.errors import ConfigError

SPLITS_PROTOCOL = "hashaudit-splits-v1"
"""Recorded in :meth:`Splits.to_record` to identify how the indices were drawn."""


@dataclass(frozen=True)
class SplitSpec:
    """Sizes and seed of a split.

    Attributes:
        num_query: Number of query items drawn from the test split (``>= 1``).
        num_database: Number of database items drawn from the train split (``>= 1``).
        num_train: Number of training items drawn from the database (``>= 0``).
        seed: Non-negative seed for ``np.random.default_rng``.
        stratified: Draw class-balanced selections (needs labels in :func:`make_splits`).
    """

    num_query: int
    num_database: int
    num_train: int
    seed: int
    stratified: bool = False

    def __post_init__(self) -> None:
        """Validate the field types and ranges.

        Raises:
            ConfigError: A size or the seed is not an integer in range, or
                ``num_train > num_database``; the error's ``field`` names the field.
        """
        positive_int(self.num_query, "num_query")
        positive_int(self.num_database, "num_database")
        non_negative_int(self.num_train, "num_train")
        non_negative_int(self.seed, "seed")
        if not isinstance(self.stratified, bool):
            raise ConfigError(
                f"stratified must be a bool, got {self.stratified!r}", field="stratified"
            )
        if self.num_train > self.num_database:
            raise ConfigError(
                f"num_train ({self.num_train}) must not exceed num_database ({self.num_database})",
                field="num_train",
            )


def index_digest(indices: npt.ArrayLike) -> str:
    """Return the sha256 hex digest of an index array stored as little-endian ``int64``.

    Args:
        indices: 1-D integer indices.

    Returns:
        The digest of the array's bytes (platform independent).
    """
    arr = np.ascontiguousarray(np.asarray(indices), dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class Splits:
    """The index arrays of one split (read-only, sorted, ``int64``).

    Attributes:
        query: Positions in the TEST split.
        database: Positions in the TRAIN split.
        train: Positions in the TRAIN split; every one is also in ``database``.
        spec: The specification they were drawn from.
        train_set_len: Length of the TRAIN split they index.
        test_set_len: Length of the TEST split they index.
    """

    query: npt.NDArray[np.int64]
    database: npt.NDArray[np.int64]
    train: npt.NDArray[np.int64]
    spec: SplitSpec
    train_set_len: int
    test_set_len: int

    def to_record(self) -> dict[str, Any]:
        """Describe the split as a JSON-serialisable dict.

        Returns:
            ``protocol``, ``seed``, ``stratified``, the source lengths, the sizes of the three
            arrays and ``sha256`` digests of each (see :func:`index_digest`), so that a
            bundle can record exactly which items were used.
        """
        return {
            "protocol": SPLITS_PROTOCOL,
            "seed": self.spec.seed,
            "stratified": self.spec.stratified,
            "train_set_len": self.train_set_len,
            "test_set_len": self.test_set_len,
            "num_query": int(self.query.size),
            "num_database": int(self.database.size),
            "num_train": int(self.train.size),
            "sha256": {
                "query": index_digest(self.query),
                "database": index_digest(self.database),
                "train": index_digest(self.train),
            },
        }

    def matches_record(self, record: dict[str, Any]) -> bool:
        """Tell whether ``record`` (from :meth:`to_record`) describes these exact indices.

        Args:
            record: A dict previously produced by :meth:`to_record`.

        Returns:
            ``True`` when every key of the record has the same value here.
        """
        return self.to_record() == record


def _group_keys(labels: npt.ArrayLike, length: int, field: str) -> npt.NDArray[np.int64]:
    """Map each item to its first positive label column (``C`` for items without labels)."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.shape[0] != length:
        raise ConfigError(f"{field} must have shape ({length}, C), got {arr.shape}", field=field)
    positive = arr > 0
    keys = np.argmax(positive, axis=1).astype(np.int64)
    keys[~positive.any(axis=1)] = arr.shape[1]
    return keys


def _balanced_choice(
    rng: np.random.Generator, keys: npt.NDArray[np.int64], k: int
) -> npt.NDArray[np.int64]:
    """Choose ``k`` positions of ``keys`` spread as evenly as possible over the key groups."""
    groups, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    quota = np.zeros(groups.size, dtype=np.int64)
    remaining = k
    while remaining > 0:
        open_groups = np.flatnonzero(quota < counts)
        share = remaining // open_groups.size
        if share == 0:
            quota[rng.choice(open_groups, size=remaining, replace=False)] += 1
            break
        add = np.minimum(share, counts[open_groups] - quota[open_groups])
        quota[open_groups] += add
        remaining -= int(add.sum())
    chosen = [
        rng.choice(np.flatnonzero(inverse == g), size=int(q), replace=False)
        for g, q in enumerate(quota)
        if q > 0
    ]
    if not chosen:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(chosen).astype(np.int64)


def _choose(
    rng: np.random.Generator, length: int, k: int, keys: npt.NDArray[np.int64] | None
) -> npt.NDArray[np.int64]:
    """Choose ``k`` distinct positions out of ``length``, optionally class-balanced; sorted."""
    if keys is None:
        picked = rng.choice(length, size=k, replace=False)
    else:
        picked = _balanced_choice(rng, keys, k)
    out = np.sort(np.asarray(picked, dtype=np.int64))
    out.setflags(write=False)
    return out


def make_splits(
    train_set_len: int,
    test_set_len: int,
    spec: SplitSpec,
    *,
    train_labels: npt.ArrayLike | None = None,
    test_labels: npt.ArrayLike | None = None,
) -> Splits:
    """Draw query, database and training indices.

    Args:
        train_set_len: Number of items of the TRAIN split.
        test_set_len: Number of items of the TEST split.
        spec: Sizes, seed and whether to stratify.
        train_labels: ``(train_set_len, C)`` multi-hot labels; required when
            ``spec.stratified``, ignored otherwise.
        test_labels: ``(test_set_len, C)`` multi-hot labels; required when
            ``spec.stratified``, ignored otherwise.

    Returns:
        The :class:`Splits`; deterministic given the arguments.

    Raises:
        ConfigError: ``num_database > train_set_len``, ``num_query > test_set_len``,
            a length is negative, or labels are missing or mis-shaped for a stratified split;
            the error's ``field`` names the offending field.
    """
    train_len = non_negative_int(train_set_len, "train_set_len")
    test_len = non_negative_int(test_set_len, "test_set_len")
    if spec.num_database > train_len:
        raise ConfigError(
            f"num_database ({spec.num_database}) exceeds the train split size ({train_len})",
            field="num_database",
        )
    if spec.num_query > test_len:
        raise ConfigError(
            f"num_query ({spec.num_query}) exceeds the test split size ({test_len})",
            field="num_query",
        )

    train_keys: npt.NDArray[np.int64] | None = None
    test_keys: npt.NDArray[np.int64] | None = None
    if spec.stratified:
        if train_labels is None:
            raise ConfigError("a stratified split needs train_labels", field="train_labels")
        if test_labels is None:
            raise ConfigError("a stratified split needs test_labels", field="test_labels")
        train_keys = _group_keys(train_labels, train_len, "train_labels")
        test_keys = _group_keys(test_labels, test_len, "test_labels")

    query_rng, database_rng, train_rng = np.random.default_rng(spec.seed).spawn(3)
    query = _choose(query_rng, test_len, spec.num_query, test_keys)
    database = _choose(database_rng, train_len, spec.num_database, train_keys)
    db_keys = None if train_keys is None else train_keys[database]
    positions = _choose(train_rng, database.size, spec.num_train, db_keys)
    train = database[positions]
    train.setflags(write=False)
    return Splits(
        query=query,
        database=database,
        train=train,
        spec=spec,
        train_set_len=train_len,
        test_set_len=test_len,
    )
