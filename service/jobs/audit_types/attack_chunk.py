"""One chunk of an attack audit: attack a slice of queries with one method at one eps.

``compute_chunk`` is the attack audit's chunk function (named by
``AttackAudit.chunk_function``); it stores packed clean and adversarial codes, not averages,
because mAP needs every code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.attacks import ATTACKS
from service.attacks.runner import attack_batch
from service.errors import BadImage, BundleError, HashAuditError
from service.images import decode_upload, rmse_per_image
from service.jobs.audit_store import pack_arrays
from service.jobs.audit_types.attack import parse_chunk, reference_method
from service.jobs.audit_types.base import Cancelled, check_bundle
from service.jobs.context import JobContext
from service.nets.hasher import encode_uint8
from service.retrieval.codes import pack_bits


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


def load_queries(ctx: JobContext, spec: dict[str, Any], bundle: Any, positions: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """uint8 images, labels and names of the queries at ``positions``, and the labels of every
    query by position (an upload's meta is read once for all of them)."""
    q = spec["queries"]
    if q["source"] == "bundle":
        qs = bundle.queries
        names = [f"query {int(i)}" for i in qs.ids[positions]]
        return qs.images[positions], qs.labels[positions], names, qs.labels
    from service.jobs.uploads import upload_files

    meta, files = upload_files(ctx.audits, q["upload_id"], positions)
    images = []
    for pos, data in zip(positions.tolist(), files, strict=True):
        name = meta["names"][pos]
        try:
            px, _ = decode_upload(data, bundle.transform, ctx.max_pixels, field="queries")
        except HashAuditError as exc:
            raise BadImage(f"uploaded image {name!r}: {exc.message}", field="queries") from None
        images.append(px)
    every = np.asarray(meta["labels"], np.uint8)
    return np.stack(images), every[positions], [meta["names"][p] for p in positions.tolist()], every


def compute_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                  progress: Any = None) -> bytes:
    """Attack one chunk of queries with one method at one eps; checks for cancel between
    batches; ``progress`` (the CLI) counts images."""
    bundle = check_bundle(ctx, spec)
    name, ei, ci = parse_chunk(chunk)
    method, steps = reference_method(name)
    options = {} if steps is None else {"steps": steps}
    eps = spec["eps"][ei]
    cs = spec["chunk_size"]
    order = query_positions(spec)
    sel = slice(ci * cs, (ci + 1) * cs)
    positions = order[sel]
    images, labels, _, every = load_queries(ctx, spec, bundle, positions)
    # Targets are drawn over the whole audit (in its order) so that chunks agree on them.
    targeted = ATTACKS.get(method).targeted
    target = target_labels(every[order], spec["seed"])[sel] if targeted else None
    others = []
    for t in spec.get("transfer_to", []):
        other = ctx.models.get(t["model"])
        if other.sha != t["sha"]:
            raise BundleError(f"transfer target {t['model']} changed since the audit was "
                              "submitted", field="transfer_to")
        others.append(other)
    xfer: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in others]
    adv_codes, clean_codes, ham, linf, rmse, seconds = [], [], [], [], [], 0.0
    used: dict[str, int] = {}  # worst_case: queries each member won
    examples = []
    bs = spec["batch_size"]
    for b in range(0, len(images), bs):
        if ctx.audits.stopped(audit_id):
            raise Cancelled(audit_id)
        x = images[b:b + bs]
        res = attack_batch(bundle, method, eps, x, labels[b:b + bs],
                           None if target is None else target[b:b + bs], seed=spec["seed"],
                           **options)
        for u in res.extra.get("used", []):
            used[u["member"]] = used.get(u["member"], 0) + int(u["won"])
        adv_codes.append(res.adv_codes)
        clean_codes.append(res.clean_codes)
        ham.append(res.hamming)
        linf.append(res.linf)
        rmse.append(rmse_per_image(x, res.adversarial))
        seconds += res.seconds
        for (t_adv, t_clean), other in zip(xfer, others, strict=True):
            t_adv.append(encode_uint8(other.hasher, res.adversarial))
            t_clean.append(encode_uint8(other.hasher, x))
        if ci == 0 and b == 0:
            examples = res.adversarial[:spec["examples"]]
        if progress is not None:
            progress(len(x))
    arrays = {
        "positions": positions.astype(np.int64),
        "adv_codes": pack_bits(np.concatenate(adv_codes)),
        "clean_codes": pack_bits(np.concatenate(clean_codes)),
        "labels": labels.astype(np.uint8),
        "hamming": np.concatenate(ham).astype(np.int32),
        "linf": np.concatenate(linf).astype(np.float32),
        "rmse": np.concatenate(rmse).astype(np.float32),
    }
    if target is not None:
        arrays["target"] = target.astype(np.uint8)
    for i, (t_adv, t_clean) in enumerate(xfer):
        arrays[f"xfer{i}_adv"] = pack_bits(np.concatenate(t_adv))
        arrays[f"xfer{i}_clean"] = pack_bits(np.concatenate(t_clean))
    if ci == 0:
        arrays["example_adv"] = np.asarray(examples, np.uint8)
        arrays["example_clean"] = images[:spec["examples"]]
    return pack_arrays(arrays, {"seconds": seconds, "n": int(len(positions)), "chunk": chunk,
                                "method": name, "eps": eps,
                                "precision": bundle.hasher.precision,
                                **({"used": used} if used else {})})
