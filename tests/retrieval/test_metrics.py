"""Tests for service.retrieval.metrics against plain-Python reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.retrieval import (
    average_precision_per_query,
    hamming_distance_pm1,
    map_at_k,
    map_at_k_per_query,
    mean_average_precision,
    pack_bits,
    pr_curve_by_radius,
    precision_at_n_curve,
    precision_within_radius,
    relevance,
    sign_codes,
    targeted_map,
)

TOL = 1e-9


# ----------------------------------------------------------------------------- references


def ref_order(dist_row) -> list[int]:
    """Stable ranking: explicit sort of (distance, database index) pairs."""
    return [j for _, j in sorted((float(d), j) for j, d in enumerate(dist_row))]


def ref_relevance(q_labels, db_labels) -> list[list[bool]]:
    return [
        [any(a != 0 and b != 0 for a, b in zip(ql, dl, strict=True)) for dl in db_labels]
        for ql in q_labels
    ]


def ref_ap(dist_row, rel_row, top_k) -> float:
    order = ref_order(dist_row)
    if top_k is not None:
        order = order[:top_k]
    hits = 0
    total = 0.0
    for position, j in enumerate(order, start=1):
        if rel_row[j]:
            hits += 1
            total += hits / position
    return total / hits if hits else 0.0


def ref_map(dist, rel, top_k) -> float:
    aps = [ref_ap(dist[i], rel[i], top_k) for i in range(len(dist))]
    return sum(aps) / len(aps)


def ref_hamming(q, db) -> list[list[int]]:
    return [[sum(1 for a, b in zip(x, y, strict=True) if a != b) for y in db] for x in q]


def ref_precision_at_n(dist, rel, ns) -> list[float]:
    out = []
    for n in ns:
        per_query = []
        for i in range(len(dist)):
            top = ref_order(dist[i])[:n]
            per_query.append(sum(1 for j in top if rel[i][j]) / n)
        out.append(sum(per_query) / len(per_query))
    return out


def ref_pr_curve(dist, rel, bits) -> tuple[list[float], list[float]]:
    precisions, recalls = [], []
    for radius in range(bits + 1):
        p_vals, r_vals = [], []
        for i in range(len(dist)):
            found = [j for j in range(len(dist[i])) if dist[i][j] <= radius]
            good = sum(1 for j in found if rel[i][j])
            p_vals.append(good / len(found) if found else 0.0)
            total_rel = sum(1 for j in range(len(dist[i])) if rel[i][j])
            if total_rel:
                r_vals.append(good / total_rel)
        precisions.append(sum(p_vals) / len(p_vals))
        recalls.append(sum(r_vals) / len(r_vals) if r_vals else 0.0)
    return precisions, recalls


def ref_p_within(dist, rel, radius) -> float:
    vals = []
    for i in range(len(dist)):
        found = [j for j in range(len(dist[i])) if dist[i][j] <= radius]
        good = sum(1 for j in found if rel[i][j])
        vals.append(good / len(found) if found else 0.0)
    return sum(vals) / len(vals)


# ----------------------------------------------------------------------------- fixtures


def random_pm1(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=(n, k))


def random_multi_hot(rng: np.random.Generator, n: int, c: int, p: float) -> np.ndarray:
    return (rng.random((n, c)) < p).astype(np.int64)


def make_case(seed: int, bits: int, n_q: int = 15, n_db: int = 60, ties: bool = False):
    """Random codes and multi-hot labels; some queries have no relevant item."""
    rng = np.random.default_rng(seed)
    q = random_pm1(rng, n_q, bits)
    db = random_pm1(rng, n_db, bits)
    if ties:
        db[: n_db // 2] = db[0]  # half the database is one code
        q[: n_q // 3] = db[0]
    q_labels = random_multi_hot(rng, n_q, 8, 0.25)
    db_labels = random_multi_hot(rng, n_db, 8, 0.25)
    q_labels[0] = 0  # no label at all: nothing relevant
    q_labels[1] = 0
    q_labels[1, 7] = 1
    db_labels[:, 7] = 0  # label 7 never occurs in the database
    return q, db, q_labels, db_labels


CASES = [
    (0, 8, False),
    (1, 16, False),
    (2, 32, False),
    (3, 64, False),
    (4, 13, False),
    (5, 4, False),
    (6, 4, True),
    (7, 16, True),
]
TOP_KS = [None, 1, 3, 10, 59, 60, 61, 1000]


# ----------------------------------------------------------------------------- hand examples


def test_ap_hand_example() -> None:
    # Ranking by distance: items 1 (d=0, irrelevant), 0 (d=1, rel), 3 (d=2, rel), 2 (d=3).
    dist = np.array([[1, 0, 3, 2]])
    rel = np.array([[1, 0, 0, 1]])
    assert mean_average_precision(dist, rel) == pytest.approx((1 / 2 + 2 / 3) / 2, abs=TOL)
    # Top 2: one relevant retrieved, at rank 2 -> normalised by 1 retrieved relevant.
    assert mean_average_precision(dist, rel, top_k=2) == pytest.approx(0.5, abs=TOL)
    assert mean_average_precision(dist, rel, top_k=1) == 0.0
    assert mean_average_precision(dist, rel, top_k=4) == mean_average_precision(dist, rel)


def test_ap_ties_are_broken_by_database_order() -> None:
    dist = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    rel = np.array([[0, 0, 1, 1], [1, 1, 0, 0]])
    ap = average_precision_per_query(dist, rel)
    np.testing.assert_allclose(ap, [(1 / 3 + 2 / 4) / 2, 1.0], atol=TOL)
    assert mean_average_precision(dist, rel) == pytest.approx((5 / 12 + 1) / 2, abs=TOL)


def test_ap_zero_relevant_is_zero() -> None:
    dist = np.array([[0, 1, 2], [0, 1, 2]])
    rel = np.array([[0, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(average_precision_per_query(dist, rel), [0.0, 1 / 3])


def test_map_at_k_hand_example_from_codes() -> None:
    query = np.array([[1, 1, 1, 1]])
    db = np.array(
        [
            [1, 1, 1, -1],  # d=1, relevant
            [1, 1, 1, 1],  # d=0, irrelevant
            [-1, -1, -1, 1],  # d=3, irrelevant
            [1, 1, -1, -1],  # d=2, relevant
        ]
    )
    q_labels = np.array([[1, 0, 1]])
    db_labels = np.array([[0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    assert map_at_k(query, db, q_labels, db_labels) == pytest.approx(7 / 12, abs=TOL)
    assert map_at_k(query, db, q_labels, db_labels, top_k=2) == pytest.approx(0.5, abs=TOL)
    # Target label 1: relevant items are 1 (rank 1) and 3 (rank 3).
    target = np.array([[0, 1, 0]])
    expected = (1 / 1 + 2 / 3) / 2
    assert targeted_map(query, db, target, db_labels) == pytest.approx(expected, abs=TOL)


def test_curves_hand_example() -> None:
    dist = np.array([[1, 0, 3, 2]])
    rel = np.array([[1, 0, 0, 1]])
    np.testing.assert_allclose(
        precision_at_n_curve(dist, rel, [1, 2, 3, 4]), [0, 1 / 2, 2 / 3, 2 / 4], atol=TOL
    )
    curve = pr_curve_by_radius(dist, rel, bits=3)
    assert curve["radius"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(curve["precision"], [0, 1 / 2, 2 / 3, 1 / 2], atol=TOL)
    np.testing.assert_allclose(curve["recall"], [0, 1 / 2, 1, 1], atol=TOL)
    assert precision_within_radius(dist, rel) == pytest.approx(2 / 3, abs=TOL)
    assert precision_within_radius(dist, rel, radius=0) == 0.0


def test_empty_retrieval_counts_zero_and_recall_skips_no_relevant() -> None:
    dist = np.array([[3, 3, 4], [0, 4, 4], [0, 0, 0]])
    rel = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    # Radius 2: query 0 retrieves nothing (0), query 1 gets 1/1, query 2 gets 0/3.
    assert precision_within_radius(dist, rel, radius=2) == pytest.approx(1 / 3, abs=TOL)
    curve = pr_curve_by_radius(dist, rel, bits=4)
    # Recall averages over queries 0 and 1 only; query 2 has no relevant item.
    np.testing.assert_allclose(curve["recall"], [1 / 4, 1 / 4, 1 / 4, 3 / 4, 1], atol=TOL)
    np.testing.assert_allclose(curve["precision"], [1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 3], atol=TOL)


def test_recall_all_zero_when_nothing_is_relevant() -> None:
    curve = pr_curve_by_radius(np.array([[0, 1]]), np.array([[0, 0]]), bits=2)
    np.testing.assert_array_equal(curve["recall"], [0, 0, 0])


# ----------------------------------------------------------------------------- vs brute force


def test_relevance_matches_reference() -> None:
    rng = np.random.default_rng(11)
    q_labels = random_multi_hot(rng, 20, 6, 0.3).astype(np.float32)
    db_labels = random_multi_hot(rng, 30, 6, 0.3).astype(np.uint8)
    rel = relevance(q_labels, db_labels)
    assert rel.dtype == np.bool_
    assert rel.tolist() == ref_relevance(q_labels, db_labels)
    np.testing.assert_array_equal(rel, (q_labels @ db_labels.T.astype(np.float32)) > 0)
    np.testing.assert_array_equal(relevance(torch.from_numpy(q_labels), db_labels), rel)


@pytest.mark.parametrize(("seed", "bits", "ties"), CASES)
def test_map_matches_reference(seed: int, bits: int, ties: bool) -> None:
    q, db, q_labels, db_labels = make_case(seed, bits, ties=ties)
    dist = ref_hamming(q, db)
    rel = ref_relevance(q_labels, db_labels)
    dist_np = hamming_distance_pm1(q, db)
    np.testing.assert_array_equal(dist_np, dist)
    rel_np = relevance(q_labels, db_labels)
    for top_k in TOP_KS:
        expected = [ref_ap(dist[i], rel[i], top_k) for i in range(len(q))]
        got = average_precision_per_query(dist_np, rel_np, top_k, chunk_cells=130)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
        assert got[0] == 0.0 and got[1] == 0.0  # queries without relevant items
        want = sum(expected) / len(expected)
        assert mean_average_precision(dist_np, rel_np, top_k) == pytest.approx(want, abs=TOL)
        per_query = map_at_k_per_query(q, db, q_labels, db_labels, top_k, chunk_cells=61)
        np.testing.assert_allclose(per_query, expected, rtol=0, atol=TOL)
        assert map_at_k(q, db, q_labels, db_labels, top_k) == pytest.approx(want, abs=TOL)
        packed = map_at_k(pack_bits(q), pack_bits(db), q_labels, db_labels, top_k, packed=True)
        assert packed == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize(("seed", "bits", "ties"), CASES[::2])
def test_targeted_map_matches_reference(seed: int, bits: int, ties: bool) -> None:
    q, db, _, db_labels = make_case(seed, bits, ties=ties)
    rng = np.random.default_rng(seed + 1000)
    targets = np.zeros((len(q), db_labels.shape[1]), dtype=np.int64)
    targets[np.arange(len(q)), rng.integers(0, db_labels.shape[1], len(q))] = 1
    dist = ref_hamming(q, db)
    rel = ref_relevance(targets, db_labels)
    for top_k in (None, 5, 100):
        want = ref_map(dist, rel, top_k)
        got = targeted_map(q, db, targets, db_labels, top_k)
        assert got == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize(("seed", "bits", "ties"), CASES)
def test_curves_match_reference(seed: int, bits: int, ties: bool) -> None:
    q, db, q_labels, db_labels = make_case(seed, bits, ties=ties)
    dist = ref_hamming(q, db)
    rel = ref_relevance(q_labels, db_labels)
    dist_np = np.array(dist, dtype=np.int32)
    rel_np = np.array(rel)
    ns = [1, 2, 7, 30, 59, 60, 3]
    np.testing.assert_allclose(
        precision_at_n_curve(dist_np, rel_np, ns, chunk_cells=100),
        ref_precision_at_n(dist, rel, ns),
        rtol=0,
        atol=TOL,
    )
    precision, recall = ref_pr_curve(dist, rel, bits)
    curve = pr_curve_by_radius(dist_np, rel_np, bits, chunk_cells=100)
    assert curve["radius"].tolist() == list(range(bits + 1))
    np.testing.assert_allclose(curve["precision"], precision, rtol=0, atol=TOL)
    np.testing.assert_allclose(curve["recall"], recall, rtol=0, atol=TOL)
    for radius in (0, 1, 2, bits // 2, bits):
        assert precision_within_radius(dist_np, rel_np, radius, chunk_cells=100) == pytest.approx(
            ref_p_within(dist, rel, radius), abs=TOL
        )


def test_all_equal_codes_everything_tied() -> None:
    q = np.ones((4, 8))
    db = np.ones((25, 8))
    rng = np.random.default_rng(5)
    q_labels = random_multi_hot(rng, 4, 3, 0.5)
    db_labels = random_multi_hot(rng, 25, 3, 0.5)
    dist = ref_hamming(q, db)
    rel = ref_relevance(q_labels, db_labels)
    for top_k in (None, 1, 4, 25, 30):
        want = ref_map(dist, rel, top_k)
        assert map_at_k(q, db, q_labels, db_labels, top_k) == pytest.approx(want, abs=TOL)


def test_float_distances_are_ranked_stably() -> None:
    rng = np.random.default_rng(9)
    dist = rng.integers(0, 4, size=(10, 40)) / 3.0
    rel = rng.random((10, 40)) < 0.3
    for top_k in (None, 5, 40):
        want = [ref_ap(dist[i], rel[i], top_k) for i in range(10)]
        got = average_precision_per_query(dist, rel, top_k)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_torch_codes_and_sign_codes_pipeline() -> None:
    rng = np.random.default_rng(4)
    relaxed_q = torch.from_numpy(rng.normal(size=(6, 16)))
    relaxed_db = torch.from_numpy(rng.normal(size=(20, 16)))
    q_labels = random_multi_hot(rng, 6, 4, 0.4)
    db_labels = random_multi_hot(rng, 20, 4, 0.4)
    q, db = sign_codes(relaxed_q), sign_codes(relaxed_db)
    dist = ref_hamming(q.numpy(), db.numpy())
    want = ref_map(dist, ref_relevance(q_labels, db_labels), None)
    assert map_at_k(q, db, q_labels, db_labels) == pytest.approx(want, abs=TOL)


# ----------------------------------------------------------------------------- validation


def test_map_at_k_rejects_non_pm1_codes() -> None:
    labels = np.ones((2, 1))
    with pytest.raises(ValueError, match="sign_codes"):
        map_at_k(np.array([[0.3, -0.2]]), np.ones((2, 2)), labels[:1], labels)
    with pytest.raises(ValueError):
        map_at_k(np.array([[0, 1]]), np.ones((2, 2)), labels[:1], labels)
    with pytest.raises(ValueError):
        map_at_k(np.ones((1, 2)), np.ones((2, 2)), labels[:1], labels, packed=True)


def test_invalid_arguments() -> None:
    dist = np.zeros((2, 3), dtype=np.int32)
    rel = np.zeros((2, 3), dtype=bool)
    with pytest.raises(ValueError):
        mean_average_precision(dist, rel, top_k=0)
    with pytest.raises(ValueError):
        mean_average_precision(dist, rel[:, :2])
    with pytest.raises(ValueError):
        mean_average_precision(dist[:0], rel[:0])
    with pytest.raises(ValueError):
        precision_at_n_curve(dist, rel, [4])
    with pytest.raises(ValueError):
        pr_curve_by_radius(dist + 5, rel, bits=4)
    with pytest.raises(ValueError):
        relevance(np.ones((2, 3)), np.ones((2, 4)))
