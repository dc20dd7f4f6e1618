"""Adversarial fine-tuning of a bundle's hasher (the ``harden`` audit type's training step).

After ATRDH (Wang et al., SIGIR 2021) and CgAT (Wang et al., "Center-Guided Adversarial
Training for Deep Hashing-Based Retrieval"): adversarial examples are made on the fly against
the hasher being trained, and the hasher is trained with its own recipe's hashing loss (and
classification term) to map them back among their class.

* ``pgd_center`` (CgAT's attack, the default): PGD away from the label's center code (the
  parent bundle's PrototypeNet code, else the majority vote of its database codes);
* ``pgd``: PGD away from the image's own clean code (no labels);
* a generator the parent bundle holds (``untargeted_gan_plus``, ...): one forward pass per
  batch, the cheap "fast adversarial training" variant. The generator was trained against the
  parent hasher and is not updated while the hasher moves.

Training starts from the parent hasher (fine-tuning, not from scratch): the memory bank of the
recipe's loss is primed with the parent's relaxed codes of the training set, each batch
replaces ``adv_fraction`` of its images by their adversarial versions (made in eval mode), the
bank keeps the clean images' codes (adversarial codes never enter it), and the learning rate
follows a cosine from ``lr`` to 0. With ``center_weight`` > 0 (the default), CgAT's center
term ``1 - <tanh(u_adv), c_y> / K`` also pulls each adversarial code toward its label's center
code (the anchor of ``pgd_center``). Attacks come from ``service.attacks`` (the same code the
audits run), built on the hasher in training.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.attacks import ATTACKS, create_attack
from service.attacks.factory import attack_for_bundle, bundle_context
from service.attacks.generator_attack import GeneratorAttack
from service.data.transforms import random_shift_flip
from service.errors import ConfigError
from service.store.bundle import Bundle
from service.training.hasher import HasherConfig
from service.training.losses import LOSSES, classification_loss

log = logging.getLogger(__name__)

PGD_ATTACKS = ("pgd_center", "pgd")


@dataclass
class HardenConfig:
    """One adversarial fine-tuning run (recorded in the hardened bundle's manifest)."""

    attack: str = "pgd_center"  # pgd_center, pgd, or a generator attack the bundle holds
    eps: float = 8 / 255
    steps: int = 5  # PGD steps per batch (generators: ignored)
    epochs: int = 1
    adv_fraction: float = 0.25  # share of each batch replaced by its adversarial version
    lr: float | None = None  # default: the recipe's learning rate / 20
    num_train: int | None = None  # seeded subset of the bundle's train split (None: all)
    # CgAT's center term: weight of 1 - <tanh(u_adv), c_y>/K, pulling each adversarial code
    # to its label's center code c_y (the parent's PrototypeNet code, else the database vote)
    center_weight: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def recipe_of(bundle: Bundle) -> HasherConfig:
    """The bundle's hasher recipe (``manifest.training.config.hasher``)."""
    try:
        return HasherConfig.from_dict(dict(bundle.manifest.training["config"]["hasher"]))
    except (KeyError, TypeError):
        raise ConfigError(f"{bundle.name} records no hasher recipe to fine-tune with",
                          field="model") from None


def training_attack(bundle: Bundle, hasher: Any, cfg: HardenConfig) -> Any:
    """The attack that makes the training batches' adversarial images: PGD on ``hasher``
    (the model in training), or the bundle's generator (which ignores the hasher)."""
    cls = ATTACKS.get(cfg.attack, field="attack")
    if issubclass(cls, GeneratorAttack):
        return attack_for_bundle(bundle, cfg.attack, cfg.eps, seed=cfg.seed)
    if cfg.attack not in PGD_ATTACKS:
        raise ConfigError(f"attack: {cfg.attack} cannot train; use pgd_center, pgd or one of "
                          "the bundle's generators", field="attack")
    kw: dict[str, Any] = {"steps": cfg.steps, "seed": cfg.seed}
    if cls.needs_context:
        kw["context"] = bundle_context(bundle)
    return create_attack(cfg.attack, hasher, cfg.eps, **kw)


def _bank_code(loss_fn: Any, u: torch.Tensor) -> torch.Tensor:
    """The relaxed code the loss keeps in its bank for outputs ``u`` (end of training)."""
    if hasattr(loss_fn, "beta"):  # HashNet: tanh(beta * u), beta at its final value
        return torch.tanh(loss_fn.beta(1.0) * u)
    if getattr(loss_fn, "activation", "tanh") == "none":
        return u
    return torch.tanh(u)


def _prime_bank(loss_fn: Any, hasher: Any, images: torch.Tensor, labels: torch.Tensor,
                dev: torch.device, batch: int = 512) -> None:
    """Fill the loss's memory bank with the parent's relaxed codes of every training image."""
    if not hasattr(loss_fn, "update_bank"):
        return
    hasher.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(dev).float() / 255
            idx = torch.arange(i, min(i + batch, len(images)), device=dev)
            loss_fn.update_bank(_bank_code(loss_fn, hasher(x)), labels[i:i + batch].to(dev),
                               idx)


def harden_hasher(
    bundle: Bundle, cfg: HardenConfig, images: np.ndarray, labels: np.ndarray,
    hook: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Fine-tune a copy of ``bundle``'s hasher adversarially on ``images`` (uint8) / ``labels``.

    ``hook`` is called every 10 steps and after each epoch with ``epoch``, ``epochs``, ``step``
    and ``steps`` (an exception it raises stops training: jobs use it for progress and cancel).
    Randomness derives from ``cfg.seed``. Returns the hardened hasher (eval mode, on the CPU,
    fp32) and the per-epoch history (losses, seconds, share of bits the attack flipped).
    """
    if cfg.epochs < 1:
        raise ConfigError("epochs: at least 1", field="epochs")
    recipe = recipe_of(bundle)
    dev = bundle.device
    torch.manual_seed(cfg.seed)
    hasher = copy.deepcopy(bundle.hasher).to(dev).set_precision("fp32")
    n = len(images)
    num_classes = labels.shape[1]
    loss_fn = LOSSES.create(recipe.loss, num_train=n, bits=recipe.bits, num_classes=num_classes,
                            **recipe.loss_kwargs).to(dev)
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(np.ascontiguousarray(labels)).float()
    _prime_bank(loss_fn, hasher, x_all, y_all, dev)
    attack = training_attack(bundle, hasher, cfg)
    centers = bundle_context(bundle) if cfg.center_weight > 0 else None
    pgd = cfg.attack in PGD_ATTACKS
    params = list(hasher.parameters())
    for p in params:
        p.requires_grad_(True)
    lr0 = cfg.lr if cfg.lr is not None else recipe.lr / 20
    opt = torch.optim.Adam(params, lr=lr0, weight_decay=recipe.weight_decay)
    bs = recipe.batch_size
    steps = math.ceil(n / bs)
    history: list[dict[str, Any]] = []
    for epoch in range(cfg.epochs):
        for g in opt.param_groups:
            g["lr"] = lr0 * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for step in range(steps):
            idx = order[step * bs:(step + 1) * bs]
            x = x_all[idx].to(dev).float().div_(255.0)
            if recipe.augment:
                x = random_shift_flip(x, gen, max_shift=recipe.max_shift, flip=recipe.flip)
            y = y_all[idx].to(dev)
            n_adv = round(cfg.adv_fraction * len(idx))
            if n_adv > 0:
                hasher.eval()
                if pgd:
                    for p in params:
                        p.requires_grad_(False)
                    attack.seed = cfg.seed * 1_000_003 + epoch * 10_007 + step
                xa = attack(x[:n_adv], y[:n_adv])
                with torch.no_grad():
                    u_clean = hasher(x[:n_adv])
                    u_adv = hasher(xa)
                    sums["bits_flipped"] = sums.get("bits_flipped", 0.0) + float(
                        (torch.sign(u_clean) != torch.sign(u_adv)).float().mean())
                x = torch.cat([xa, x[n_adv:]])
                for p in params:
                    p.requires_grad_(True)
            hasher.train()
            u = hasher(x)
            loss, parts = loss_fn(u, y, idx.to(dev), 1.0)
            if hasher.classifier is not None and recipe.cls_weight > 0:
                cls = classification_loss(hasher.classifier(torch.tanh(u)), y)
                loss = loss + recipe.cls_weight * cls
                parts["cls"] = cls.item()
            if centers is not None and n_adv > 0:
                c = centers.prototype_codes(y[:n_adv])
                center = (1.0 - (torch.tanh(u[:n_adv]) * c).mean(1)).mean()
                loss = loss + cfg.center_weight * center
                parts["center"] = center.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if n_adv > 0 and hasattr(loss_fn, "U"):
                # the bank stands for the training images' codes: keep the clean ones there
                # (after the backward pass, which reads it), so adversarial images are pulled
                # toward clean codes of their class and clean images never toward adversarial
                with torch.no_grad():
                    loss_fn.U[idx[:n_adv].to(dev)] = _bank_code(loss_fn, u_clean)
            parts["loss"] = loss.item()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if hook is not None and step % 10 == 0:
                hook({"epoch": epoch, "epochs": cfg.epochs, "step": step, "steps": steps})
        rec: dict[str, Any] = {k: v / steps for k, v in sums.items()}
        rec.update(epoch=epoch + 1, lr=opt.param_groups[0]["lr"],
                   seconds=time.perf_counter() - t0)
        log.info("harden epoch %d/%d %s", epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "epoch"))
        history.append(rec)
        if hook is not None:
            hook({"epoch": epoch + 1, "epochs": cfg.epochs, "step": 0, "steps": steps})
    hasher.eval()
    for p in params:
        p.requires_grad_(False)
    return hasher.cpu(), history
