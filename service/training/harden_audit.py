"""The harden audit's chunks, run by workers (``POST /audit`` with ``"type": "harden"``).

See :mod:`service.jobs.audit_types.harden` for the plan. ``harden|train`` fine-tunes and
freezes the hardened bundle under ``<artifact_dir>/audits/<id>/`` (and re-trains its
generators); ``harden|original`` and ``harden|hardened`` re-audit each model on the same
queries with the same seed. Chunks report progress through the audit store's progress hash
and stop at the next step when the audit is cancelled. The jobs package names
:func:`compute_chunk` by a dotted string and imports it only where such a chunk runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import service
from service.attacks import ATTACKS
from service.attacks.generator_attack import GeneratorAttack
from service.attacks.runner import attack_batch
from service.attacks.universal import PatternAttack
from service.data.sources import materialize
from service.errors import AttackInputError, ConfigError
from service.evaluation import protocol_record, retrieval_figures
from service.jobs.audit_store import pack_arrays, unpack_arrays
from service.jobs.audit_types.base import Cancelled, check_bundle
from service.jobs.audit_types.harden import HARDENED_CHUNK, ORIGINAL_CHUNK, TRAIN_CHUNK
from service.jobs.context import JobContext
from service.retrieval.metrics import map_at_k_per_query
from service.store.bundle import Bundle, Gallery, load_bundle, save_bundle, sha256_file
from service.training.harden import HardenConfig, harden_hasher, recipe_of
from service.training.hasher import encode

log = logging.getLogger(__name__)

LABELS = {"pgd": "PGD-20", "pgd100x5": "PGD-{steps} × {restarts} restarts",
          "transfer": "transfer: PGD-20 made on the original"}


def bundle_name(spec: dict[str, Any], audit_id: str) -> str:
    return f"{spec['model']}-hardened-{audit_id[:8]}"


def compute_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                  progress: Any = None) -> bytes:
    """Run one harden chunk; ``progress`` (CLI) gets a count of finished epochs."""
    bundle = check_bundle(ctx, spec)
    if ctx.audits.stopped(audit_id):
        raise Cancelled(audit_id)
    if chunk == TRAIN_CHUNK:
        return _train_chunk(ctx, audit_id, spec, bundle, progress)
    if chunk == ORIGINAL_CHUNK:
        return _audit_chunk(ctx, audit_id, spec, chunk, bundle, bundle, None)
    if chunk == HARDENED_CHUNK:
        st = ctx.audits
        raw_t, raw_o = st.get_chunk(audit_id, TRAIN_CHUNK), st.get_chunk(audit_id, ORIGINAL_CHUNK)
        if raw_t is None or raw_o is None:  # RQ dependencies make this a crash, not data
            raise RuntimeError(f"audit {audit_id}: {chunk} ran before the chunks it reads")
        _, train = unpack_arrays(raw_t)
        orig_arrays, _ = unpack_arrays(raw_o)
        info = train["bundle"]
        path = Path(info["path"])
        if not (path / "SHA256SUMS").exists():
            raise ConfigError(f"the hardened bundle {path} is not on {socket.gethostname()} (it "
                              f"was written on {info['host']}): workers need one shared "
                              "artifact folder", field="harden")
        hardened = load_bundle(path, bundle.device)
        return _audit_chunk(ctx, audit_id, spec, chunk, hardened, bundle, orig_arrays)
    raise ConfigError(f"unknown harden chunk {chunk!r}", field="chunk")


# ---- training


def artifact_root(ctx: JobContext, audit_id: str) -> Path:
    """``<artifact_dir>/audits/<id>/``, created and checked writable before any training."""
    return ctx.artifact_root(audit_id, "harden", "the hardened bundle has nowhere to go")


def config_of(spec: dict[str, Any]) -> HardenConfig:
    h = spec["harden"]
    return HardenConfig(attack=h["attack"], eps=h["eps"], steps=h["steps"] or 1,
                        epochs=h["epochs"], adv_fraction=h["adv_fraction"], lr=h["lr"],
                        center_weight=h.get("center_weight", 0.0), num_train=h["num_train"],
                        seed=spec["seed"])


def _train_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], bundle: Bundle,
                 progress: Any) -> bytes:
    st = ctx.audits
    h = spec["harden"]
    root = artifact_root(ctx, audit_id)  # fail now, not after training
    cfg = config_of(spec)
    st.set_progress(audit_id, TRAIN_CHUNK, {"stage": "reading training images"})
    images, labels = bundle.train_split(cfg.num_train, cfg.seed)
    last = [0]

    def hook(info: dict[str, Any]) -> None:
        if st.stopped(audit_id):
            raise Cancelled(audit_id)
        if info["step"] == 0 and info["epoch"] > last[0]:
            if progress is not None:
                progress(info["epoch"] - last[0])
            last[0] = info["epoch"]
        st.set_progress(audit_id, TRAIN_CHUNK, {
            "stage": "fine-tuning", "epoch": info["epoch"], "epochs": info["epochs"],
            "step": info["step"], "steps": info["steps"]})

    t0 = time.perf_counter()
    hasher, history = harden_hasher(bundle, cfg, images, labels, hook=hook)
    timings = {"train_s": time.perf_counter() - t0}
    st.set_progress(audit_id, TRAIN_CHUNK, {"stage": "freezing the hardened bundle",
                                            "epoch": cfg.epochs, "epochs": cfg.epochs})
    name = bundle_name(spec, audit_id)
    folder = root / name
    try:
        save_hardened_bundle(bundle, hasher, cfg, history, timings["train_s"], folder,
                             audit_id)
    except OSError as exc:
        raise ConfigError(f"could not write {folder}: {exc}", field="harden") from None
    t1 = time.perf_counter()
    patterns = None
    if h["generators"] and "patterns" in bundle.manifest.extra:
        # the parent's generators are residuals on its universal patterns: fit the hardened
        # hasher's own patterns first (same settings), so the re-trained ones have their base
        st.set_progress(audit_id, TRAIN_CHUNK, {"stage": "fitting universal patterns",
                                                "epoch": cfg.epochs, "epochs": cfg.epochs})
        patterns = refit_patterns(bundle, folder)
    trained, best_epochs = [], {}
    for i, g in enumerate(h["generators"]):
        if st.stopped(audit_id):
            raise Cancelled(audit_id)
        st.set_progress(audit_id, TRAIN_CHUNK, {
            "stage": f"re-training generator {g} ({i + 1}/{len(h['generators'])})",
            "epoch": cfg.epochs, "epochs": cfg.epochs})
        entry = retrain_generator(bundle, folder, g, h["generator_epochs"],
                                  h["generator_num_train"], spec["seed"])
        trained.append(g)
        # 0: no epoch beat the start, which for a residual generator is its base pattern
        best_epochs[g] = (entry.get("training", {}).get("validation") or {}).get("best_epoch")
    timings["generators_s"] = time.perf_counter() - t1
    version = load_bundle(folder).manifest.version
    info = {"name": name, "path": str(folder), "host": socket.gethostname(),
            "sha": sha256_file(folder / "SHA256SUMS"), "version": version}
    original_gens = sorted({x["attack"] for x in bundle.manifest.generators})
    return pack_arrays({}, {
        "bundle": info, "history": history, "timings": timings,
        "patterns_refitted": patterns is not None,
        "generators": {"retrained": bool(trained), "names": trained,
                       "best_epochs": best_epochs,
                       "epochs": h["generator_epochs"], "num_train": h["generator_num_train"],
                       "original": original_gens}})


def save_hardened_bundle(bundle: Bundle, hasher: Any, cfg: HardenConfig,
                         history: list[dict[str, Any]], seconds: float, folder: Path,
                         audit_id: str | None = None) -> Any:
    """Freeze the hardened hasher as a bundle flagged ``extra.hardened`` (provenance: parent
    name and sha, recipe, attack, eps, epochs); same splits, gallery codes recomputed, no
    generators (they belong to the parent's hasher). Returns its manifest."""
    from service.store.modelstore import check_bundle_name

    check_bundle_name(folder.name, field="name")
    m = bundle.manifest
    g = bundle.gallery
    db_images = materialize(bundle.database_set(), min(8, os.cpu_count() or 1)).images
    db_codes = encode(hasher, db_images)
    q = bundle.queries
    figures = retrieval_figures(encode(hasher, q.images), q.labels, db_codes, g.labels)
    recipe = recipe_of(bundle)
    provenance = {"parent": m.name, "parent_version": m.version, "parent_sha": bundle.sha,
                  "recipe": recipe.to_dict(), "attack": cfg.attack, "eps": cfg.eps,
                  "eps_255": round(cfg.eps * 255, 3), "config": cfg.to_dict(),
                  "history": history, "train_seconds": round(seconds, 1),
                  "audit_id": audit_id}
    # generators and universal patterns belong to the parent's hasher: not carried over
    extra = {k: v for k, v in m.extra.items()
             if k not in ("prototype", "default_method", "patterns", "generator_recipe")}
    manifest = m.replace(
        name=folder.name, version="1", generators=[], files=[],
        created_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        package_version=service.__version__, torch_version=torch.__version__,
        training={**m.training, "hardened": {"source_bundle": m.name,
                                             "source_sha": bundle.sha,
                                             "config": cfg.to_dict()}},
        hasher={**m.hasher, "params": int(sum(p.numel() for p in hasher.parameters()))},
        evaluation={"protocol": protocol_record(), "figures": figures},
        extra={**extra, "hardened": provenance})
    return save_bundle(folder, manifest, hasher,
                       Gallery.from_codes(db_codes, g.labels, g.ids, g.thumbnails),
                       q, dict(bundle.splits))


def refit_patterns(parent: Bundle, folder: Path) -> dict[str, Any]:
    """Fit universal patterns for the hardened hasher in ``folder`` with the parent's recorded
    pattern settings (``extra.patterns.training.config``)."""
    from service.training.patterns import PatternConfig, fit_patterns

    old = dict(parent.manifest.extra["patterns"].get("training", {}).get("config", {}))
    names = {f.name for f in dataclasses.fields(PatternConfig)}
    cfg = PatternConfig(**{k: v for k, v in old.items() if k in names})
    return fit_patterns(folder, cfg, device=str(parent.device), progress=False)


def retrain_generator(parent: Bundle, folder: Path, attack: str, epochs: int, num_train: int,
                      seed: int) -> dict[str, Any]:
    """Train ``attack``'s generator against the hardened hasher in ``folder`` with the parent
    entry's settings (eps range, widths, weights), ``epochs`` and ``num_train`` images (a
    PrototypeNet is trained first, against the hardened hasher)."""
    from service.training.generator_trainer import (
        GeneratorConfig,
        PrototypeConfig,
        train_generator,
    )

    entry = max((g for g in parent.manifest.generators if g["attack"] == attack),
                key=lambda g: g["eps"])
    old = dict(entry.get("training", {}).get("config", {}))
    names = {f.name for f in dataclasses.fields(GeneratorConfig)}
    kw = {k: v for k, v in old.items() if k in names and k != "prototype"}
    proto = old.get("prototype") or {}
    pnames = {f.name for f in dataclasses.fields(PrototypeConfig)}
    kw.update(attack=attack, epochs=epochs, num_train=num_train, seed=seed,
              eps_max=float(entry["eps"]), precision="auto",
              prototype=PrototypeConfig(**{k: v for k, v in proto.items() if k in pnames}))
    return train_generator(folder, GeneratorConfig(**kw), device=str(parent.device),
                           progress=False)


# ---- re-audit


def query_positions(spec: dict[str, Any]) -> np.ndarray:
    q = spec["harden"]["queries"]
    if q["count"] >= q["total"]:
        return np.arange(q["total"])
    return np.sort(np.random.default_rng(q["seed"]).choice(q["total"], q["count"],
                                                           replace=False))


def _row(method: str, label: str, eps: float, codes: np.ndarray, labels: np.ndarray,
         db: np.ndarray, db_labels: np.ndarray, clean: np.ndarray, seconds: float,
         **extra: Any) -> dict[str, Any]:
    f = retrieval_figures(codes, labels, db, db_labels, curves=False)
    return {"method": method, "label": label, "eps": eps, "map_all": f["map_all"],
            "map_1000": f["map_1000"], "p_r2": f["p_r2"], "queries": int(len(codes)),
            "mean_hamming": float((codes != clean).sum(1).mean()), "seconds": seconds, **extra}


def _audit_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                 victim: Bundle, original: Bundle,
                 orig_arrays: dict[str, np.ndarray] | None) -> bytes:
    """Re-audit ``victim`` (the original or the hardened bundle) on the audit's queries.

    Generator methods the victim does not hold run the original's generator (flagged
    ``borrowed_generator``). The original's chunk keeps its PGD-20 images for the transfer
    row; the hardened chunk (``orig_arrays`` given) evaluates them."""
    st = ctx.audits
    h = spec["harden"]
    seed = spec["seed"]
    t_chunk = time.perf_counter()
    pos = query_positions(spec)
    images, labels = original.queries.images[pos], original.queries.labels[pos]
    bits = victim.manifest.bits
    db, db_labels = victim.gallery.codes(bits), victim.gallery.labels
    clean = encode(victim.hasher, images, device=victim.device)
    clean_fig = retrieval_figures(clean, labels, db, db_labels, curves=False)
    own_gens = {g["attack"] for g in victim.manifest.generators}
    n_rows = (len(h["methods"]) * len(h["audit_eps"]) + len(h["robust_eps"])
              + (len(h["audit_eps"]) if orig_arrays is not None else 0))
    rows: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    pgd_codes: dict[int, np.ndarray] = {}

    def step(what: str) -> None:
        if st.stopped(audit_id):
            raise Cancelled(audit_id)
        st.set_progress(audit_id, chunk, {"stage": f"attacking: {what}", "rows_done": len(rows),
                                          "rows": n_rows})

    for method in h["methods"]:
        cls = ATTACKS.get(method)
        is_gen = issubclass(cls, GeneratorAttack)
        is_pattern = issubclass(cls, PatternAttack)
        borrowed = ((is_gen and method not in own_gens)
                    or (is_pattern and not cls.available(victim.manifest)))
        source = original if borrowed else victim
        for ei, eps in enumerate(h["audit_eps"]):
            step(f"{method} at {eps * 255:.0f}/255")
            try:
                res = attack_batch(source, method, eps, images, labels, seed=seed)
            except AttackInputError as exc:  # e.g. a generator trained for smaller eps
                log.warning("harden %s: %s at %.4f skipped: %s", audit_id, method, eps, exc)
                continue
            codes = (encode(victim.hasher, res.adversarial, device=victim.device) if borrowed
                     else res.adv_codes)
            label = LABELS.get(method, method) + (
                "" if not borrowed else " (original's pattern)" if is_pattern
                else " (original's generator)")
            rows.append(_row(method, label, eps, codes, labels, db, db_labels, clean,
                             res.seconds, borrowed_generator=borrowed))
            if method == "pgd":
                pgd_codes[ei] = codes
                if orig_arrays is None:
                    arrays[f"pgd_adv_{ei}"] = res.adversarial
    n_r = h["robust_queries"]
    for eps in h["robust_eps"]:
        step(f"PGD-{h['robust_steps']} x {h['restarts']} at {eps * 255:.0f}/255")
        ei = next(i for i, e in enumerate(h["audit_eps"]) if abs(e - eps) < 1e-9)
        best_ap = np.full(n_r, np.inf)
        best = np.zeros((n_r, bits), np.int8)
        seconds = 0.0
        for r in range(h["restarts"]):
            if st.stopped(audit_id):
                raise Cancelled(audit_id)
            res = attack_batch(victim, "pgd", eps, images[:n_r], labels[:n_r],
                               seed=seed + 1 + r * 7919, steps=h["robust_steps"])
            seconds += res.seconds
            ap = map_at_k_per_query(res.adv_codes, db, labels[:n_r], db_labels)
            worse = ap < best_ap
            best_ap[worse], best[worse] = ap[worse], res.adv_codes[worse]
        same = pgd_codes.get(ei)
        pgd20_same = (None if same is None else retrieval_figures(
            same[:n_r], labels[:n_r], db, db_labels, curves=False)["map_all"])
        rows.append(_row("pgd100x5", LABELS["pgd100x5"].format(steps=h["robust_steps"],
                                                               restarts=h["restarts"])
                         + f" ({n_r} queries)", eps, best, labels[:n_r], db, db_labels,
                         clean[:n_r], seconds, pgd20_same_queries=pgd20_same))
    if orig_arrays is not None:
        for ei, eps in enumerate(h["audit_eps"]):
            key = f"pgd_adv_{ei}"
            if key not in orig_arrays:
                continue
            step(f"transfer at {eps * 255:.0f}/255")
            codes = encode(victim.hasher, orig_arrays[key], device=victim.device)
            rows.append(_row("transfer", LABELS["transfer"], eps, codes, labels, db, db_labels,
                             clean, 0.0))
    st.set_progress(audit_id, chunk, {"stage": "done", "rows_done": len(rows), "rows": n_rows})
    return pack_arrays(arrays, {
        "clean": clean_fig, "rows": rows, "seconds": time.perf_counter() - t_chunk,
        "queries": {**h["queries"], "audited": int(len(pos))},
        "model": victim.manifest.name, "sha": victim.sha})
