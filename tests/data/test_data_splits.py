"""Query / database / train protocol splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.data import SplitSpec, index_digest, make_splits
from service.errors import ConfigError


def one_hot(classes: np.ndarray, num_classes: int = 10) -> np.ndarray:
    out = np.zeros((classes.size, num_classes), dtype=np.uint8)
    out[np.arange(classes.size), classes] = 1
    return out


def test_sizes_subset_and_order() -> None:
    spec = SplitSpec(num_query=100, num_database=500, num_train=200, seed=3)
    s = make_splits(2000, 400, spec)
    assert s.query.dtype == np.int64 and s.database.dtype == np.int64 and s.train.dtype == np.int64
    assert (s.query.size, s.database.size, s.train.size) == (100, 500, 200)
    for arr, bound in ((s.query, 400), (s.database, 2000), (s.train, 2000)):
        assert np.all(np.diff(arr) > 0), "sorted and duplicate-free"
        assert arr.min() >= 0 and arr.max() < bound
    assert np.isin(s.train, s.database).all()
    assert not s.query.flags.writeable


def test_deterministic_and_seed_sensitive() -> None:
    spec = SplitSpec(50, 300, 100, seed=11)
    a, b = make_splits(1000, 200, spec), make_splits(1000, 200, spec)
    for name in ("query", "database", "train"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = make_splits(1000, 200, SplitSpec(50, 300, 100, seed=12))
    assert not np.array_equal(a.database, c.database)
    # Independent streams: changing the query size leaves the database draw unchanged.
    d = make_splits(1000, 200, SplitSpec(60, 300, 100, seed=11))
    np.testing.assert_array_equal(a.database, d.database)
    np.testing.assert_array_equal(a.train, d.train)


def test_full_database_and_empty_train() -> None:
    s = make_splits(30, 10, SplitSpec(10, 30, 0, seed=0))
    np.testing.assert_array_equal(s.database, np.arange(30))
    np.testing.assert_array_equal(s.query, np.arange(10))
    assert s.train.size == 0


def test_record() -> None:
    s = make_splits(1000, 200, SplitSpec(20, 100, 50, seed=5))
    rec = s.to_record()
    assert json.loads(json.dumps(rec)) == rec
    assert rec["seed"] == 5
    assert (rec["num_query"], rec["num_database"], rec["num_train"]) == (20, 100, 50)
    assert rec["train_set_len"] == 1000 and rec["test_set_len"] == 200
    assert rec["sha256"]["query"] == index_digest(s.query)
    assert len(rec["sha256"]["train"]) == 64
    assert len(set(rec["sha256"].values())) == 3
    assert s.matches_record(rec)
    other = make_splits(1000, 200, SplitSpec(20, 100, 50, seed=6))
    assert not other.matches_record(rec)
    assert index_digest(np.array([1, 2], dtype=np.int32)) == index_digest([1, 2])


def test_stratified_is_balanced() -> None:
    rng = np.random.default_rng(0)
    train_cls = rng.integers(0, 10, 3000)
    test_cls = rng.integers(0, 10, 800)
    spec = SplitSpec(100, 1000, 500, seed=1, stratified=True)
    s = make_splits(3000, 800, spec, train_labels=one_hot(train_cls), test_labels=one_hot(test_cls))
    assert np.bincount(test_cls[s.query], minlength=10).tolist() == [10] * 10
    assert np.bincount(train_cls[s.database], minlength=10).tolist() == [100] * 10
    assert np.bincount(train_cls[s.train], minlength=10).tolist() == [50] * 10
    assert np.isin(s.train, s.database).all()
    assert np.all(np.diff(s.database) > 0)
    again = make_splits(
        3000, 800, spec, train_labels=one_hot(train_cls), test_labels=one_hot(test_cls)
    )
    np.testing.assert_array_equal(s.train, again.train)
    assert s.to_record()["stratified"] is True


def test_stratified_small_class_gives_way() -> None:
    classes = np.array([0] * 3 + [1] * 50 + [2] * 50)
    labels = one_hot(classes, 3)
    s = make_splits(
        103,
        103,
        SplitSpec(31, 31, 31, seed=0, stratified=True),
        train_labels=labels,
        test_labels=labels,
    )
    counts = np.bincount(classes[s.database], minlength=3)
    assert counts[0] == 3 and counts.sum() == 31 and abs(int(counts[1]) - int(counts[2])) <= 1


def test_stratified_needs_labels() -> None:
    spec = SplitSpec(5, 5, 5, seed=0, stratified=True)
    with pytest.raises(ConfigError) as info:
        make_splits(10, 10, spec)
    assert info.value.field == "train_labels"
    with pytest.raises(ConfigError) as info:
        make_splits(10, 10, spec, train_labels=np.zeros((9, 2)), test_labels=np.zeros((10, 2)))
    assert info.value.field == "train_labels"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((10, 100, 5, 0), None),
        ((0, 100, 5, 0), "num_query"),
        ((10, 0, 0, 0), "num_database"),
        ((10, 100, -1, 0), "num_train"),
        ((10, 100, 101, 0), "num_train"),
        ((10, 100, 5, -3), "seed"),
        ((10.0, 100, 5, 0), "num_query"),
        ((True, 100, 5, 0), "num_query"),
    ],
)
def test_spec_validation(args: tuple, field: str | None) -> None:
    if field is None:
        SplitSpec(*args)
        return
    with pytest.raises(ConfigError) as info:
        SplitSpec(*args)
    assert info.value.field == field


def test_sizes_against_lengths() -> None:
    with pytest.raises(ConfigError) as info:
        make_splits(99, 1000, SplitSpec(10, 100, 5, seed=0))
    assert info.value.field == "num_database" and "99" in str(info.value)
    with pytest.raises(ConfigError) as info:
        make_splits(1000, 9, SplitSpec(10, 100, 5, seed=0))
    assert info.value.field == "num_query"
