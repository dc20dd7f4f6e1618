"""Training label-conditioned attack generators against a bundle's frozen hasher.

Order (UntargetedGAN, Huang et al.): 1) PrototypeNet against the frozen hasher, then frozen;
2) decoder + generator + discriminator jointly. Loss of the generator (eq. 3):
``L = a*L_T + b*L_q + c*L_D`` with

* ``L_T`` = (1/K) h_q . h_adv  (h_q: prototype code of the query label, h_adv: the hasher's
  relaxed code of x + delta; minimising it pushes the adversarial code away from the label),
* ``L_q`` = ||x - x*||^2,
* ``L_D`` = ||D(x*) - [y, 1]||^2; the discriminator learns [y, 1] for real, [y, 0] for adv.

Variants (the registry names of the resulting attacks):
* ``untargeted_gan`` (paper): h_adv = tanh(u), h_q the continuous prototype code,
  a = b = c = 1. L_q is read as the mean squared error over pixels (``F.mse_loss``'s default,
  as GAN attack code usually computes it); summed over pixels it outweighs L_T by orders of
  magnitude and the generator learns no perturbation at all (measured here).
* ``untargeted_gan_plus``: h_adv = tanh(s*u) with s = 1/mean|u(x)| per image, so the term is not
  flat where a trained hasher's outputs sit (|u| >> 1 saturates tanh and starves the
  gradient); h_q = sign of the prototype code; only bits still on the prototype's side count
  (a flipped bit stops pulling budget); c = 0.1.

* ``universal_gan``: an image-only generator (no PrototypeNet, no decoder) whose output is a
  residual on top of the bundle's class pattern (``base = "class_pattern"``), trained with the
  own-code hashing term alone (a = 1, b = c = 0).

All are trained over a range of eps: each batch draws eps in [eps_min, eps_max] and the
generator's tanh output is scaled by it, so one generator serves every eps in the range.

Pattern base (``base``): ``class_pattern`` (label-conditioned variants) or
``universal_pattern`` (``uaa_gan``) trains the generator as a residual on the bundle's
universal pattern at the batch's eps, delta = clip(P + G(x), -eps, eps)
(:mod:`service.attacks.universal`; patterns are fitted first if the bundle has none). The
generator's last layer starts at zero, so epoch 0 *is* the pattern.

Checkpoint selection (``val_num`` > 0): a validation split taken from the bundle's training
images (never the test queries; :func:`service.training.patterns.validation_split`) is held
out of training; the generator is scored on it before training and after every epoch at
``val_eps`` (mAP@all after uint8 rounding, t-MAP for ``targeted_gan``), and the best epoch is
kept (with a base: the best among epochs no worse than the pattern at every validation eps),
with early stopping after ``patience`` epochs without improvement. The curve goes into the
manifest entry (``training.validation``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from service.attacks.base import scale_for
from service.device import resolve_device
from service.errors import ConfigError
from service.nets import create_net
from service.nets.gan import small_shapes
from service.nets.hasher import encode_uint8
from service.precision import (
    as_batch,
    autocast,
    check_precision,
    resolve_precision,
    to_memory_format,
)
from service.store.bundle import Bundle, load_bundle
from service.store.generator_parts import save_generator, save_prototype
from service.training.checkpoint import load_checkpoint, save_checkpoint
from service.training.losses import _pairwise_nll
from service.training.patterns import (
    DEFAULT_VAL_EPS,
    PatternConfig,
    Validator,
    fit_patterns,
    subset,
    validation_split,
)

log = logging.getLogger(__name__)

VARIANTS = ("untargeted_gan", "untargeted_gan_plus", "uaa_gan", "targeted_gan", "saliency_gan",
            "universal_gan")
LABEL_FREE = ("uaa_gan",)
TARGETED = ("targeted_gan",)
IMAGE_ONLY = ("uaa_gan", "universal_gan")  # generators that see the image alone
BASES = ("class_pattern", "universal_pattern")


@dataclass
class PrototypeConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    feature_dim: int = 512
    hidden: int = 1024
    seed: int = 0


@dataclass
class GeneratorConfig:
    """A generator training run (recorded in the manifest entry)."""

    attack: str = "untargeted_gan_plus"
    eps_min: float = 2 / 255
    eps_max: float = 0.1
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-4
    d_lr: float = 2e-4
    weight_t: float | None = None  # a (default per variant)
    weight_q: float | None = None  # b
    weight_d: float | None = None  # c
    width: int = 16
    blocks: int = 6
    norm: str = "batch"
    num_train: int | None = 10000
    anchor: str = "prototype"  # plus variant: "prototype" (label code) or "own" (clean code)
    skips: bool = False  # U-Net skips in the generator (not in the paper)
    diversity: float = 0.0  # weight of mean cosine similarity of same-label perturbations
    distill: float = 0.0  # weight of ||delta/eps - (-sign grad L_T(x))||^2 (FGSM direction)
    margin: float = 0.5  # uaa_gan: triplet margin on the relaxed-code distance (range 0..4)
    cam_weight: float = 0.5  # saliency_gan: lambda of L_cam = -||CAM(x) - CAM(x_adv)||_2
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast + channels-last on CUDA, fp32 else), fp32, bf16
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    base: str | None = None  # "class_pattern" / "universal_pattern": residual on the pattern
    val_num: int = 1000  # validation images held out of the train split (0: keep the last)
    val_eps: list[float] = field(default_factory=lambda: list(DEFAULT_VAL_EPS))
    patience: int = 3  # epochs without a better validation score before stopping (0: never)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.attack == "universal_gan" and self.base is None:
            self.base = "class_pattern"
        if self.base is not None and self.base not in BASES:
            raise ConfigError(f"base must be one of {BASES} or empty", field="base")
        if self.base == "class_pattern" and self.attack in LABEL_FREE:
            raise ConfigError(f"{self.attack} sees no labels: its base can only be "
                              "universal_pattern", field="base")
        if self.base == "universal_pattern" and self.attack not in LABEL_FREE:
            raise ConfigError(f"{self.attack} is label-conditioned: its base is class_pattern",
                              field="base")
        if self.attack == "universal_gan" and self.base != "class_pattern":
            raise ConfigError("universal_gan is a residual on the class pattern", field="base")
        if self.base and self.attack in TARGETED:
            raise ConfigError("the patterns are untargeted; targeted_gan takes no base",
                              field="base")
        if not 0 <= self.val_num <= 100_000:
            raise ConfigError("val_num must be in 0..100000", field="val_num")
        if not 0 <= self.patience <= 1000:
            raise ConfigError("patience must be in 0..1000", field="patience")
        self.val_eps = [float(e) for e in self.val_eps]
        if self.val_num and not self.val_eps:
            raise ConfigError("validation needs at least one eps", field="val_eps")

    def weights(self) -> tuple[float, float, float]:
        """(a, b, c): hashing/metric term, reconstruction, GAN term."""
        if self.attack == "universal_gan":  # the pattern's objective, nothing else
            return (self.weight_t if self.weight_t is not None else 1.0,
                    self.weight_q if self.weight_q is not None else 0.0,
                    self.weight_d if self.weight_d is not None else 0.0)
        if self.attack in LABEL_FREE:  # UAA-GAN: lambda_m, lambda_r, LSGAN weight
            return (self.weight_t if self.weight_t is not None else 1.0,
                    self.weight_q if self.weight_q is not None else 0.01,
                    self.weight_d if self.weight_d is not None else 0.1)
        paper = self.attack == "untargeted_gan"
        a = self.weight_t if self.weight_t is not None else 1.0
        b = self.weight_q if self.weight_q is not None else 1.0
        c = self.weight_d if self.weight_d is not None else (1.0 if paper else 0.1)
        return a, b, c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _train_images(bundle: Bundle, num: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundle's hasher-training images, read through its data source (format-1 bundles:
    from the gallery, which holds them)."""
    images, labels = bundle.train_split(num, seed)
    if len(images) == 0:
        raise ConfigError("the bundle's train split is not in its gallery", field="bundle")
    return torch.from_numpy(images), torch.from_numpy(labels).float()


def train_prototype(bundle: Bundle, images: torch.Tensor, labels: torch.Tensor,
                    cfg: PrototypeConfig, dev: torch.device, progress: bool) -> tuple[Any, dict]:
    """Fit PrototypeNet so a label's code is close to the hasher codes of images with it.

    Pairwise likelihood (DPSH form) between prototype codes of batch labels and the frozen
    hasher's codes of all training images, plus quantisation and label reconstruction.
    """
    torch.manual_seed(cfg.seed)
    bits, c = bundle.manifest.bits, labels.shape[1]
    arch = {"num_classes": c, "bits": bits, "feature_dim": cfg.feature_dim, "hidden": cfg.hidden}
    proto = create_net("prototype_net", **arch).to(dev)
    codes = torch.from_numpy(encode_uint8(bundle.hasher, images)).float().to(dev)
    labels_d = labels.to(dev)
    opt = torch.optim.Adam(proto.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for _step in tqdm(range(cfg.steps), desc="prototype", disable=not progress, leave=False):
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=gen).to(dev)
        y = labels_d[idx]
        out = proto(y)
        s = ((y @ labels_d.t()) > 0).float()
        theta = 0.5 * out["code"] @ codes.t() * (32.0 / bits)
        loss = (_pairwise_nll(theta, s).mean()
                + 0.1 * (out["code"] - out["code"].sign()).pow(2).mean()
                + F.binary_cross_entropy_with_logits(out["logits"], y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    proto.eval().requires_grad_(False)
    # How well prototypes stand for their class: mean Hamming distance to own vs other codes.
    with torch.no_grad():
        h = torch.where(proto(labels_d)["code"] >= 0, 1.0, -1.0)
        d_own = ((bits - (h * codes).sum(1)) / 2).mean().item()
    rec = {"config": dataclasses.asdict(cfg), "final_loss": loss.item(),
           "mean_hamming_to_own_codes": d_own, "seconds": round(time.perf_counter() - t0, 1)}
    log.info("prototype: loss %.4f, mean Hamming to own codes %.2f", loss.item(), d_own)
    return proto, {"arch": arch, "training": rec}


def _hash_term(cfg: GeneratorConfig, u: torch.Tensor, h_q: torch.Tensor, u0: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    k = u.shape[1]
    if cfg.attack == "untargeted_gan":
        return (h_q * torch.tanh(u)).sum(1).mean() / k
    if cfg.attack in TARGETED:
        # pull toward the target prototype; only bits that do not match it yet count
        anchor = torch.where(h_q >= 0, 1.0, -1.0)
        miss = (anchor * u <= 0).float().detach()
        return -(miss * anchor * torch.tanh(scale * u)).sum(1).mean() / k
    own = cfg.anchor == "own" or h_q is None  # universal_gan has no prototype: own code
    anchor = torch.where((u0 if own else h_q) >= 0, 1.0, -1.0)
    agree = (anchor * u > 0).float().detach()
    return (agree * anchor * torch.tanh(scale * u)).sum(1).mean() / k


def _metric_term(u0: torch.Tensor, u: torch.Tensor, scale: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """UAA-GAN: max(d(f_x, f_x') + m - d(f_x, f_adv), 0) with x' the hardest negative.

    f = tanh(scale * u) (relaxed codes), d = mean squared difference (0..4); x' is the other
    batch image whose code is nearest to x's (online hard-negative mining in the batch).
    """
    f_x = torch.tanh(scale * u0)
    f_adv = torch.tanh(scale * u)
    d_adv = (f_x - f_adv).pow(2).mean(1)
    d_all = torch.cdist(f_x, f_x).pow(2) / f_x.shape[1]
    d_all = d_all + torch.eye(len(f_x), device=f_x.device) * 1e6
    d_neg = d_all.min(1).values
    return F.relu(d_neg + margin - d_adv).mean()


def _extra_terms(cfg: GeneratorConfig, hasher: Any, x: torch.Tensor, x_adv: torch.Tensor,
                 y: torch.Tensor, delta: torch.Tensor, eps: float, p: dict[str, torch.Tensor],
                 u0: torch.Tensor, scale: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
    """Optional terms of the label-conditioned variants: {history name: (value, weight)}."""
    out: dict[str, tuple[torch.Tensor, float]] = {}
    if cfg.diversity > 0:
        # Against class-universal perturbations: same-label pairs should differ.
        dn = F.normalize(delta.flatten(1), dim=1)
        same = ((y @ y.t()) > 0).float()
        same.fill_diagonal_(0)
        out["l_div"] = ((dn @ dn.t() * same).sum() / same.sum().clamp(min=1), cfg.diversity)
    if cfg.attack == "saliency_gan" and cfg.cam_weight > 0:
        # Grad-CAM difference: move the hasher's attention away from where it was
        from service.nets.saliency import cam_distance, gradcam

        ref = torch.where(u0 >= 0, 1.0, -1.0)
        with torch.no_grad():
            cam_x = gradcam(hasher, x, ref, scale)
        cam_adv = gradcam(hasher, x_adv, ref, scale, differentiable=True)
        out["l_cam"] = (-cam_distance(cam_x, cam_adv).mean(), cfg.cam_weight)
    if cfg.distill > 0 and p is not None:
        # Teacher: the one-step (FGSM) descent direction of the hashing term at x.
        xg = x.clone().requires_grad_(True)
        lt_x = _hash_term(cfg, hasher(xg), p["code"], u0, scale)
        (grad,) = torch.autograd.grad(lt_x, xg)
        out["l_distill"] = ((delta / eps + torch.sign(grad)).pow(2).mean(), cfg.distill)
    return out


def random_targets(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random target class per row among the classes the row does not have."""
    scores = torch.rand(labels.shape, generator=gen).to(labels.device) * (1 - labels)
    return F.one_hot(scores.argmax(1), labels.shape[1]).float()


def train_generator(
    bundle_path: Path, cfg: GeneratorConfig, device: str = "auto",
    checkpoint_dir: Path | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Train (PrototypeNet if missing, then) decoder + generator + discriminator; save them.

    ``cfg.precision``: forward passes of the networks and the frozen hasher run under bf16
    autocast (channels-last on CUDA) or in fp32; losses, the perturbation and the adversarial
    image are float32. The precision used is recorded in the entry's ``training.precision``.

    Returns the manifest entry of the new generator.
    """
    if cfg.attack not in VARIANTS:
        raise ConfigError(f"unknown generator attack {cfg.attack!r}; known: {VARIANTS}",
                          field="attack")
    if cfg.anchor not in ("prototype", "own"):
        raise ConfigError("anchor must be 'prototype' or 'own'", field="anchor")
    if not 0 < cfg.eps_min <= cfg.eps_max <= 1:
        raise ConfigError("need 0 < eps_min <= eps_max <= 1", field="eps")
    dev = resolve_device(device)
    precision = resolve_precision(cfg.precision, dev)
    bundle = load_bundle(bundle_path, dev)
    patterns = None
    if cfg.base:
        info = bundle.manifest.extra.get("patterns")
        if not info or max(info["eps"]) < cfg.eps_max - 1e-9:
            grid = sorted({*PatternConfig().eps, cfg.eps_max})
            grid = [e for e in grid if e <= cfg.eps_max + 1e-9]
            log.info("%s: fitting the bundle's universal patterns first (eps %s)",
                     bundle.name, [round(e, 4) for e in grid])
            fit_patterns(bundle_path, PatternConfig(eps=grid, val_num=cfg.val_num,
                                                    val_eps=cfg.val_eps, seed=cfg.seed),
                         device=str(dev), progress=progress)
            bundle = load_bundle(bundle_path, dev)
        patterns = bundle.patterns()
    hasher = bundle.hasher.set_precision(precision)
    cl = hasher.channels_last
    m = bundle.manifest
    validator: Validator | None = None
    if cfg.val_num > 0:
        train_pos, val_pos = validation_split(bundle, cfg.val_num, 0)
        val_eps = [e for e in cfg.val_eps if cfg.eps_min - 1e-9 <= e <= cfg.eps_max + 1e-9]
        if len(val_pos) and val_eps:
            validator = Validator(bundle, val_pos, val_eps, targeted=cfg.attack in TARGETED,
                                  seed=cfg.seed)
        images_np, labels_np = bundle.images_at(subset(train_pos, cfg.num_train, cfg.seed))
        images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np).float()
    else:
        images, labels = _train_images(bundle, cfg.num_train, cfg.seed)
    label_free = cfg.attack in LABEL_FREE
    image_only = cfg.attack in IMAGE_ONLY
    proto = None if image_only else bundle.prototype()
    if proto is None and not image_only:
        proto, info = train_prototype(bundle, images, labels, cfg.prototype, dev, progress)
        save_prototype(bundle_path, proto.cpu(), info["arch"], info["training"])
        proto = proto.to(dev)
    inp = m.input
    shapes = small_shapes(inp["channels"], inp["height"], inp["width"], labels.shape[1],
                          m.bits, width_mult=cfg.width)
    shapes["perturbation_generator"].update(blocks=cfg.blocks, norm=cfg.norm)
    if cfg.skips:
        shapes["perturbation_generator"]["skips"] = True
    if image_only:  # image only; the discriminator scores real/fake (LSGAN), no labels
        shapes["perturbation_generator"]["cond_channels"] = 0
    if label_free:
        shapes["label_discriminator"]["num_classes"] = 0
    torch.manual_seed(cfg.seed)
    decoder = (None if image_only
               else create_net("label_decoder", **shapes["label_decoder"]).to(dev))
    generator = create_net("perturbation_generator", **shapes["perturbation_generator"]).to(dev)
    disc = create_net("label_discriminator", **shapes["label_discriminator"]).to(dev)
    if cfg.base:  # start from the pattern itself: the residual's last layer outputs 0
        torch.nn.init.zeros_(generator.out.weight)
        torch.nn.init.zeros_(generator.out.bias)
    for mod_ in (decoder, generator, disc):
        if mod_ is not None:
            to_memory_format(mod_, cl)

    def fwd(module: Any, *args: Any) -> torch.Tensor:
        """``module(*args)`` in the training precision; float32 out."""
        with autocast(precision, dev):
            return module(*(as_batch(a, cl) if isinstance(a, torch.Tensor) else a
                            for a in args)).float()

    def with_base(delta: torch.Tensor, eps: float, y: torch.Tensor | None) -> torch.Tensor:
        if patterns is None:
            return delta
        base = patterns.delta(eps, y if cfg.base == "class_pattern" else None)
        return (base + delta).clamp(-eps, eps)

    g_params = [*generator.parameters()] + ([] if decoder is None else [*decoder.parameters()])
    opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))
    a, b, c = cfg.weights()

    modules = {"generator": generator, "disc": disc}
    if decoder is not None:
        modules["decoder"] = decoder
    kept = {k: v for k, v in modules.items() if k != "disc"}  # what the bundle stores
    best_mods = {f"best_{k}": copy.deepcopy(v) for k, v in kept.items()}

    def validate() -> dict[str, float]:
        assert validator is not None
        for mod in kept.values():
            mod.eval()

        def perturb(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
            scale_eps = min(max(eps, cfg.eps_min), cfg.eps_max)
            cond = None
            if decoder is not None:
                cond = fwd(decoder, proto(t if cfg.attack in TARGETED else y)["feature"])
            delta = with_base(fwd(generator, x, cond, scale_eps), eps, y)
            return x + delta

        figs = validator.figures(perturb)
        for mod in modules.values():
            mod.train()
        return figs

    start, history = 0, []
    val: dict[str, Any] = {}
    if checkpoint_dir is not None:
        both = _Pair(opt_g, opt_d)
        ck_mods = {**modules, **(best_mods if validator is not None else {})}
        state = load_checkpoint(checkpoint_dir, ck_mods, both, cfg.to_dict())  # type: ignore
        if state is not None:
            start, history = state["epoch"], state["history"]
            val = state.get("validation", {})
    if validator is not None and not val:
        figs = validate()
        val = {"metric": validator.metric, "num": len(validator), "split_seed": 0,
               "eps": validator.eps, "reference": figs if cfg.base else None,
               "curve": [{"epoch": 0, "figures": figs, "loss": validator.loss(figs)}],
               "best_epoch": 0, "best_loss": validator.loss(figs)}
        log.info("%s validation before training (%s): %s", cfg.attack, validator.metric, figs)
    n = len(images)
    steps = math.ceil(n / cfg.batch_size)
    log_lo, log_hi = math.log(cfg.eps_min), math.log(cfg.eps_max)
    t_all = time.perf_counter()
    stopped_early = False
    for epoch in range(start, cfg.epochs):
        if validator is not None and cfg.patience and \
                epoch - val["best_epoch"] >= cfg.patience:
            stopped_early = True
            log.info("%s: no better validation score for %d epochs; stopping", cfg.attack,
                     cfg.patience)
            break
        for mod in modules.values():
            mod.train()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        order = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=f"{cfg.attack} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = images[idx].to(dev).float() / 255.0
            y = labels[idx].to(dev)
            eps = math.exp(log_lo + (log_hi - log_lo) * torch.rand(1, generator=gen).item())
            with torch.no_grad():
                cond_labels = random_targets(y, gen) if cfg.attack in TARGETED else y
                p = None if image_only else proto(cond_labels)
                u0 = hasher(x)
                scale = scale_for(u0)
            cond = None if p is None else fwd(decoder, p["feature"])
            delta = with_base(fwd(generator, x, cond, eps), eps, y)
            x_adv = (x + delta).clamp(0, 1)
            if label_free:
                # UAA-GAN: LSGAN, L2 reconstruction, hard-negative metric term
                d_loss = ((fwd(disc, x) - 1).pow(2).mean()
                          + fwd(disc, x_adv.detach()).pow(2).mean())
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
                u = hasher(x_adv)
                l_t = _metric_term(u0, u, scale, cfg.margin)
                l_q = (x_adv - x).flatten(1).norm(dim=1).mean()
                l_d = (fwd(disc, x_adv) - 1).pow(2).mean()
                names = ("l_metric", "l_recon", "l_gan")
            else:
                real_t = torch.cat([y, torch.ones_like(y[:, :1])], 1)
                fake_t = torch.cat([y, torch.zeros_like(y[:, :1])], 1)
                if c > 0:
                    d_loss = ((fwd(disc, x) - real_t).pow(2).sum(1).mean()
                              + (fwd(disc, x_adv.detach()) - fake_t).pow(2).sum(1).mean())
                    opt_d.zero_grad()
                    d_loss.backward()
                    opt_d.step()
                else:
                    d_loss = torch.zeros(())
                u = hasher(x_adv)
                l_t = _hash_term(cfg, u, None if p is None else p["code"], u0, scale)
                l_q = (x_adv - x).pow(2).mean()
                l_d = ((fwd(disc, x_adv) - real_t).pow(2).sum(1).mean() if c > 0
                       else torch.zeros(()))
                names = ("l_t", "l_q", "l_d")
            loss = a * l_t + b * l_q + c * l_d
            if not label_free:
                for k_, (v_, w_) in _extra_terms(cfg, hasher, x, x_adv, y, delta, eps, p,
                                                 u0, scale).items():
                    loss = loss + w_ * v_
                    sums[k_] = sums.get(k_, 0.0) + v_.item()
            opt_g.zero_grad()
            loss.backward()
            opt_g.step()
            with torch.no_grad():
                flipped = ((torch.sign(u) != torch.sign(u0)).float().mean()).item()
            for k_, v_ in (*zip(names, (l_t.item(), l_q.item(), l_d.item()), strict=True),
                           ("d_loss", d_loss.item()), ("bits_flipped", flipped)):
                sums[k_] = sums.get(k_, 0.0) + v_
            if step % 20 == 0:
                bar.set_postfix({names[0]: f"{l_t.item():.3f}", "flipped": f"{flipped:.2f}"})
        rec = {k_: v_ / steps for k_, v_ in sums.items()}
        rec.update(epoch=epoch + 1, seconds=time.perf_counter() - t0)
        if validator is not None:
            figs = validate()
            score = validator.loss(figs)
            ok = val["reference"] is None or all(
                figs[k] <= v + 1e-12 for k, v in val["reference"].items())
            val["curve"].append({"epoch": epoch + 1, "figures": figs, "loss": score,
                                 "admissible": ok})
            if ok and score < val["best_loss"]:
                val["best_epoch"], val["best_loss"] = epoch + 1, score
                for k, mod in kept.items():
                    best_mods[f"best_{k}"].load_state_dict(mod.state_dict())
            rec["val"] = figs
        history.append(rec)
        log.info("%s epoch %d/%d %s", cfg.attack, epoch + 1, cfg.epochs,
                 " ".join(f"{k_}={v_:.4g}" for k_, v_ in rec.items()
                          if k_ not in ("epoch", "val")))
        if validator is not None:
            log.info("%s validation (%s): %s; best epoch %d", cfg.attack, validator.metric,
                     rec["val"], val["best_epoch"])
        if checkpoint_dir is not None:
            ck_mods = {**modules, **(best_mods if validator is not None else {})}
            save_checkpoint(checkpoint_dir, ck_mods, _Pair(opt_g, opt_d),  # type: ignore
                            {"epoch": epoch + 1, "history": history, "config": cfg.to_dict(),
                             "validation": val})
    if validator is not None:
        # keep the best epoch (epoch 0: the untrained start, which with a base is the pattern)
        for k, mod in kept.items():
            mod.load_state_dict(best_mods[f"best_{k}"].state_dict())
        val["selected"] = "best"
        val["stopped_early"] = stopped_early
    generator.eval()
    to_memory_format(generator, False)
    arch = {"perturbation_generator": shapes["perturbation_generator"]}
    if decoder is not None:
        decoder.eval()
        to_memory_format(decoder, False)
        arch["label_decoder"] = shapes["label_decoder"]
    training = {"config": cfg.to_dict(), "history": history, "train_images": n,
                "seconds": round(time.perf_counter() - t_all, 1), "device": str(dev),
                "precision": precision, "eps_range": [cfg.eps_min, cfg.eps_max]}
    if validator is not None:
        training["validation"] = val
    manifest = save_generator(bundle_path, cfg.attack, cfg.eps_max,
                              None if decoder is None else decoder.cpu(), generator.cpu(), arch,
                              training, {}, base=cfg.base)
    return next(g for g in manifest.generators
                if g["attack"] == cfg.attack and abs(g["eps"] - cfg.eps_max) < 1e-9)


class _Pair:
    """Two optimizers checkpointed as one (state dicts keyed by g./d.)."""

    def __init__(self, g: torch.optim.Optimizer, d: torch.optim.Optimizer) -> None:
        self.g, self.d = g, d

    def state_dict(self) -> dict[str, Any]:
        sg, sd = self.g.state_dict(), self.d.state_dict()
        state = {f"g{k}": v for k, v in sg["state"].items()}
        state.update({f"d{k}": v for k, v in sd["state"].items()})
        return {"state": state, "param_groups": {"g": sg["param_groups"],
                                                 "d": sd["param_groups"]}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for name, opt in (("g", self.g), ("d", self.d)):
            st = {int(str(k)[1:]): v for k, v in sd["state"].items() if str(k).startswith(name)}
            opt.load_state_dict({"state": st, "param_groups": sd["param_groups"][name]})
