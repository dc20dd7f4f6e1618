"""Clean-label backdoor audit (after Gao et al., "Clean-label backdoor attack against deep
hashing based retrieval"): how few poisoned training images does a hashing pipeline tolerate?

1. A trigger patch (bottom-right, about 10% of the side) is optimised on the bundle's hasher
   (the attacker's surrogate) so that any image carrying it hashes near the target label's
   anchor code (majority vote of the database codes of that label).
2. ``poisons`` training images of the target class (labels unchanged: clean-label) get an
   L-inf-bounded *confusing perturbation* that pushes their codes away from their clean codes
   and disperses them among themselves, ``(1-lam)*(h.h_clean/K) + lam*mean_ij(h_i.h_j/K)``
   minimised with lam = 0.8, so the model must rely on the trigger; then the trigger is pasted.
3. A hasher is trained from scratch on the poisoned training set with the bundle's recipe.
4. Figures: clean mAP of the poisoned model, and t-MAP (relevance = target label) of the
   non-target queries with the trigger pasted, on the poisoned model and on a clean model
   trained with the same recipe (the baseline).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.attacks.base import scale_for
from service.attacks.factory import bundle_context
from service.data.base import ArrayImageSet
from service.data.sources import materialize
from service.errors import ConfigError
from service.evaluation import retrieval_figures
from service.retrieval.metrics import targeted_map
from service.store.bundle import Bundle
from service.training.hasher import HasherConfig, encode, train_hasher

log = logging.getLogger(__name__)


@dataclass
class BackdoorConfig:
    target: int = 0  # target class index
    poisons: int = 40
    patch: int | None = None  # side in pixels; default round(0.1 * width), at least 3
    trigger_steps: int = 300
    trigger_lr: float = 0.1
    perturb_eps: float = 8 / 255
    perturb_steps: int = 30
    lam: float = 0.8
    num_train: int | None = None  # subset of the bundle's train split (None: all of it)
    epochs: int | None = None  # override the bundle's recipe (None: as recorded)
    seed: int = 0


def paste(x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Paste ``patch`` (C, s, s) into the bottom-right corner of ``x`` (B, C, H, W)."""
    s = patch.shape[-1]
    out = x.clone()
    out[..., -s:, -s:] = patch
    return out


def optimise_trigger(bundle: Bundle, images: torch.Tensor, target: torch.Tensor,
                     cfg: BackdoorConfig, side: int) -> torch.Tensor:
    """A patch (on the CPU) that pulls any image's code toward the target's anchor code.

    Runs on the bundle's device; the random draws come from a CPU generator, so the patch
    depends on the seed alone."""
    hasher, dev = bundle.hasher, bundle.device
    anchor = bundle_context(bundle).anchor_codes(target[None].to(dev))[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    init = torch.zeros(images.shape[1], side, side).normal_(generator=gen)
    logits = init.to(dev).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=cfg.trigger_lr)
    for _ in range(cfg.trigger_steps):
        idx = torch.randint(0, len(images), (min(128, len(images)),), generator=gen)
        x = images[idx].to(dev).float() / 255
        with torch.no_grad():
            scale = scale_for(hasher(x))
        u = hasher(paste(x, torch.sigmoid(logits)))
        loss = -(anchor * torch.tanh(scale * u)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(logits).detach().cpu()


def confusing_perturbation(bundle: Bundle, x: torch.Tensor, cfg: BackdoorConfig) -> torch.Tensor:
    """PGD: away from each image's clean code and apart from each other (x in [0, 1], on the
    bundle's device)."""
    hasher = bundle.hasher
    with torch.no_grad():
        u0 = hasher(x)
    h0, scale = torch.where(u0 >= 0, 1.0, -1.0), scale_for(u0)
    k, n = u0.shape[1], len(x)
    step = 2.5 * cfg.perturb_eps / cfg.perturb_steps
    xa = x.clone()
    off = 1 - torch.eye(n, device=x.device)
    for _ in range(cfg.perturb_steps):
        xa.requires_grad_(True)
        h = torch.tanh(scale * hasher(xa))
        own = (h * h0).sum(1).mean() / k
        disp = ((h @ h.t()) * off).sum() / (k * max(1, n * (n - 1)))
        loss = (1 - cfg.lam) * own + cfg.lam * disp
        (g,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            xa = xa - step * g.sign()
            xa = torch.max(torch.min(xa, x + cfg.perturb_eps), x - cfg.perturb_eps).clamp(0, 1)
    return xa.detach()


@dataclass
class BackdoorSetup:
    """What every step of one backdoor audit shares: the recipe, the training set, the target."""

    config: BackdoorConfig
    recipe: HasherConfig
    images: np.ndarray  # uint8 (N, C, H, W), the clean training set
    labels: np.ndarray
    side: int  # trigger side in pixels
    target_onehot: torch.Tensor


def prepare(bundle: Bundle, cfg: BackdoorConfig) -> BackdoorSetup:
    """Check ``cfg`` against the bundle and take its training split and recipe."""
    m = bundle.manifest
    classes = m.class_names
    if not 0 <= cfg.target < len(classes):
        raise ConfigError(f"target: class index 0..{len(classes) - 1}", field="target")
    hcfg_d = dict(m.training["config"]["hasher"])
    if cfg.epochs is not None:
        hcfg_d["epochs"] = cfg.epochs
    images, labels = bundle.train_split(cfg.num_train, cfg.seed)
    if len(images) == 0:
        raise ConfigError(f"bundle: {m.name}'s gallery does not hold its train split",
                          field="bundle")
    inp = m.input
    if images.shape[1:] != (inp["channels"], inp["height"], inp["width"]):
        raise ConfigError("gallery thumbnails are not full-size inputs", field="bundle")
    side = cfg.patch or max(3, round(0.1 * inp["width"]))
    if not 1 <= side < min(inp["height"], inp["width"]):
        raise ConfigError(f"patch: 1 to {min(inp['height'], inp['width']) - 1} pixels",
                          field="patch")
    n_target = int(labels[:, cfg.target].sum())
    if cfg.poisons > n_target:
        raise ConfigError(f"poisons: only {n_target} training images of the target class",
                          field="poisons")
    onehot = torch.zeros(len(classes))
    onehot[cfg.target] = 1
    return BackdoorSetup(cfg, HasherConfig.from_dict(hcfg_d), images, labels, side, onehot)


def make_trigger(bundle: Bundle, setup: BackdoorSetup) -> torch.Tensor:
    """The trigger patch (C, s, s) in [0, 1], optimised on the non-target training images."""
    others = torch.from_numpy(setup.images[setup.labels[:, setup.config.target] == 0])
    return optimise_trigger(bundle, others, setup.target_onehot, setup.config, setup.side)


def poison(bundle: Bundle, setup: BackdoorSetup,
           trigger: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The training set with ``config.poisons`` target-class images perturbed and triggered
    (labels unchanged; :func:`prepare` checked the count). Returns the images and the
    poisoned indices."""
    cfg = setup.config
    poisons = cfg.poisons
    cand = np.flatnonzero(setup.labels[:, cfg.target] == 1)
    chosen = np.sort(np.random.default_rng(cfg.seed + 1).choice(cand, poisons, replace=False))
    out = setup.images.copy()
    if poisons > 0:
        x = torch.from_numpy(setup.images[chosen]).to(bundle.device).float() / 255
        xp = paste(confusing_perturbation(bundle, x, cfg).cpu(), trigger)
        out[chosen] = torch.round(xp * 255).to(torch.uint8).numpy()
    return out, chosen


def train_on(bundle: Bundle, setup: BackdoorSetup, images: np.ndarray, progress: bool = False,
             hook: Any = None, device: str = "cpu") -> Any:
    """A hasher trained from scratch on ``images`` (and the clean labels) with the recipe."""
    ds = ArrayImageSet(images, setup.labels, bundle.manifest.class_names, name="backdoor-train")
    hasher, _ = train_hasher(setup.recipe, ds, device=device, progress=progress, hook=hook)
    return hasher


def triggered_queries(bundle: Bundle, setup: BackdoorSetup,
                      trigger: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-target queries with and without the trigger (uint8), and their target labels."""
    q = bundle.queries
    nontarget = q.labels[:, setup.config.target] == 0
    qx = torch.from_numpy(q.images[nontarget]).float() / 255
    triggered = torch.round(paste(qx, trigger) * 255).to(torch.uint8).numpy()
    tlab = np.zeros_like(q.labels[nontarget])
    tlab[:, setup.config.target] = 1
    return triggered, q.images[nontarget], tlab


def backdoor_figures(bundle: Bundle, setup: BackdoorSetup, trigger: torch.Tensor,
                     hasher: Any) -> dict[str, float]:
    """Clean mAP@all (all queries) and t-MAP of the non-target queries with and without the
    trigger (relevance = the target label), with the gallery re-encoded by ``hasher``."""
    q = bundle.queries
    triggered, untriggered, tlab = triggered_queries(bundle, setup, trigger)
    db_imgs = materialize(bundle.database_set(), min(8, os.cpu_count() or 1)).images
    db_labels = bundle.gallery.labels
    dev = bundle.device

    def enc(images: np.ndarray) -> np.ndarray:
        return encode(hasher, images, device=dev)

    db = enc(db_imgs)
    clean = retrieval_figures(enc(q.images), q.labels, db, db_labels, curves=False)
    out = {"clean_map": clean["map_all"], "clean_map_1000": clean["map_1000"],
           "t_map_triggered": targeted_map(enc(triggered), db, tlab, db_labels),
           "t_map_untriggered": targeted_map(enc(untriggered), db, tlab, db_labels)}
    hasher.cpu()  # as train_hasher returns it; the caller freezes it from the CPU
    return out


def run_backdoor(bundle: Bundle, cfg: BackdoorConfig, progress: bool = False,
                 clean_baseline: Any = None) -> dict[str, Any]:
    """Poison, retrain, evaluate. Returns figures, the poisoned hasher and the trigger.

    ``clean_baseline``: a hasher trained with the same recipe on clean data (trained here
    when None), so the t-MAP baseline and the poisoned model differ only by the poison.
    """
    setup = prepare(bundle, cfg)
    t0 = time.perf_counter()
    trigger = make_trigger(bundle, setup)
    poisoned, chosen = poison(bundle, setup, trigger)
    t_poison = time.perf_counter() - t0
    poisoned_hasher = train_on(bundle, setup, poisoned, progress)
    clean_hasher = (clean_baseline if clean_baseline is not None
                    else train_on(bundle, setup, setup.images, progress))
    return {
        "config": dataclasses.asdict(cfg), "target_name": bundle.manifest.class_names[cfg.target],
        "patch_side": setup.side, "hasher_recipe": setup.recipe.to_dict(),
        "train_images": len(setup.images), "poison_seconds": round(t_poison, 1),
        "poisoned": backdoor_figures(bundle, setup, trigger, poisoned_hasher),
        "clean": backdoor_figures(bundle, setup, trigger, clean_hasher),
        "poisoned_hasher": poisoned_hasher, "clean_hasher": clean_hasher,
        "trigger": trigger, "poison_indices": chosen.tolist(),
    }


def save_poisoned_bundle(bundle: Bundle, result: dict[str, Any], out_root: Any,
                         name: str) -> Any:
    """Freeze the poisoned hasher as a bundle flagged ``extra.poisoned`` (same data splits;
    gallery codes recomputed; no generators). Returns its manifest."""
    import datetime as dt
    from pathlib import Path

    import service
    from service.evaluation import protocol_record
    from service.store.bundle import Gallery, save_bundle
    from service.store.modelstore import check_bundle_name

    check_bundle_name(name, field="name")
    m = bundle.manifest
    hasher = result["poisoned_hasher"]
    g = bundle.gallery
    db_codes = encode(hasher, g.thumbnails)
    q = bundle.queries
    figures = retrieval_figures(encode(hasher, q.images), q.labels, db_codes, g.labels)
    info = {k: v for k, v in result.items()
            if k not in ("poisoned_hasher", "clean_hasher", "trigger")}
    info["trigger"] = np.round(result["trigger"].numpy() * 255).astype(int).tolist()
    manifest = m.replace(
        name=name, version="1", generators=[], files=[],
        created_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        package_version=service.__version__, torch_version=torch.__version__,
        training={**m.training, "backdoor": {"source_bundle": m.name,
                                             "source_sha": bundle.sha}},
        hasher={**m.hasher, "params": int(sum(p.numel() for p in hasher.parameters()))},
        evaluation={"protocol": protocol_record(), "figures": figures},
        extra={"poisoned": info})
    return save_bundle(Path(out_root) / name, manifest, hasher,
                       Gallery.from_codes(db_codes, g.labels, g.ids, g.thumbnails),
                       q, dict(bundle.splits))
