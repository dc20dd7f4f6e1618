"""Audit specs: validation against a bundle (shared by the API and the CLI) and the chunk plan."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.attacks import ATTACKS
from service.errors import AttackInputError, BadInput, UnknownName
from service.inference import BundleService

MAX_EPS_VALUES = 16
DEFAULT_CHUNK = 250
EXAMPLES = 3


def normalize_spec(svc: BundleService, raw: dict[str, Any], *, max_queries: int,
                   upload: dict[str, Any] | None = None,
                   lookup: Any = None) -> dict[str, Any]:
    """Check a request against the bundle and return the full spec the tasks run.

    ``raw`` keys: methods (list), eps (value or list; '8/255' strings allowed), queries
    (``{"count", "seed"}`` or ``{"upload_id"}``), top_k (None = mAP@all), seed, chunk_size,
    batch_size. Errors name the offending field.
    """
    methods = raw.get("methods") or [svc.default_method]
    if isinstance(methods, str):
        methods = [methods]
    seen: list[str] = []
    for m in methods:
        try:
            name = svc.check_method(m)
        except UnknownName as exc:
            raise UnknownName(exc.message.replace("method:", "methods:", 1),
                              field="methods") from None
        if name not in seen:
            seen.append(name)
    eps_in = raw.get("eps", 8 / 255)
    eps_list = eps_in if isinstance(eps_in, list) else [eps_in]
    if not eps_list or len(eps_list) > MAX_EPS_VALUES:
        raise BadInput(f"eps: give 1 to {MAX_EPS_VALUES} values", field="eps")
    by_key = {round(v, 9): v for v in (svc.check_eps(e) for e in eps_list)}
    eps = [by_key[k] for k in sorted(by_key)]

    q = dict(raw.get("queries") or {})
    seed = int(raw.get("seed", 0))
    if upload is not None:
        total = int(upload["count"])
        count = total
        queries = {"source": "upload", "upload_id": upload["id"], "count": count,
                   "total": total}
    else:
        if q.get("upload_id"):
            raise BadInput("queries.upload_id: unknown upload", field="queries.upload_id")
        total = len(svc.bundle.queries)
        count = q.get("count")
        count = total if count is None else int(count)
        if count < 1 or count > total:
            raise BadInput(f"queries.count: between 1 and {total} (the bundle's query split)",
                           field="queries.count")
        q_seed = seed if q.get("seed") is None else int(q["seed"])
        queries = {"source": "bundle", "count": count, "seed": q_seed, "total": total}
    if count > max_queries:
        raise BadInput(f"queries: at most {max_queries} per audit (HASHAUDIT_MAX_AUDIT_QUERIES)",
                       field="queries")
    top_k = raw.get("top_k")
    if top_k is not None and (int(top_k) < 1):
        raise BadInput("top_k: a positive integer, or null for mAP over the whole gallery",
                       field="top_k")
    chunk = int(raw.get("chunk_size") or DEFAULT_CHUNK)
    if not 1 <= chunk <= 5000:
        raise BadInput("chunk_size: between 1 and 5000", field="chunk_size")
    batch = int(raw.get("batch_size") or min(chunk, 100))
    if not 1 <= batch <= 1024:
        raise BadInput("batch_size: between 1 and 1024", field="batch_size")
    for m in seen:
        if ATTACKS.get(m).targeted and len(svc.classes) < 2:
            raise AttackInputError(f"methods: {m} needs at least two classes", field="methods")
    transfer = []
    for name in raw.get("transfer_to") or []:
        if lookup is None:
            raise BadInput("transfer_to: not available here", field="transfer_to")
        try:
            other = lookup(name)
        except UnknownName as exc:
            raise UnknownName(exc.message, field="transfer_to") from None
        om, m0 = other.manifest, svc.bundle.manifest
        if om.class_names != m0.class_names or om.input != m0.input:
            raise BadInput(f"transfer_to: {name} has other classes or another input spec than "
                           f"{m0.name}", field="transfer_to")
        if name != m0.name and all(t["model"] != name for t in transfer):
            transfer.append({"model": name, "sha": other.sha})
    m = svc.bundle.manifest
    return {
        "model": m.name, "bundle_version": m.version, "bundle_sha": svc.bundle.sha,
        "methods": seen, "eps": eps, "queries": queries,
        "top_k": None if top_k is None else int(top_k), "seed": seed,
        "chunk_size": chunk, "batch_size": batch, "examples": EXAMPLES,
        "transfer_to": transfer,
    }


def n_query_chunks(spec: dict[str, Any]) -> int:
    return math.ceil(spec["queries"]["count"] / spec["chunk_size"])


def chunk_keys(spec: dict[str, Any]) -> list[str]:
    """``method|eps_index|chunk_index`` for every unit of work."""
    n = n_query_chunks(spec)
    return [f"{m}|{e}|{c}" for m in spec["methods"] for e in range(len(spec["eps"]))
            for c in range(n)]


def parse_chunk(key: str) -> tuple[str, int, int]:
    method, e, c = key.split("|")
    return method, int(e), int(c)


def query_positions(spec: dict[str, Any]) -> np.ndarray:
    """Positions of the audited queries in the bundle's query split (or the upload)."""
    q = spec["queries"]
    if q["count"] >= q["total"]:
        return np.arange(q["total"])
    rng = np.random.default_rng(q["seed"])
    return np.sort(rng.choice(q["total"], q["count"], replace=False))


def target_labels(labels: np.ndarray, seed: int) -> np.ndarray:
    """One target class per query, seeded, never one of the query's own labels."""
    rng = np.random.default_rng(seed + 7919)
    out = np.zeros_like(labels)
    for i, row in enumerate(labels):
        choices = np.flatnonzero(row == 0)
        if len(choices) == 0:
            choices = np.arange(labels.shape[1])
        out[i, rng.choice(choices)] = 1
    return out
