"""Universal patterns fitted against a bundle's hasher, and the validation split that
generator training selects its checkpoints on.

Validation (:class:`Validator`): a seeded split of the bundle's *training* images (never the
test queries), held out of pattern fitting and generator training. Its figures are those of
the protocol: the attacked validation images, rounded to uint8 as a user receives them, are
ranked against the gallery *without* themselves (every training image is also in the
database); mAP@all for untargeted attacks, t-MAP (random target classes, seeded) for targeted
ones.

Patterns (:func:`fit_patterns`): for each eps of a grid, one pattern per class and one for
all images, fitted by signed-gradient descent of the own-code objective
mean(sign(u(x)) * tanh(s * u(x + d))) (s = 1 / mean|u(x)|, as the ``untargeted_gan_plus``
hashing term) on batches of that class's training images (all images for the label-free
pattern), with a step that shrinks linearly from eps/10 to eps/100. A multi-label image
counts for each of its classes. They are written into the bundle (``extra.patterns``) with
their validation figures; the attacks ``class_universal`` and ``universal`` and generators
trained with a ``base`` use them (:mod:`service.attacks.universal`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from service.attacks.base import scale_for, to_uint8_within
from service.attacks.universal import PatternSet
from service.device import resolve_device
from service.errors import ConfigError
from service.nets.hasher import encode_uint8
from service.retrieval.metrics import map_at_k, targeted_map
from service.store.bundle import Bundle, load_bundle
from service.store.generator_parts import save_patterns

log = logging.getLogger(__name__)

DEFAULT_PATTERN_EPS = (4 / 255, 8 / 255, 16 / 255, 0.1)
DEFAULT_VAL_EPS = (8 / 255, 16 / 255)
VAL_SEED_SALT = 7_000_003  # the validation split's rng differs from the training subsets'


def validation_split(bundle: Bundle, num_val: int, seed: int = 0) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """(training positions, validation positions) in the gallery: a seeded ``num_val`` of the
    bundle's train split (at most a fifth of it) is held out; both sorted."""
    pos = bundle.train_positions()
    if len(pos) == 0:
        raise ConfigError("the bundle's train split is not in its gallery", field="bundle")
    n_val = max(0, min(int(num_val), len(pos) // 5))
    perm = np.random.default_rng(seed + VAL_SEED_SALT).permutation(len(pos))
    return np.sort(pos[perm[n_val:]]), np.sort(pos[perm[:n_val]])


def subset(positions: np.ndarray, num: int | None, seed: int) -> np.ndarray:
    """A seeded subset of ``num`` positions (all when ``num`` is None or not smaller)."""
    if num is None or num >= len(positions):
        return positions
    return np.sort(np.random.default_rng(seed).choice(positions, num, replace=False))


class Validator:
    """Scores an attack on the validation split (module docstring).

    ``perturb(x, labels, target, eps) -> x_adv`` gets float images in [0, 1] and multi-hot
    float labels (and targets for a targeted attack) on the hasher's device.
    """

    def __init__(self, bundle: Bundle, positions: np.ndarray, eps: Sequence[float],
                 targeted: bool = False, seed: int = 0, batch_size: int = 250) -> None:
        if len(positions) == 0:
            raise ConfigError("the validation split is empty", field="val_num")
        self.hasher = bundle.hasher
        self.dev = bundle.device
        images, labels = bundle.images_at(positions)
        self.images = torch.from_numpy(images)
        self.labels = labels
        keep = np.setdiff1d(np.arange(len(bundle.gallery)), positions)
        self.db_codes = bundle.gallery.codes(bundle.manifest.bits)[keep]
        self.db_labels = bundle.gallery.labels[keep]
        self.eps = [float(e) for e in eps]
        self.targeted = targeted
        self.targets = None
        if targeted:
            rng = np.random.default_rng(seed)
            self.targets = np.zeros_like(labels)
            for i, row in enumerate(labels):
                free = np.flatnonzero(row == 0)
                self.targets[i, rng.choice(free) if len(free) else 0] = 1
        self.batch_size = batch_size
        self.metric = "t_map" if targeted else "map_all"

    def __len__(self) -> int:
        return len(self.images)

    def figures(self, perturb: Callable[..., torch.Tensor]) -> dict[str, float]:
        """{eps as text: figure} for every validation eps."""
        out = {}
        y_all = torch.from_numpy(self.labels).float()
        t_all = None if self.targets is None else torch.from_numpy(self.targets).float()
        for eps in self.eps:
            advs = []
            with torch.no_grad():
                for i in range(0, len(self.images), self.batch_size):
                    x = self.images[i:i + self.batch_size].to(self.dev).float() / 255
                    y = y_all[i:i + self.batch_size].to(self.dev)
                    t = None if t_all is None else t_all[i:i + self.batch_size].to(self.dev)
                    x_adv = perturb(x, y, t, eps).clamp(0, 1)
                    advs.append(to_uint8_within(x_adv, x, eps).cpu())
            codes = encode_uint8(self.hasher, torch.cat(advs))
            if self.targeted:
                v = targeted_map(codes, self.db_codes, self.targets, self.db_labels)
            else:
                v = map_at_k(codes, self.db_codes, self.labels, self.db_labels, None)
            out[eps_key(eps)] = float(v)
        return out

    def loss(self, figures: dict[str, float]) -> float:
        """What selection minimises: mean mAP@all (untargeted) or minus mean t-MAP."""
        m = float(np.mean(list(figures.values())))
        return -m if self.targeted else m


def eps_key(eps: float) -> str:
    """An eps as the text used in records: grey levels when whole (``8/255``), else 4 digits."""
    v = eps * 255
    return f"{round(v)}/255" if abs(v - round(v)) < 1e-6 else f"{eps:.4f}"


@dataclass
class PatternConfig:
    """A pattern fitting run (recorded in the manifest's ``extra.patterns.training``)."""

    eps: list[float] = field(default_factory=lambda: list(DEFAULT_PATTERN_EPS))
    steps: int = 150
    per_class_batch: int = 32  # images of each class per step
    num_train: int | None = None  # of the training side after the validation hold-out
    val_num: int = 1000
    val_eps: list[float] = field(default_factory=lambda: list(DEFAULT_VAL_EPS))
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.eps or any(not 0 < e <= 1 for e in self.eps):
            raise ConfigError("pattern eps must lie in (0, 1]", field="eps")
        if not 1 <= self.steps <= 100_000:
            raise ConfigError("steps must be in 1..100000", field="steps")
        if not 1 <= self.per_class_batch <= 4096:
            raise ConfigError("per_class_batch must be in 1..4096", field="per_class_batch")
        self.eps = sorted(float(e) for e in self.eps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def own_code_loss(hasher: Any, x_adv: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    """Mean agreement of the relaxed adversarial code with the clean code (to minimise)."""
    anchor = torch.where(u0 >= 0, 1.0, -1.0)
    return (anchor * torch.tanh(scale_for(u0) * hasher(x_adv))).mean()


def _fit_one_eps(hasher: Any, images: torch.Tensor, labels: np.ndarray, eps: float,
                 cfg: PatternConfig, dev: torch.device,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class patterns (C, ch, H, W), universal pattern (ch, H, W)) at ``eps``."""
    c = labels.shape[1]
    members = [np.flatnonzero(labels[:, k] > 0) for k in range(c)]
    present = [k for k in range(c) if len(members[k])]
    gen = np.random.default_rng(cfg.seed)
    shape = images.shape[1:]
    pats = torch.zeros(c, *shape, device=dev)
    uni = torch.zeros(1, *shape, device=dev)
    b = cfg.per_class_batch
    for t in tqdm(range(cfg.steps), desc=f"patterns eps {eps_key(eps)}", disable=not progress,
                  leave=False):
        step = eps * (0.1 * (1 - t / cfg.steps) + 0.01)
        idx_c = np.concatenate([gen.choice(members[k], b) for k in present])
        which = np.repeat(present, b)
        idx_u = gen.choice(len(images), b * len(present))
        x = torch.cat([images[idx_c], images[idx_u]]).to(dev).float() / 255
        with torch.no_grad():
            u0 = hasher(x)
        pats.requires_grad_(True)
        uni.requires_grad_(True)
        d = torch.cat([pats[torch.from_numpy(which).to(dev)], uni.expand(len(idx_u), *shape)])
        g_p, g_u = torch.autograd.grad(own_code_loss(hasher, (x + d).clamp(0, 1), u0),
                                       (pats, uni))
        with torch.no_grad():
            pats = (pats - step * g_p.sign()).clamp(-eps, eps)
            uni = (uni - step * g_u.sign()).clamp(-eps, eps)
    return pats.detach(), uni.detach()[0]


def pattern_perturb(patterns: PatternSet, per_class: bool) -> Callable[..., torch.Tensor]:
    def perturb(x: torch.Tensor, y: torch.Tensor, t: Any, eps: float) -> torch.Tensor:
        return x + patterns.delta(eps, y if per_class else None).to(x.device)

    return perturb


def fit_patterns(bundle_path: Path, cfg: PatternConfig, device: str = "auto",
                 progress: bool = True) -> dict[str, Any]:
    """Fit the universal patterns of a bundle, validate them and write them into it.

    Returns the manifest record (``extra.patterns``)."""
    dev = resolve_device(device)
    bundle = load_bundle(bundle_path, dev)
    hasher = bundle.hasher.eval()
    train_pos, val_pos = validation_split(bundle, cfg.val_num, 0)
    train_pos = subset(train_pos, cfg.num_train, cfg.seed)
    images, labels = bundle.images_at(train_pos)
    images_t = torch.from_numpy(images)
    t0 = time.perf_counter()
    per_class, universal, seconds = [], [], []
    for eps in cfg.eps:
        t1 = time.perf_counter()
        p, u = _fit_one_eps(hasher, images_t, labels, eps, cfg, dev, progress)
        per_class.append(p.cpu())
        universal.append(u.cpu())
        seconds.append(round(time.perf_counter() - t1, 1))
        log.info("patterns at eps %s fitted in %.1f s", eps_key(eps), seconds[-1])
    ps = PatternSet(cfg.eps, torch.stack(per_class), torch.stack(universal))
    validation: dict[str, Any] = {"num": int(len(val_pos)), "split_seed": 0}
    if len(val_pos):
        val_eps = [e for e in cfg.val_eps if e <= max(cfg.eps) + 1e-9]
        v = Validator(bundle, val_pos, val_eps)
        dps = ps.to(dev)
        validation.update(
            metric=v.metric,
            clean=v.figures(lambda x, y, t, eps: x),
            class_universal=v.figures(pattern_perturb(dps, True)),
            universal=v.figures(pattern_perturb(dps, False)))
        log.info("pattern validation (%s): %s", v.metric, validation)
    training = {"config": cfg.to_dict(), "train_images": int(len(train_pos)),
                "seconds_per_eps": seconds, "seconds": round(time.perf_counter() - t0, 1),
                "device": str(dev),
                "objective": "own-code agreement mean(sign(u(x)) tanh(u(x+d)/mean|u(x)|)), "
                             "signed steps eps/10 -> eps/100"}
    manifest = save_patterns(bundle_path, ps.per_class, ps.universal, ps.eps, training,
                             validation)
    return dict(manifest.extra["patterns"])
