"""The backdoor audit's chunks, run by workers (``POST /audit`` with ``"type": "backdoor"``).

A backdoor audit is a few long chunks (see :mod:`service.jobs.audit_types.backdoor`):

* ``backdoor|trigger``: the trigger patch, optimised once on the bundle's hasher (the
  surrogate), with the surrogate's own triggered t-MAP. Every other chunk waits for it (an RQ
  dependency), so all models are measured with the same trigger.
* ``backdoor|p<N>``: poison ``N`` target-class training images, retrain the bundle's recipe
  from scratch, measure clean mAP and t-MAP with and without the trigger, and (N > 0) freeze
  the poisoned hasher as a bundle flagged ``extra.poisoned`` under the artifact folder.
  ``p0`` is the clean baseline, trained the same way on the clean set.

Chunks report epochs through the audit store's progress hash and stop at the next step when
the audit is cancelled. The jobs package names :func:`compute_chunk` by a dotted string
(``BackdoorAudit.chunk_function``) and imports it only where such a chunk runs.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.errors import ConfigError
from service.jobs.audit_store import pack_arrays, unpack_arrays
from service.jobs.audit_types.backdoor import TRIGGER_CHUNK, parse_backdoor_chunk
from service.jobs.audit_types.base import Cancelled, check_bundle
from service.jobs.context import JobContext
from service.retrieval.metrics import targeted_map
from service.training.backdoor import (
    BackdoorConfig,
    backdoor_figures,
    make_trigger,
    poison,
    prepare,
    save_poisoned_bundle,
    train_on,
    triggered_queries,
)
from service.training.hasher import encode

log = logging.getLogger(__name__)

EXAMPLES = 3


def config_of(spec: dict[str, Any], poisons: int) -> BackdoorConfig:
    b = spec["backdoor"]
    return BackdoorConfig(target=b["target"], poisons=poisons, patch=b["patch"],
                          trigger_steps=b["trigger_steps"], perturb_eps=b["perturb_eps"],
                          num_train=b["num_train"], epochs=b["epochs"], seed=spec["seed"])


def bundle_name(spec: dict[str, Any], audit_id: str, poisons: int) -> str:
    return f"{spec['model']}-backdoor-{audit_id[:8]}-p{poisons}"


def compute_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                  progress: Any = None) -> bytes:
    """Run one backdoor chunk; ``progress`` (CLI) gets a count of finished epochs."""
    bundle = check_bundle(ctx, spec)
    poisons = parse_backdoor_chunk(chunk)
    if ctx.audits.stopped(audit_id):
        raise Cancelled(audit_id)
    if poisons is None:
        return _trigger_chunk(ctx, audit_id, spec, bundle)
    return _poison_chunk(ctx, audit_id, spec, bundle, chunk, poisons, progress)


def _trigger_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], bundle: Any) -> bytes:
    t0 = time.perf_counter()
    setup = prepare(bundle, config_of(spec, 0))
    if spec["backdoor"]["save_bundles"] and max(spec["backdoor"]["poisons"]) > 0:
        artifact_root(ctx, audit_id)  # fail now, not after the first model has trained
    ctx.audits.set_progress(audit_id, TRIGGER_CHUNK, {"stage": "optimising trigger"})
    trigger = make_trigger(bundle, setup)
    triggered, untriggered, tlab = triggered_queries(bundle, setup, trigger)
    db = bundle.gallery.codes(bundle.manifest.bits)
    db_labels = bundle.gallery.labels
    surrogate = {
        "t_map_triggered": targeted_map(encode(bundle.hasher, triggered, device=bundle.device),
                                        db, tlab, db_labels),
        "t_map_untriggered": targeted_map(encode(bundle.hasher, untriggered,
                                                 device=bundle.device), db, tlab, db_labels)}
    arrays = {"trigger": np.round(trigger.numpy() * 255).astype(np.uint8),
              "example_triggered": triggered[:EXAMPLES]}
    return pack_arrays(arrays, {"side": setup.side, "surrogate": surrogate,
                                "train_images": int(len(setup.images)),
                                "seconds": time.perf_counter() - t0})


def _poison_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], bundle: Any,
                  chunk: str, poisons: int, progress: Any) -> bytes:
    st = ctx.audits
    raw = st.get_chunk(audit_id, TRIGGER_CHUNK)
    if raw is None:  # the RQ dependency (or the runner's order) makes this a crash, not data
        raise RuntimeError(f"audit {audit_id}: {chunk} ran before its trigger chunk")
    trig_arrays, _ = unpack_arrays(raw)
    trigger = torch.from_numpy(trig_arrays["trigger"]).float() / 255
    cfg = config_of(spec, poisons)
    setup = prepare(bundle, cfg)
    if poisons > 0 and spec["backdoor"]["save_bundles"]:
        artifact_root(ctx, audit_id)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    st.set_progress(audit_id, chunk, {"stage": "poisoning", "poisons": poisons})
    images, chosen = poison(bundle, setup, trigger)
    timings["poison_s"] = time.perf_counter() - t0
    last_epoch = [0]

    def hook(info: dict[str, Any]) -> None:
        if st.stopped(audit_id):
            raise Cancelled(audit_id)
        if info["step"] == 0 and info["epoch"] > last_epoch[0]:
            if progress is not None:
                progress(info["epoch"] - last_epoch[0])
            last_epoch[0] = info["epoch"]
            st.set_progress(audit_id, chunk, {"stage": "training", "poisons": poisons,
                                              "epoch": info["epoch"], "epochs": info["epochs"]})

    t1 = time.perf_counter()
    device = str(bundle.device)
    hasher = train_on(bundle, setup, images, hook=hook, device=device)
    timings["train_s"] = time.perf_counter() - t1
    st.set_progress(audit_id, chunk, {"stage": "evaluating", "poisons": poisons,
                                      "epoch": setup.recipe.epochs,
                                      "epochs": setup.recipe.epochs})
    t2 = time.perf_counter()
    figures = backdoor_figures(bundle, setup, trigger, hasher)
    timings["eval_s"] = time.perf_counter() - t2
    saved = None
    if poisons > 0 and spec["backdoor"]["save_bundles"]:
        saved = _save(ctx, audit_id, spec, bundle, setup, hasher, trigger, chosen, figures)
    arrays = {"poison_indices": chosen.astype(np.int64)}
    if poisons > 0:
        arrays["example_original"] = setup.images[chosen[:EXAMPLES]]
        arrays["example_poisoned"] = images[chosen[:EXAMPLES]]
    st.set_progress(audit_id, chunk, {"stage": "done", "poisons": poisons})
    return pack_arrays(arrays, {"poisons": poisons, "figures": figures, "timings": timings,
                                "recipe_epochs": setup.recipe.epochs, "bundle": saved})


def artifact_root(ctx: JobContext, audit_id: str) -> Path:
    """``<artifact_dir>/audits/<id>/`` for the poisoned bundles (``JobContext.artifact_root``)."""
    return ctx.artifact_root(audit_id, "backdoor.save_bundles", "poisoned bundles have nowhere "
                             "to go (or submit with backdoor.save_bundles false)")


def _save(ctx: JobContext, audit_id: str, spec: dict[str, Any], bundle: Any, setup: Any,
          hasher: Any, trigger: torch.Tensor, chosen: np.ndarray,
          figures: dict[str, float]) -> dict[str, Any]:
    """Freeze the poisoned hasher under ``<artifact_dir>/audits/<id>/``."""
    root = artifact_root(ctx, audit_id)
    name = bundle_name(spec, audit_id, int(len(chosen)))
    result = {"config": dataclasses.asdict(setup.config),
              "target_name": spec["backdoor"]["target_name"], "patch_side": setup.side,
              "hasher_recipe": setup.recipe.to_dict(), "train_images": len(setup.images),
              "poisoned": figures, "poisoned_hasher": hasher, "trigger": trigger,
              "poison_indices": chosen.tolist(), "audit_id": audit_id}
    try:
        manifest = save_poisoned_bundle(bundle, result, root, name)
    except OSError as exc:
        raise ConfigError(f"could not write {root / name}: {exc}",
                          field="backdoor.save_bundles") from None
    from service.store.bundle import sha256_file

    return {"name": name, "path": str(root / name), "host": socket.gethostname(),
            "sha": sha256_file(root / name / "SHA256SUMS"), "version": manifest.version}
