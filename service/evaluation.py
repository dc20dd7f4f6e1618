"""Retrieval figures of a hasher under the recorded protocol.

Shared by ``hashaudit eval``, bundle building and audits, so every figure in the project
comes from one place: :func:`retrieval_figures` (the protocol's figures and curves) and
:func:`audit_figures` (the same plus mAP@K and t-MAP, every figure of an audit row).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.errors import BundleError
from service.retrieval.metrics import (
    map_at_k,
    pr_curve_by_radius,
    precision_at_n_curve,
    precision_within_radius,
    relevance,
    targeted_map,
)
from service.retrieval.ranking import hamming_distance_pm1

TOP_N = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


def protocol_record(top_ks: Sequence[int | None] = (None, 1000)) -> dict[str, Any]:
    """The evaluation protocol, written next to every figure."""
    return {
        "relevance": "query and database item share at least one label",
        "ranking": "Hamming distance, ties broken by database order (stable sort)",
        "map_top_k": ["all" if k is None else k for k in top_ks],
        "map_normalisation": "AP averages precision at each relevant item within the top K "
                             "(DeepHash CalcTopMap); a query with none in the top K scores 0",
        "p_r2": "precision of items within Hamming radius 2; a query retrieving none scores 0",
        "top_n": list(TOP_N),
    }


def retrieval_figures(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    db_codes: np.ndarray,
    db_labels: np.ndarray,
    curves: bool = True,
) -> dict[str, Any]:
    """mAP@all, mAP@1000, P@r<=2 and (optionally) top-N and PR curves.

    Args:
        query_codes: (Q, K) codes in {-1, +1}.
        query_labels: (Q, C) multi-hot.
        db_codes: (N, K) codes in {-1, +1}.
        db_labels: (N, C) multi-hot.
        curves: also return the precision@N curve and the PR curve over Hamming radius.
    """
    bits = int(query_codes.shape[1])
    out: dict[str, Any] = {
        "map_all": map_at_k(query_codes, db_codes, query_labels, db_labels, None),
        "map_1000": map_at_k(query_codes, db_codes, query_labels, db_labels, 1000),
    }
    dist = hamming_distance_pm1(query_codes, db_codes)
    rel = relevance(query_labels, db_labels)
    out["p_r2"] = float(precision_within_radius(dist, rel, 2))
    if curves:
        ns = [n for n in TOP_N if n <= dist.shape[1]]
        out["top_n"] = {"n": ns, "precision": precision_at_n_curve(dist, rel, ns).tolist()}
        pr = pr_curve_by_radius(dist, rel, bits)
        out["pr_curve"] = {k: v.tolist() for k, v in pr.items()}
    out["num_queries"] = int(query_codes.shape[0])
    out["num_database"] = int(db_codes.shape[0])
    out["bits"] = bits
    return out


def audit_figures(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    db_codes: np.ndarray,
    db_labels: np.ndarray,
    top_k: int | None,
    targets: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every retrieval figure of one audit row, in one call: those of
    :func:`retrieval_figures` (with curves), ``map_k`` (mAP@``top_k``; None = the whole
    gallery) and, given one target label per query, ``t_map`` (mAP@``top_k`` where relevance
    means sharing the target label).

    Args:
        query_codes, query_labels, db_codes, db_labels: as :func:`retrieval_figures`.
        top_k: the audit's mAP cut-off; None (mAP@all) and 1000 reuse those figures.
        targets: (Q, C) multi-hot target labels of a targeted attack, or None.
    """
    out = retrieval_figures(query_codes, query_labels, db_codes, db_labels)
    if top_k is None:
        out["map_k"] = out["map_all"]
    elif top_k == 1000:
        out["map_k"] = out["map_1000"]
    else:
        out["map_k"] = map_at_k(query_codes, db_codes, query_labels, db_labels, top_k)
    if targets is not None:
        out["t_map"] = targeted_map(query_codes, db_codes, targets, db_labels, top_k)
    return out


def evaluate_bundle(
    bundle: Any, device: str = "cpu", recode_database: bool = True
) -> dict[str, Any]:
    """Recompute a bundle's clean figures from its frozen files alone.

    Query codes come from the bundle's stored query images through its hasher; database codes
    are the frozen gallery codes. The database is re-encoded as well (read through the data
    source, or from a format-1 bundle's full-size thumbnails) and compared bit for bit with the
    stored codes.

    Returns:
        ``{"figures": ..., "recorded": ..., "gallery_codes_match": bool | None}``.
    """
    from service.data.sources import materialize
    from service.nets.hasher import encode_uint8
    from service.retrieval.codes import pack_bits

    m = bundle.manifest
    if len(bundle.queries) == 0:
        raise BundleError(f"{m.name}: no query split, so no figures to recompute (index it "
                          "with --query to give it one)", field="bundle")
    hasher = bundle.hasher.to(device)
    bits = m.bits
    q_codes = encode_uint8(hasher, bundle.queries.images)
    db_codes = bundle.gallery.codes(bits)
    figures = retrieval_figures(q_codes, bundle.queries.labels, db_codes, bundle.gallery.labels)
    match = None
    if recode_database and (bundle.reference is not None or bundle.gallery.thumbnails.shape[1:]
                            == bundle.transform.shape):
        database = materialize(bundle.database_set(), min(8, os.cpu_count() or 1))
        recoded = encode_uint8(hasher, database.images)
        match = bool(np.array_equal(pack_bits(recoded), bundle.gallery.codes_packed))
    return {"figures": figures, "recorded": m.evaluation.get("figures", {}),
            "gallery_codes_match": match}
