"""The attack audit (``"type": "attack"``, the default): registered attacks at one or more eps
over a query set, and how retrieval degrades.

Plan: one chunk per method, eps and slice of ``chunk_size`` queries, keyed
``method|eps_index|chunk_index``; the chunks are independent and run in any order
(:mod:`~service.jobs.audit_types.attack_chunk` computes one). The reduce concatenates the
stored codes in chunk order and computes every figure with ``service.evaluation``; the report
is drawn by :mod:`~service.jobs.audit_types.attack_report`.

Torch is imported only inside the functions that need it (``service.attacks``,
``service.serving``), so that listing the audit types (``hashaudit --help``) stays fast.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

import service
from service.errors import AttackInputError, BadInput, UnknownName
from service.evaluation import audit_figures, protocol_record
from service.jobs.audit_store import unpack_arrays
from service.jobs.audit_types.base import (
    BATCH_MAX,
    CHUNK_MAX,
    COUNT_MAX,
    SEED_MAX,
    AuditType,
    SpecInputs,
    int_in,
)
from service.jobs.audit_types.html import b64png
from service.jobs.context import JobContext
from service.retrieval.codes import pack_bits, unpack_bits
from service.retrieval.metrics import map_at_k, targeted_map
from service.retrieval.ranking import topk

MAX_EPS_VALUES = 16
DEFAULT_CHUNK = 250
EXAMPLES = 3


class QueriesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int | None = Field(None, ge=1, le=COUNT_MAX, description="audit a seeded sample of "
                              "this many of the bundle's queries; null = all")
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="sample seed (default: the audit's seed)")
    upload_id: str | None = Field(None, description="audit an uploaded set instead "
                                  "(POST /audit/uploads)")


def n_query_chunks(spec: dict[str, Any]) -> int:
    return math.ceil(spec["queries"]["count"] / spec["chunk_size"])


def parse_chunk(key: str) -> tuple[str, int, int]:
    """``(method, eps_index, chunk_index)`` of ``method|eps_index|chunk_index``."""
    method, e, c = key.split("|")
    return method, int(e), int(c)


# PGD-k, the reference curve of the strength-vs-time frontier (``frontier: true``).
FRONTIER_STEPS = (1, 2, 5, 10, 20, 50)


def reference_method(name: str) -> tuple[str, int | None]:
    """``("pgd", k)`` for a reference run ``pgd@k``; ``(name, None)`` for an audited method."""
    method, _, steps = name.partition("@")
    return method, (int(steps) if steps else None)


def reference_names(spec: dict[str, Any]) -> list[str]:
    """The PGD-k runs an audit with ``frontier: true`` adds (empty otherwise)."""
    return [f"pgd@{k}" for k in FRONTIER_STEPS] if spec.get("frontier") else []


def default_methods(svc: Any) -> list[str]:
    """What an audit naming no method runs: the bundle's default method, then ``worst_case``
    (the ensemble that makes the report's headline) when the bundle serves it."""
    out = [svc.default_method]
    if "worst_case" in svc.methods() and "worst_case" not in out:
        out.append("worst_case")
    return out


class AttackAudit(AuditType):
    name = "attack"
    title = "Robustness audit"
    summary = "adversarial queries against the frozen hasher"
    chunk_function = "service.jobs.audit_types.attack_chunk:compute_chunk"
    request_fields = {
        "methods": (list[str] | None, Field(None, min_length=1, max_length=16,
                                            description="registered attacks (GET /models lists "
                                            "them); default: the bundle's default method and "
                                            "worst_case, the report's headline")),
        "eps": (float | str | list[float | str], Field(
            "8/255", description="one budget or a list for a robustness curve; 8/255 or "
            "0.0314")),
        "queries": (QueriesSpec, Field(default_factory=QueriesSpec)),
        "top_k": (int | None, Field(None, ge=1, le=COUNT_MAX,
                                    description="mAP@K cut-off; null = whole gallery")),
        "chunk_size": (int, Field(DEFAULT_CHUNK, ge=1, le=CHUNK_MAX,
                                  description="queries per chunk job")),
        "batch_size": (int | None, Field(None, ge=1, le=BATCH_MAX,
                                         description="images per forward pass")),
        "frontier": (bool, Field(
            False, description="also run PGD-k for k in 1, 2, 5, 10, 20, 50 (the reference "
            "curve of the report's strength-vs-time plot; 88 extra PGD steps per query and "
            "eps)")),
        "transfer_to": (list[str], Field(
            default_factory=list, max_length=16,
            description="other served bundles (same classes and input) to evaluate the "
                        "adversarial queries on: a transfer (black-box) row per attack")),
    }
    example = {"model": "fmnist-dpsh-32", "methods": ["untargeted_gan", "pgd"],
               "eps": ["8/255", "16/255"], "queries": {"count": 200, "seed": 0}, "top_k": None,
               "seed": 0}
    cli_action = "run"
    cli_help = "run an attack audit here with a progress bar; writes report.json and .html"
    cli_out = "audit_out"

    # ---- spec and plan

    def normalize(self, raw: dict[str, Any], inputs: SpecInputs) -> dict[str, Any]:
        """``raw`` keys: methods (list), eps (value or list; '8/255' strings allowed), queries
        (``{"count", "seed"}`` or ``{"upload_id"}``), top_k (None = mAP@all), seed,
        chunk_size, batch_size, transfer_to. Errors name the offending field."""
        from service.attacks import ATTACKS

        svc = inputs.svc
        methods = raw.get("methods") or default_methods(svc)
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
        seed = int_in(raw.get("seed", 0), 0, SEED_MAX, "seed")
        if q.get("upload_id"):
            if inputs.audits is None:
                raise BadInput("queries.upload_id: unknown upload", field="queries.upload_id")
            from service.jobs.uploads import upload_meta

            upload = upload_meta(inputs.audits, q["upload_id"])
            if upload["model"] != svc.name:
                raise BadInput(f"queries.upload_id: the upload was made for {upload['model']}, "
                               f"not {svc.name}", field="queries.upload_id")
            total = int(upload["count"])
            count = total
            queries = {"source": "upload", "upload_id": upload["id"], "count": count,
                       "total": total}
        else:
            total = len(svc.bundle.queries)
            if total == 0:
                raise BadInput(f"queries: bundle {svc.name} has no query split (it was indexed "
                               "without --query); upload query images (queries.upload_id)",
                               field="queries")
            count = q.get("count")
            count = total if count is None else int_in(count, 1, COUNT_MAX, "queries.count")
            if count < 1 or count > total:
                raise BadInput(f"queries.count: between 1 and {total} (the bundle's query "
                               "split)", field="queries.count")
            q_seed = seed if q.get("seed") is None else int_in(q["seed"], 0, SEED_MAX,
                                                               "queries.seed")
            queries = {"source": "bundle", "count": count, "seed": q_seed, "total": total}
        if count > inputs.max_queries:
            raise BadInput(f"queries: at most {inputs.max_queries} per audit "
                           "(HASHAUDIT_MAX_AUDIT_QUERIES)", field="queries")
        top_k = raw.get("top_k")
        if top_k is not None:
            int_in(top_k, 1, COUNT_MAX, "top_k", "null (mAP over the whole gallery) or an integer")
        chunk = raw.get("chunk_size") or DEFAULT_CHUNK
        int_in(chunk, 1, CHUNK_MAX, "chunk_size")
        batch = raw.get("batch_size") or min(chunk, 100)
        int_in(batch, 1, BATCH_MAX, "batch_size")
        for m in seen:
            if ATTACKS.get(m).targeted and len(svc.classes) < 2:
                raise AttackInputError(f"methods: {m} needs at least two classes",
                                       field="methods")
        transfer = self._transfer_targets(svc, raw.get("transfer_to") or [], inputs.lookup)
        frontier = raw.get("frontier", False)
        if not isinstance(frontier, bool):
            raise BadInput("frontier: true or false", field="frontier")
        m = svc.bundle.manifest
        return {
            "model": m.name, "bundle_version": m.version, "bundle_sha": svc.bundle.sha,
            "methods": seen, "eps": eps, "queries": queries,
            "top_k": None if top_k is None else int(top_k), "seed": seed,
            "chunk_size": chunk, "batch_size": batch, "examples": EXAMPLES,
            "transfer_to": transfer, "frontier": frontier,
        }

    @staticmethod
    def _transfer_targets(svc: Any, names: list[str], lookup: Any) -> list[dict[str, str]]:
        transfer: list[dict[str, str]] = []
        for name in names:
            if lookup is None:
                raise BadInput("transfer_to: not available here", field="transfer_to")
            if name == svc.bundle.manifest.name:
                raise BadInput(f"transfer_to: {name} is the audited model itself (its white-box "
                               "rows are in the report already)", field="transfer_to")
            try:
                other = lookup(name)
            except UnknownName as exc:
                raise UnknownName(exc.message, field="transfer_to") from None
            om, m0 = other.manifest, svc.bundle.manifest
            if om.class_names != m0.class_names or om.input != m0.input:
                raise BadInput(f"transfer_to: {name} has other classes or another input spec "
                               f"than {m0.name}", field="transfer_to")
            if all(t["model"] != name for t in transfer):
                transfer.append({"model": name, "sha": other.sha})
        return transfer

    def chunk_keys(self, spec: dict[str, Any]) -> list[str]:
        """``method|eps_index|chunk_index`` for every method, eps and slice of queries."""
        n = n_query_chunks(spec)
        return [f"{m}|{e}|{c}" for m in [*spec["methods"], *reference_names(spec)]
                for e in range(len(spec["eps"])) for c in range(n)]

    # ---- progress

    def progress(self, spec: dict[str, Any], done: list[str],
                 inside: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Images and chunks done, in all and per method."""
        per_method = {}
        cs, total_q = spec["chunk_size"], spec["queries"]["count"]
        n_chunks_per = n_query_chunks(spec)
        for m in [*spec["methods"], *reference_names(spec)]:
            finished = [parse_chunk(c) for c in done if c.startswith(m + "|")]
            imgs = sum(min(cs, total_q - c * cs) for _, _, c in finished)
            per_method[m] = {"done_images": imgs, "total_images": total_q * len(spec["eps"]),
                             "done_chunks": len(finished),
                             "total_chunks": n_chunks_per * len(spec["eps"])}
        return {
            "done_images": sum(v["done_images"] for v in per_method.values()),
            "total_images": sum(v["total_images"] for v in per_method.values()),
            "per_method": per_method,
        }

    def progress_text(self, progress: dict[str, Any]) -> str:
        return f"{progress['done_images']} / {progress['total_images']} images done"

    # ---- reduce

    def reduce(self, ctx: JobContext, audit_id: str, spec: dict[str, Any],
               chunks: dict[str, bytes]) -> dict[str, Any]:
        """All chunks -> figures: clean and attacked mAP, drops, t-MAP, curves, stats,
        examples."""
        from service.attacks import ATTACKS
        from service.images import psnr_db

        bundle = ctx.models.get(spec["model"])
        bits = bundle.manifest.bits
        db_codes = bundle.gallery.codes(bits)
        db_labels = bundle.gallery.labels
        top_k = spec["top_k"]
        n_chunks = n_query_chunks(spec)

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
        clean_fig = audit_figures(clean, q_labels, db_codes, db_labels, top_k)
        attacks: list[dict[str, Any]] = []
        reference: list[dict[str, Any]] = []
        examples = []
        for method in [*spec["methods"], *reference_names(spec)]:
            base, steps = reference_method(method)
            targeted = ATTACKS.get(base).targeted
            for ei, eps in enumerate(spec["eps"]):
                arr, metas = gather(method, ei)
                adv = unpack_bits(arr["adv_codes"], bits)
                fig = audit_figures(adv, arr["labels"], db_codes, db_labels, top_k,
                                    targets=arr["target"] if targeted else None)
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
                    # what the chunks' workers computed in (HASHAUDIT_PRECISION); older
                    # chunks: fp32
                    "precision": "/".join(sorted({m.get("precision", "fp32") for m in metas})),
                }
                if targeted:
                    row["t_map"] = fig["t_map"]
                    row["t_map_clean"] = targeted_map(unpack_bits(arr["clean_codes"], bits),
                                                      db_codes, arr["target"], db_labels, top_k)
                    row.update(_t_map_ceilings(bundle, arr["target"], db_codes, db_labels,
                                               top_k))
                if steps is not None:  # a PGD-k point of the frontier's reference curve
                    reference.append({**{k: row[k] for k in (
                        "method", "eps", "eps_levels", "map_k", "map_all", "mean_hamming",
                        "ms_per_image", "seconds")}, "base_method": base, "steps": steps})
                    continue
                used: dict[str, int] = {}
                for meta in metas:
                    for member, won in meta.get("used", {}).items():
                        used[member] = used.get(member, 0) + int(won)
                if used:  # worst_case: which member won how many queries
                    row["used"] = [{"member": k, "won": v} for k, v in used.items()]
                if spec.get("transfer_to"):
                    row["transfer"] = _transfer_rows(ctx, spec, arr, top_k)
                attacks.append(row)
                if "example_adv" in arr and ei == len(spec["eps"]) - 1:
                    examples.extend(_examples(bundle, method, eps, arr, bits))
        return {
            "audit_id": audit_id, "model": spec["model"],
            "bundle_version": spec["bundle_version"], "bundle_sha": spec["bundle_sha"],
            "package_version": service.__version__,
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
            "attacks": attacks, "reference": reference, "examples": examples,
        }

    def report_body(self, audit_id: str, result: dict[str, Any], json_href: str) -> str:
        from service.jobs.audit_types.attack_report import report_body

        return report_body(audit_id, result, json_href)

    # ---- the command line

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        r = parser
        r.add_argument("--methods", nargs="+", default=None,
                       help="attack methods (default: the bundle's default method, as "
                            "POST /audit)")
        r.add_argument("--eps", nargs="+", default=["8/255"],
                       help="one or more, e.g. 8/255 16/255")
        r.add_argument("--count", type=int, default=None,
                       help="audit a seeded sample of this many queries (default: the whole "
                            "query split)")
        r.add_argument("--seed", type=int, default=0, help="sample and attack seed")
        r.add_argument("--top-k", type=int, default=None,
                       help="mAP@K (default: whole gallery)")
        r.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                       help="queries per chunk")
        r.add_argument("--batch-size", type=int, default=None,
                       help="images per forward pass (default: chunk size, at most 100)")
        r.add_argument("--transfer-to", nargs="+", default=[],
                       help="other bundles to evaluate the adversarial queries on (transfer)")
        r.add_argument("--frontier", action="store_true",
                       help="also run PGD-k (k = 1, 2, 5, 10, 20, 50): the reference curve of "
                            "the report's strength-vs-time plot")

    def cli_request(self, args: argparse.Namespace) -> dict[str, Any]:
        from service.parsing import eps_value

        return {"methods": args.methods, "eps": [eps_value(e) for e in args.eps],
                "queries": {"count": args.count, "seed": args.seed}, "top_k": args.top_k,
                "seed": args.seed, "chunk_size": args.chunk_size,
                "frontier": bool(getattr(args, "frontier", False)),
                "batch_size": args.batch_size, "transfer_to": args.transfer_to}

    def cli_total(self, spec: dict[str, Any]) -> tuple[int, str]:
        runs = len(spec["methods"]) + len(reference_names(spec))
        return spec["queries"]["count"] * runs * len(spec["eps"]), "img"

    def cli_summary(self, result: dict[str, Any]) -> list[str]:
        lines = [f"clean mAP@{result['protocol']['map_k']}: {result['clean']['map_k']:.4f}"]
        for a in result["attacks"]:
            lines.append(f"  {a['method']:>20} eps {a['eps_levels']:>3}/255: mAP "
                         f"{a['map_k']:.4f} (drop {a['drop_pct']:.1f}%), "
                         f"{a['ms_per_image']:.2f} ms/img")
            for t in a.get("transfer", []):
                lines.append(f"  {'':>20} -> {t['model']}: mAP {t['map_clean']:.4f} -> "
                             f"{t['map_k']:.4f}")
        return lines


# ----------------------------------------------------------------------------- reduce helpers


def _finite_mean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


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
    from service.images import stretch_perturbation

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
                     "png": b64png(g.thumbnails[j])}
                    for j, d in zip(idx[row].tolist(), dist[row].tolist(), strict=True)]

        out.append({
            "method": method, "eps": eps, "position": int(arr["positions"][i]),
            "labels": [names[c] for c in np.flatnonzero(lab)],
            "query_png": b64png(clean_x[i]), "adversarial_png": b64png(adv_x[i]),
            "perturbation_png": b64png(pert), "perturbation_scale_levels": span,
            "hamming": int(arr["hamming"][i]),
            "hits_clean": hits(i), "hits_adversarial": hits(n + i),
        })
    return out
