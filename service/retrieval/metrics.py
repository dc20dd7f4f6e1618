"""Retrieval metrics for hash codes: mAP, targeted mAP, precision curves, PR by radius.

Conventions shared by every function here:

* **Relevance.** Labels are multi-hot arrays ``(Q, C)`` / ``(N, C)`` (any numeric
  dtype; a nonzero entry means the label is present). Query ``i`` and database item
  ``j`` are relevant to each other when they share at least one label, i.e.
  ``(q_labels @ db_labels.T) > 0`` for 0/1 labels.
* **Ranking.** Database items are ranked by ascending distance with a *stable* sort:
  ties keep database order (see :func:`service.retrieval.ranking.rank`).
* **Averaging.** Per-query values are accumulated in float64 and averaged over all
  queries unless a function says otherwise. Functions that reduce to a single number
  raise ``ValueError`` when there are no queries.
* **Memory.** Work is chunked over queries (about ``chunk_cells`` query-item cells per
  chunk), so Q = 10,000 queries against N = 60,000 items is fine; the functions that
  take codes never build the full ``(Q, N)`` distance matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

from service.retrieval.codes import pack_bits, to_numpy
from service.retrieval.ranking import (
    DEFAULT_CHUNK_CELLS,
    hamming_distance,
    query_chunks,
    stable_topk_indices,
)

__all__ = [
    "average_precision_per_query",
    "map_at_k",
    "map_at_k_per_query",
    "mean_average_precision",
    "pr_curve_by_radius",
    "precision_at_n_curve",
    "precision_within_radius",
    "relevance",
    "targeted_map",
]

#: A numpy array or a torch tensor (converted with ``to_numpy``).
Array: TypeAlias = "np.ndarray | torch.Tensor"


# --------------------------------------------------------------------------- helpers


def _label_matrix(labels: Array, name: str) -> np.ndarray:
    arr = to_numpy(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (items, classes), got shape {arr.shape}")
    return (arr != 0).astype(np.float32)


def _relevance_rows(q_on: np.ndarray, db_on_t: np.ndarray) -> np.ndarray:
    # 0/1 float32 products: counts of shared labels are exact below 2**24 classes.
    return (q_on @ db_on_t) > 0


def _check_dist_rel(dist: Array, relevant: Array) -> tuple[np.ndarray, np.ndarray]:
    d = to_numpy(dist)
    r = to_numpy(relevant)
    if d.ndim != 2:
        raise ValueError(f"dist must be 2-D (queries, items), got shape {d.shape}")
    if r.shape != d.shape:
        raise ValueError(f"relevant has shape {r.shape}, dist has shape {d.shape}")
    return d, r.astype(bool, copy=False)


def _resolve_top_k(top_k: int | None, n: int) -> int:
    if top_k is None:
        return n
    if int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    return min(int(top_k), n)


def _mean_over_queries(values: np.ndarray) -> float:
    if values.size == 0:
        raise ValueError("no queries: the mean over zero queries is undefined")
    return float(np.mean(values, dtype=np.float64))


def _ap_rows(dist: np.ndarray, rel: np.ndarray, k: int) -> np.ndarray:
    """AP of each row of a chunk, over the first ``k`` stably ranked items."""
    if k == 0:
        return np.zeros(dist.shape[0], dtype=np.float64)
    order = stable_topk_indices(dist, k)
    hits = np.take_along_axis(rel, order, axis=1)
    # cum[i, r] = number of relevant items in ranks 1..r+1 (exact integer counts).
    cum = np.cumsum(hits, axis=1, dtype=np.int32 if k < 1 << 31 else np.int64)
    n_hits = cum[:, -1].astype(np.float64)
    cum *= hits  # keep the running count only at relevant ranks
    # Sum over relevant ranks r of count / r, as a float64 matrix-vector product.
    precision_sum = cum.astype(np.float64) @ (1.0 / np.arange(1, k + 1, dtype=np.float64))
    ap = np.zeros(dist.shape[0], dtype=np.float64)
    np.divide(precision_sum, n_hits, out=ap, where=n_hits > 0)
    return ap


def _prepare_codes(codes: Array, packed: bool, name: str) -> np.ndarray:
    arr = to_numpy(codes)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if packed:
        if arr.dtype != np.uint8:
            raise ValueError(f"{name}: packed codes must be uint8, got {arr.dtype}")
        return arr
    if arr.dtype == np.bool_ or not np.all(np.abs(arr) == 1):
        raise ValueError(
            f"{name} must contain only +1/-1 (binarise with sign_codes first), "
            "or pass packed uint8 codes with packed=True"
        )
    return pack_bits(arr)


# --------------------------------------------------------------------------- relevance


def relevance(q_labels: Array, db_labels: Array) -> np.ndarray:
    """Ground-truth relevance: do query and database item share a label?

    Args:
        q_labels: Multi-hot ``(Q, C)`` labels (nonzero = label present).
        db_labels: Multi-hot ``(N, C)`` labels.

    Returns:
        ``bool`` array ``(Q, N)``; ``True`` where at least one label is shared.

    Raises:
        ValueError: If the inputs are not 2-D or their class counts differ.
    """
    q_on = _label_matrix(q_labels, "q_labels")
    db_on = _label_matrix(db_labels, "db_labels")
    if q_on.shape[1] != db_on.shape[1]:
        raise ValueError(f"class counts differ: {q_on.shape[1]} vs {db_on.shape[1]}")
    return _relevance_rows(q_on, db_on.T)


# --------------------------------------------------------------------------- mAP


def average_precision_per_query(
    dist: Array,
    relevant: Array,
    top_k: int | None = None,
    *,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> np.ndarray:
    """Average precision of each query over its top-``top_k`` retrieved items.

    Definition (DeepHash-pytorch ``CalcTopMap``, but with a stable sort):

    1. rank the database by ``np.argsort(dist[i], kind="stable")`` and keep the first
       ``K`` items (``K = N`` when ``top_k`` is None; ``top_k > N`` is clipped to N);
    2. let ``rel`` be the 0/1 relevance of those items in rank order;
    3. if ``rel.sum() == 0`` the AP is 0; otherwise
       ``AP = mean over relevant ranks r (1-based) of (#relevant in ranks 1..r) / r``.

    Note the normalisation is by the number of relevant items *retrieved within the
    top K*, not by the total number of relevant items in the database. With
    ``top_k=None`` the two coincide.

    Args:
        dist: ``(Q, N)`` distances (any real dtype; Hamming distances are int).
        relevant: ``(Q, N)`` relevance, bool or 0/1.
        top_k: Cut-off K, a positive integer, or None for the whole database.
        chunk_cells: Query-item cells per chunk of queries.

    Returns:
        float64 array ``(Q,)`` of APs in ``[0, 1]``.

    Raises:
        ValueError: On shape mismatch or invalid ``top_k``.
    """
    d, r = _check_dist_rel(dist, relevant)
    k = _resolve_top_k(top_k, d.shape[1])
    out = np.empty(d.shape[0], dtype=np.float64)
    for sl in query_chunks(d.shape[0], d.shape[1], chunk_cells):
        out[sl] = _ap_rows(d[sl], r[sl], k)
    return out


def mean_average_precision(
    dist: Array,
    relevant: Array,
    top_k: int | None = None,
    *,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> float:
    """Mean over queries of :func:`average_precision_per_query` (mAP@top_k).

    Args:
        dist: ``(Q, N)`` distances.
        relevant: ``(Q, N)`` relevance, bool or 0/1.
        top_k: Cut-off K, or None for the whole database (top_k > N is clipped).
        chunk_cells: Query-item cells per chunk of queries.

    Returns:
        The mAP as a Python float. Queries with no relevant item in the top K count 0.

    Raises:
        ValueError: If there are no queries, on shape mismatch or invalid ``top_k``.
    """
    return _mean_over_queries(
        average_precision_per_query(dist, relevant, top_k, chunk_cells=chunk_cells)
    )


def map_at_k_per_query(
    query_codes: Array,
    db_codes: Array,
    q_labels: Array,
    db_labels: Array,
    top_k: int | None = None,
    *,
    packed: bool = False,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> np.ndarray:
    """Per-query AP computed straight from codes and labels (see :func:`map_at_k`).

    Returns:
        float64 array ``(Q,)``.
    """
    q = _prepare_codes(query_codes, packed, "query_codes")
    db = _prepare_codes(db_codes, packed, "db_codes")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"code widths differ: {q.shape[1]} vs {db.shape[1]}")
    q_on = _label_matrix(q_labels, "q_labels")
    db_on = _label_matrix(db_labels, "db_labels")
    if q_on.shape[0] != q.shape[0]:
        raise ValueError(f"{q_on.shape[0]} query label rows for {q.shape[0]} queries")
    if db_on.shape[0] != db.shape[0]:
        raise ValueError(f"{db_on.shape[0]} database label rows for {db.shape[0]} items")
    if q_on.shape[1] != db_on.shape[1]:
        raise ValueError(f"class counts differ: {q_on.shape[1]} vs {db_on.shape[1]}")
    k = _resolve_top_k(top_k, db.shape[0])
    db_on_t = np.ascontiguousarray(db_on.T)
    out = np.empty(q.shape[0], dtype=np.float64)
    for sl in query_chunks(q.shape[0], db.shape[0], chunk_cells):
        d = hamming_distance(q[sl], db, chunk_cells=chunk_cells)
        out[sl] = _ap_rows(d, _relevance_rows(q_on[sl], db_on_t), k)
    return out


def map_at_k(
    query_codes: Array,
    db_codes: Array,
    q_labels: Array,
    db_labels: Array,
    top_k: int | None = None,
    *,
    packed: bool = False,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> float:
    """mAP@top_k by Hamming ranking, computed from codes and labels in query chunks.

    Equivalent to ``mean_average_precision(hamming_distance_pm1(q, db),
    relevance(q_labels, db_labels), top_k)`` without materialising ``(Q, N)``.

    Args:
        query_codes: ``(Q, K)`` codes with entries exactly ±1 (float or int array or
            tensor; binarise relaxed outputs with ``sign_codes`` first), or, with
            ``packed=True``, ``uint8`` ``(Q, ceil(K/8))`` from ``pack_bits``.
        db_codes: ``(N, K)`` database codes in the same format.
        q_labels: Multi-hot ``(Q, C)`` query labels.
        db_labels: Multi-hot ``(N, C)`` database labels.
        top_k: Cut-off K, or None for the whole database (top_k > N is clipped).
        packed: Whether the codes are packed ``uint8``.
        chunk_cells: Query-item cells per chunk of queries.

    Returns:
        The mAP as a Python float.

    Raises:
        ValueError: On codes that are not ±1 (or not uint8 when ``packed``), mismatched
            shapes, invalid ``top_k`` or zero queries.
    """
    return _mean_over_queries(
        map_at_k_per_query(
            query_codes,
            db_codes,
            q_labels,
            db_labels,
            top_k,
            packed=packed,
            chunk_cells=chunk_cells,
        )
    )


def targeted_map(
    query_codes: Array,
    db_codes: Array,
    target_labels: Array,
    db_labels: Array,
    top_k: int | None = None,
    *,
    packed: bool = False,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> float:
    """Targeted mAP (t-MAP) of (adversarial) query codes with respect to target labels.

    Same as :func:`map_at_k`, but a database item counts as relevant when it shares a
    label with the query's *target* label vector rather than its true labels. A
    successful targeted attack drives this towards 1.

    Args:
        query_codes: ``(Q, K)`` ±1 codes (or packed uint8 with ``packed=True``).
        db_codes: ``(N, K)`` database codes in the same format.
        target_labels: Multi-hot ``(Q, C)`` target labels, one row per query.
        db_labels: Multi-hot ``(N, C)`` database labels.
        top_k: Cut-off K, or None for the whole database (top_k > N is clipped).
        packed: Whether the codes are packed ``uint8``.
        chunk_cells: Query-item cells per chunk of queries.

    Returns:
        The t-MAP as a Python float.
    """
    return map_at_k(
        query_codes,
        db_codes,
        target_labels,
        db_labels,
        top_k,
        packed=packed,
        chunk_cells=chunk_cells,
    )


# --------------------------------------------------------------------------- curves


def precision_at_n_curve(
    dist: Array,
    relevant: Array,
    ns: Sequence[int],
    *,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> np.ndarray:
    """Mean precision within the top-N stably ranked items, for each N in ``ns``.

    ``precision_i(N) = (#relevant among the first N items of query i) / N``, averaged
    over all queries.

    Args:
        dist: ``(Q, N_db)`` distances.
        relevant: ``(Q, N_db)`` relevance.
        ns: Cut-offs, each an integer in ``1..N_db`` (any order, repeats allowed).
        chunk_cells: Query-item cells per chunk of queries.

    Returns:
        float64 array ``(len(ns),)``.

    Raises:
        ValueError: If a cut-off is out of range, there are no queries, or on shape
            mismatch.
    """
    d, r = _check_dist_rel(dist, relevant)
    n_db = d.shape[1]
    cuts = np.asarray(list(ns))
    if cuts.size == 0:
        return np.zeros(0, dtype=np.float64)
    if cuts.dtype.kind not in "iu" or cuts.min() < 1 or cuts.max() > n_db:
        raise ValueError(f"each N must be an integer in 1..{n_db}, got {list(ns)}")
    if d.shape[0] == 0:
        raise ValueError("no queries: the mean over zero queries is undefined")
    k = int(cuts.max())
    totals = np.zeros(cuts.size, dtype=np.float64)
    for sl in query_chunks(d.shape[0], n_db, chunk_cells):
        order = stable_topk_indices(d[sl], k)
        hits = np.take_along_axis(r[sl], order, axis=1)
        cum = np.cumsum(hits, axis=1, dtype=np.float64)
        totals += cum[:, cuts - 1].sum(axis=0)
    return totals / (cuts.astype(np.float64) * d.shape[0])


def pr_curve_by_radius(
    dist: Array,
    relevant: Array,
    bits: int,
    *,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> dict[str, np.ndarray]:
    """Precision and recall of Hamming-ball retrieval for every radius 0..bits.

    For radius ``r`` query ``i`` retrieves the items with ``dist <= r``.

    * precision_i(r) = relevant retrieved / retrieved; a query that retrieves nothing
      has precision **0** (DeepHash convention). Averaged over **all** queries.
    * recall_i(r) = relevant retrieved / relevant in the database. Queries with **no
      relevant item are skipped** from the recall mean (recall is undefined for them);
      if no query has a relevant item the recall curve is all zeros.

    Args:
        dist: ``(Q, N)`` integer Hamming distances with values in ``0..bits``.
        relevant: ``(Q, N)`` relevance.
        bits: Code length K.
        chunk_cells: Query-item cells per chunk of queries.

    Returns:
        ``{"radius": int64 (bits+1,), "precision": float64 (bits+1,),
        "recall": float64 (bits+1,)}``.

    Raises:
        ValueError: If distances are not integers in ``0..bits``, there are no
            queries, or on shape mismatch.
    """
    d, r = _check_dist_rel(dist, relevant)
    if int(bits) != bits or bits < 1:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    bits = int(bits)
    n_q, n_db = d.shape
    if n_q == 0:
        raise ValueError("no queries: the mean over zero queries is undefined")
    if d.size and (d.min() < 0 or d.max() > bits or np.any(d != np.floor(d))):
        raise ValueError(f"dist must hold integer Hamming distances in 0..{bits}")
    width = bits + 1
    prec_sum = np.zeros(width, dtype=np.float64)
    rec_sum = np.zeros(width, dtype=np.float64)
    n_with_relevant = 0
    for sl in query_chunks(n_q, n_db, chunk_cells):
        rows = sl.stop - sl.start
        cell = d[sl].astype(np.int64) + (np.arange(rows, dtype=np.int64) * width)[:, None]
        size = rows * width
        found = np.bincount(cell.ravel(), minlength=size).reshape(rows, width)
        good = np.bincount(cell[r[sl]], minlength=size).reshape(rows, width)
        found = np.cumsum(found, axis=1, dtype=np.float64)
        good = np.cumsum(good, axis=1, dtype=np.float64)
        precision = np.zeros_like(good)
        np.divide(good, found, out=precision, where=found > 0)
        prec_sum += precision.sum(axis=0)
        total = good[:, -1]
        has = total > 0
        n_with_relevant += int(has.sum())
        rec_sum += (good[has] / total[has, None]).sum(axis=0)
    recall = rec_sum / n_with_relevant if n_with_relevant else np.zeros(width)
    return {
        "radius": np.arange(width, dtype=np.int64),
        "precision": prec_sum / n_q,
        "recall": recall,
    }


def precision_within_radius(
    dist: Array,
    relevant: Array,
    radius: int = 2,
    *,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
) -> float:
    """Mean precision of Hamming-ball retrieval within ``radius`` ("P@r<=2").

    Per query: relevant items with ``dist <= radius`` divided by all items with
    ``dist <= radius``; a query retrieving nothing counts as precision 0. Averaged
    over all queries.

    Args:
        dist: ``(Q, N)`` distances.
        relevant: ``(Q, N)`` relevance.
        radius: Hamming radius (inclusive).
        chunk_cells: Query-item cells per chunk of queries.

    Returns:
        The mean precision as a Python float.

    Raises:
        ValueError: If there are no queries or on shape mismatch.
    """
    d, r = _check_dist_rel(dist, relevant)
    out = np.zeros(d.shape[0], dtype=np.float64)
    for sl in query_chunks(d.shape[0], d.shape[1], chunk_cells):
        within = d[sl] <= radius
        found = within.sum(axis=1, dtype=np.float64)
        good = (within & r[sl]).sum(axis=1, dtype=np.float64)
        np.divide(good, found, out=out[sl], where=found > 0)
    return _mean_over_queries(out)
