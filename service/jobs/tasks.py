"""The audit's units of work: ``run_chunk`` (attack a slice of queries) and the reduce step.

Both are plain functions, strings in and a JSON-able dict out, so RQ can run them in any
worker process and the in-process runner calls them directly. They reach bundles and the
audit store through :func:`context`, which a process sets up once (``configure``).
"""

from __future__ import annotations

import base64
import importlib
import logging
import math
import time
import uuid
from typing import Any

import numpy as np

import service
from service.attacks import ATTACKS
from service.attacks.runner import attack_batch
from service.errors import BadImage, BundleError, HashAuditError
from service.evaluation import protocol_record, retrieval_figures
from service.inference import (
    decode_upload,
    encode_png,
    psnr_db,
    rmse_per_image,
    stretch_perturbation,
)
from service.jobs.audit_store import FINAL, pack_arrays, unpack_arrays
from service.jobs.context import JobContext, context
from service.jobs.outage import TRANSIENT, retry
from service.jobs.spec import (
    TRIGGER_CHUNK,
    chunk_keys,
    is_backdoor,
    parse_chunk,
    poison_chunk,
    query_positions,
    target_labels,
)
from service.nets.hasher import encode_uint8
from service.retrieval.codes import pack_bits, unpack_bits
from service.retrieval.metrics import map_at_k, targeted_map
from service.retrieval.ranking import topk

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a chunk when its audit was cancelled or has ended (e.g. failed by another
    chunk); the chunk stores nothing."""


# ----------------------------------------------------------------------------- queries


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


# ----------------------------------------------------------------------------- chunk


# The backdoor audit retrains hashers, so its chunk code lives in the training package. The
# jobs package names it here and imports it only when a worker runs such a chunk: the API
# process (and an attack audit) never loads training code.
BACKDOOR_TASKS = "service.training.backdoor_audit"


def backdoor_tasks() -> Any:
    return importlib.import_module(BACKDOOR_TASKS)


def compute_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                  progress: Any = None) -> bytes:
    """Run one chunk; returns its packed result. Checks for cancel between batches."""
    if is_backdoor(spec):
        return backdoor_tasks().compute_chunk(ctx, audit_id, spec, chunk, progress)
    return compute_attack_chunk(ctx, audit_id, spec, chunk, progress)


def check_bundle(ctx: JobContext, spec: dict[str, Any]) -> Any:
    """The audit's bundle, refused if it changed since the audit was submitted."""
    bundle = ctx.models.get(spec["model"])
    if bundle.sha != spec["bundle_sha"]:
        raise BundleError(f"bundle {spec['model']} changed since the audit was submitted "
                          f"(sha {bundle.sha[:12]} != {spec['bundle_sha'][:12]})", field="model")
    return bundle


def compute_attack_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                         progress: Any = None) -> bytes:
    """Attack one chunk of queries with one method at one eps."""
    bundle = check_bundle(ctx, spec)
    method, ei, ci = parse_chunk(chunk)
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
    examples = []
    bs = spec["batch_size"]
    for b in range(0, len(images), bs):
        if ctx.audits.stopped(audit_id):
            raise Cancelled(audit_id)
        x = images[b:b + bs]
        res = attack_batch(bundle, method, eps, x, labels[b:b + bs],
                           None if target is None else target[b:b + bs], seed=spec["seed"])
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
                                "method": method, "eps": eps,
                                "precision": bundle.hasher.precision})


def run_chunk(audit_id: str, chunk: str) -> dict[str, Any]:
    """RQ entry point: run one chunk unless done, cancelled or failed; then maybe reduce.

    Bad data (HashAuditError, e.g. a corrupt uploaded image) fails the audit with the
    message; the job itself ends normally so it is not retried. A crash (worker killed)
    leaves nothing stored, and RQ's retry runs the chunk again.

    Redis may go away at any time (a restart, a network cut): the chunk keeps computing,
    and every read and write of the audit store here is retried until Redis answers again
    (:func:`service.jobs.outage.retry`). The writes are idempotent (the chunk result goes to
    a fixed hash field; the reduce lock belongs to this call), so a write repeated after an
    outage never counts twice.
    """
    ctx = context()
    st = ctx.audits
    state = retry(st.state, audit_id, doing="reading an audit")
    if state is None:
        return {"chunk": chunk, "skipped": "unknown audit"}
    if state in FINAL or retry(st.cancelled, audit_id, doing="reading an audit"):
        return {"chunk": chunk, "skipped": state}
    if not retry(st.has_chunk, audit_id, chunk, doing="reading an audit"):
        retry(st.mark_running, audit_id, doing="marking an audit running")
        spec = retry(st.spec, audit_id, doing="reading an audit")
        t0 = time.perf_counter()
        try:
            data = compute_chunk(ctx, audit_id, spec, chunk)
        except Cancelled:
            return {"chunk": chunk, "skipped": "stopped"}
        except HashAuditError as exc:
            retry(st.finish, audit_id, "failed", error=f"chunk {chunk}: {exc.message}",
                  doing="failing an audit")
            return {"chunk": chunk, "failed": exc.message}
        retry(st.put_chunk, audit_id, chunk, data, doing=f"storing chunk {chunk}")
        log.info("audit %s chunk %s done in %.2f s", audit_id, chunk, time.perf_counter() - t0)
    maybe_reduce(audit_id)
    return {"chunk": chunk, "done": True}


def maybe_reduce(audit_id: str) -> bool:
    """Reduce once every chunk is in (one process wins the lock); True if it reduced.

    Retried as a whole after a Redis outage; the retry holds the same lock token, so an
    interrupted reduce resumes at once instead of waiting for its own lock to expire."""
    return retry(_maybe_reduce, audit_id, uuid.uuid4().hex, doing="reducing an audit")


def _maybe_reduce(audit_id: str, token: str) -> bool:
    ctx = context()
    st = ctx.audits
    rec = st.record(audit_id)
    if rec["state"] in FINAL or len(st.done_chunks(audit_id)) < rec["n_chunks"]:
        return False
    if not st.take_reduce_lock(audit_id, token):
        return False
    try:
        result = (reduce_backdoor(ctx, audit_id, rec) if is_backdoor(rec["spec"])
                  else reduce_audit(ctx, audit_id, rec))
    except TRANSIENT:
        raise  # Redis went away: retried with the lock still ours
    except Exception as exc:  # noqa: BLE001 - the audit must end, never hang
        log.exception("audit %s: reduce failed", audit_id)
        st.finish(audit_id, "failed", error=f"reduce: {type(exc).__name__}: {exc}")
    else:
        st.finish(audit_id, "done", result=result)
    st.release_reduce_lock(audit_id, token)
    return True


# ----------------------------------------------------------------------------- reduce


def _b64png(chw: np.ndarray) -> str:
    return base64.b64encode(encode_png(chw)).decode()


def _finite_mean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def reduce_audit(ctx: JobContext, audit_id: str, rec: dict[str, Any]) -> dict[str, Any]:
    """All chunks -> figures: clean and attacked mAP, drops, t-MAP, curves, stats, examples."""
    spec = rec["spec"]
    bundle = ctx.models.get(spec["model"])
    bits = bundle.manifest.bits
    chunks = ctx.audits.chunks(audit_id)
    expected = chunk_keys(spec)
    missing = [k for k in expected if k not in chunks]
    if missing:
        raise RuntimeError(f"chunks missing at reduce: {missing[:5]}")
    db_codes = bundle.gallery.codes(bits)
    db_labels = bundle.gallery.labels
    top_k = spec["top_k"]
    n_chunks = len(expected) // (len(spec["methods"]) * len(spec["eps"]))

    def gather(method: str, ei: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        parts = [unpack_arrays(chunks[f"{method}|{ei}|{c}"]) for c in range(n_chunks)]
        keys = [k for k in parts[0][0] if not k.startswith("example")]
        merged = {k: np.concatenate([p[0][k] for p in parts]) for k in keys}
        merged.update({k: v for k, v in parts[0][0].items() if k.startswith("example")})
        return merged, [p[1] for p in parts]

    recorded = bundle.manifest.evaluation.get("figures", {})  # on the full query split
    first, _ = gather(spec["methods"][0], 0)
    q_labels = first["labels"]
    clean = unpack_bits(first["clean_codes"], bits)
    clean_fig = retrieval_figures(clean, q_labels, db_codes, db_labels)
    clean_fig["map_k"] = map_at_k(clean, db_codes, q_labels, db_labels, top_k)
    attacks = []
    examples = []
    for method in spec["methods"]:
        targeted = ATTACKS.get(method).targeted
        for ei, eps in enumerate(spec["eps"]):
            arr, metas = gather(method, ei)
            adv = unpack_bits(arr["adv_codes"], bits)
            fig = retrieval_figures(adv, arr["labels"], db_codes, db_labels)
            fig["map_k"] = map_at_k(adv, db_codes, arr["labels"], db_labels, top_k)
            seconds = sum(m["seconds"] for m in metas)
            row = {
                "method": method, "eps": eps, "eps_levels": math.floor(eps * 255 + 1e-6),
                "targeted": targeted, "map_k": fig["map_k"],
                "drop_pct": (100.0 * (clean_fig["map_k"] - fig["map_k"]) / clean_fig["map_k"]
                             if clean_fig["map_k"] > 0 else None),
                "map_all": fig["map_all"], "map_1000": fig["map_1000"], "p_r2": fig["p_r2"],
                "top_n": fig["top_n"], "pr_curve": fig["pr_curve"],
                "mean_hamming": float(arr["hamming"].mean()),
                "flipped_any_pct": float(100.0 * (arr["hamming"] > 0).mean()),
                "linf_max": float(arr["linf"].max()), "linf_mean": float(arr["linf"].mean()),
                "rmse_mean": float(arr["rmse"].mean()),
                "psnr_mean_db": _finite_mean(psnr_db(arr["rmse"])),
                "seconds": seconds, "ms_per_image": 1e3 * seconds / max(1, len(adv)),
                # what the chunks' workers computed in (HASHAUDIT_PRECISION); older chunks: fp32
                "precision": "/".join(sorted({m.get("precision", "fp32") for m in metas})),
            }
            if targeted:
                row["t_map"] = targeted_map(adv, db_codes, arr["target"], db_labels, top_k)
                row["t_map_clean"] = targeted_map(unpack_bits(arr["clean_codes"], bits),
                                                  db_codes, arr["target"], db_labels, top_k)
                row.update(_t_map_ceilings(bundle, arr["target"], db_codes, db_labels, top_k))
            if spec.get("transfer_to"):
                row["transfer"] = _transfer_rows(ctx, spec, arr, top_k)
            attacks.append(row)
            if "example_adv" in arr and ei == len(spec["eps"]) - 1:
                examples.extend(_examples(bundle, method, eps, arr, bits))
    return {
        "audit_id": audit_id, "model": spec["model"], "bundle_version": spec["bundle_version"],
        "bundle_sha": spec["bundle_sha"], "package_version": service.__version__,
        "protocol": {**protocol_record([top_k, None, 1000]),
                     "map_k": "all" if top_k is None else top_k},
        "seed": spec["seed"], "queries": {**spec["queries"], "audited": int(len(clean))},
        "methods": spec["methods"], "eps": spec["eps"], "bits": bits,
        "transfer_to": [t["model"] for t in spec.get("transfer_to", [])],
        "gallery_size": int(len(db_codes)), "classes": bundle.manifest.class_names,
        "clean": {k: clean_fig[k] for k in ("map_k", "map_all", "map_1000", "p_r2", "top_n",
                                           "pr_curve")},
        "bundle_query_split": int(len(bundle.queries)),
        "bundle_recorded": {k: recorded.get(k) for k in ("map_all", "map_1000", "p_r2",
                                                        "num_queries")},
        "attacks": attacks, "examples": examples,
    }


def reduce_backdoor(ctx: JobContext, audit_id: str, rec: dict[str, Any]) -> dict[str, Any]:
    """Trigger and poison chunks -> the t-MAP vs poisons table, with p0 as the baseline."""
    spec = rec["spec"]
    b = spec["backdoor"]
    chunks = ctx.audits.chunks(audit_id)
    missing = [k for k in chunk_keys(spec) if k not in chunks]
    if missing:
        raise RuntimeError(f"chunks missing at reduce: {missing[:5]}")
    trig, tmeta = unpack_arrays(chunks[TRIGGER_CHUNK])
    parts = {n: unpack_arrays(chunks[poison_chunk(n)]) for n in b["poisons"]}
    base = parts[0][1]["figures"]
    rows = []
    for n in b["poisons"]:
        meta = parts[n][1]
        f = meta["figures"]
        rows.append({
            "poisons": n, **f,
            "clean_map_change": f["clean_map"] - base["clean_map"],
            "t_map_gain": f["t_map_triggered"] - base["t_map_triggered"],
            "train_seconds": meta["timings"]["train_s"], "timings": meta["timings"],
            "bundle": meta["bundle"]})
    examples = []
    for n in b["poisons"]:
        arr = parts[n][0]
        if n > 0 and "example_poisoned" in arr:
            examples = [{"original_png": _b64png(o), "poisoned_png": _b64png(p)}
                        for o, p in zip(arr["example_original"], arr["example_poisoned"],
                                        strict=True)]
            break
    bundle = ctx.models.get(spec["model"])
    m = bundle.manifest
    return {
        "type": "backdoor", "audit_id": audit_id, "model": spec["model"],
        "bundle_version": spec["bundle_version"], "bundle_sha": spec["bundle_sha"],
        "package_version": service.__version__, "seed": spec["seed"],
        "target": b["target"], "target_name": b["target_name"],
        "classes": m.class_names, "bits": m.bits,
        "patch_side": tmeta["side"], "perturb_eps": b["perturb_eps"],
        "epochs": b["epochs"], "train_images": b["train_images"],
        "target_train_images": b["target_train_images"],
        "queries": int(len(bundle.queries)),
        "protocol": {"clean_map": "mAP@all of every query on the model's own re-encoded "
                                  "gallery",
                     "t_map": "mAP@all of the non-target queries, relevance = the target "
                              "label, with the trigger pasted bottom-right"},
        "surrogate": tmeta["surrogate"], "trigger_seconds": tmeta["seconds"],
        "trigger_png": _b64png(trig["trigger"]),
        "triggered_examples": [_b64png(x) for x in trig["example_triggered"]],
        "baseline": rows[0], "rows": rows, "examples": examples,
    }


def _transfer_rows(ctx: JobContext, spec: dict[str, Any], arr: dict[str, np.ndarray],
                   top_k: int | None) -> list[dict[str, Any]]:
    """mAP of each transfer target on the clean and on the adversarial queries."""
    out = []
    for i, t in enumerate(spec["transfer_to"]):
        other = ctx.models.get(t["model"])
        bits = other.manifest.bits
        db = other.gallery.codes(bits), other.gallery.labels
        clean = map_at_k(unpack_bits(arr[f"xfer{i}_clean"], bits), db[0], arr["labels"],
                         db[1], top_k)
        adv = map_at_k(unpack_bits(arr[f"xfer{i}_adv"], bits), db[0], arr["labels"], db[1],
                       top_k)
        out.append({"model": t["model"], "bits": bits, "family": other.manifest.hasher["family"],
                    "map_clean": clean, "map_k": adv,
                    "drop_pct": 100.0 * (clean - adv) / clean if clean > 0 else None})
    return out


def _t_map_ceilings(bundle: Any, target: np.ndarray, db_codes: np.ndarray,
                    db_labels: np.ndarray, top_k: int | None) -> dict[str, float]:
    """t-MAP of the target codes themselves: what a perfect targeted attack would reach."""
    import torch

    from service.attacks.factory import bundle_context

    ctx = bundle_context(bundle)
    t = torch.from_numpy(target).float().to(bundle.device)
    out = {"t_map_ceiling_anchor": targeted_map(
        ctx.anchor_codes(t).cpu().numpy(), db_codes, target, db_labels, top_k)}
    if ctx.prototype is not None:
        out["t_map_ceiling_prototype"] = targeted_map(
            ctx.prototype_codes(t).cpu().numpy(), db_codes, target, db_labels, top_k)
    return out


def _examples(bundle: Any, method: str, eps: float, arr: dict[str, np.ndarray],
              bits: int) -> list[dict[str, Any]]:
    """Query / adversarial / perturbation and top-5 hits before and after, as base64 PNGs."""
    clean_x, adv_x = arr["example_clean"], arr["example_adv"]
    n = len(adv_x)
    codes = np.concatenate([unpack_bits(arr["clean_codes"][:n], bits),
                            unpack_bits(arr["adv_codes"][:n], bits)])
    idx, dist = topk(pack_bits(codes), bundle.gallery.codes_packed, 5)
    g = bundle.gallery
    names = bundle.manifest.class_names
    out = []
    for i in range(n):
        pert, _ = stretch_perturbation(clean_x[i], adv_x[i])
        span = int(np.abs(adv_x[i].astype(np.int16) - clean_x[i].astype(np.int16)).max())
        lab = arr["labels"][i]

        def hits(row: int, lab: np.ndarray = lab) -> list[dict[str, Any]]:
            return [{"id": int(g.ids[j]), "hamming": int(d),
                     "labels": [names[c] for c in np.flatnonzero(g.labels[j])],
                     "relevant": bool((g.labels[j] & lab).any()),
                     "png": _b64png(g.thumbnails[j])}
                    for j, d in zip(idx[row].tolist(), dist[row].tolist(), strict=True)]

        out.append({
            "method": method, "eps": eps, "position": int(arr["positions"][i]),
            "labels": [names[c] for c in np.flatnonzero(lab)],
            "query_png": _b64png(clean_x[i]), "adversarial_png": _b64png(adv_x[i]),
            "perturbation_png": _b64png(pert), "perturbation_scale_levels": span,
            "hamming": int(arr["hamming"][i]),
            "hits_clean": hits(i), "hits_adversarial": hits(n + i),
        })
    return out
