"""Training a hasher on an in-memory image set, with resumable checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from service.data.base import ArrayImageSet
from service.data.transforms import random_shift_flip
from service.device import resolve_device
from service.errors import ConfigError
from service.nets import Hasher, build_hasher
from service.nets.hasher import encode_uint8
from service.precision import check_precision, resolve_precision
from service.training.checkpoint import load_checkpoint, save_checkpoint
from service.training.losses import LOSSES, classification_loss

log = logging.getLogger(__name__)


@dataclass
class HasherConfig:
    """Everything that defines a hasher training run (recorded in the bundle manifest)."""

    arch: str = "small_cnn"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    bits: int = 32
    loss: str = "dpsh"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    cls_weight: float = 1.0
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    max_shift: int = 2
    flip: bool = True
    seed: int = 0
    mean: list[float] = field(default_factory=lambda: [0.2860])
    std: list[float] = field(default_factory=lambda: [0.3530])
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16

    def __post_init__(self) -> None:
        check_precision(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HasherConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown hasher config keys: {sorted(unknown)}", field="hasher")
        return cls(**d)


def _cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def train_hasher(
    cfg: HasherConfig,
    train_set: ArrayImageSet,
    device: str = "auto",
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    hook: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Hasher, list[dict[str, Any]]]:
    """Train a hasher; resume from ``checkpoint_dir`` when it holds a checkpoint of ``cfg``.

    ``hook`` (if given) is called every 20 steps and after each epoch with ``epoch``,
    ``epochs``, ``step`` and ``steps``; an exception it raises stops training (jobs use it for
    progress and cancel).

    ``cfg.precision`` sets the hasher's forward precision while training (``auto``: bf16
    autocast and channels-last on CUDA, fp32 elsewhere); losses are computed in float32.
    Each history record names the precision its epoch ran in (``precision``).

    Randomness (init, shuffling, augmentation) derives from ``cfg.seed`` and the epoch number,
    so a resumed run continues exactly as an uninterrupted one would.

    Returns:
        The trained hasher (eval mode, on CPU, back in fp32) and the per-epoch history.
    """
    dev = resolve_device(device)
    precision = resolve_precision(cfg.precision, dev)
    torch.manual_seed(cfg.seed)
    n, c = len(train_set), train_set.images.shape[1]
    num_classes = train_set.labels.shape[1]
    hasher = build_hasher(
        cfg.arch, cfg.bits, num_classes=num_classes if cfg.cls_weight > 0 else 0,
        in_channels=c, mean=cfg.mean, std=cfg.std, arch_kwargs=cfg.arch_kwargs,
    ).to(dev).set_precision(precision)
    loss_fn = LOSSES.create(
        cfg.loss, num_train=n, bits=cfg.bits, num_classes=num_classes, **cfg.loss_kwargs
    ).to(dev)
    opt = torch.optim.Adam(hasher.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    modules = {"hasher": hasher, "loss": loss_fn}

    start_epoch, history = 0, []
    if checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, modules, opt, cfg.to_dict())
        if state is not None:
            start_epoch, history = state["epoch"], state["history"]
            log.info("resuming from %s at epoch %d", checkpoint_dir, start_epoch)

    images = torch.from_numpy(np.ascontiguousarray(train_set.images))
    labels = torch.from_numpy(np.ascontiguousarray(train_set.labels)).float()
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        hasher.train()
        lr = _cosine_lr(cfg.lr, epoch, cfg.epochs)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
            leave=False,
        )
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            # uint8 goes to the device and is converted there (4x fewer bytes to copy; the
            # augmentation draws its random numbers from ``gen`` on the CPU either way)
            x = images[idx].to(dev, non_blocking=True).float().div_(255.0)
            if cfg.augment:
                x = random_shift_flip(x, gen, max_shift=cfg.max_shift, flip=cfg.flip)
            y, idx_d = labels[idx].to(dev), idx.to(dev)
            u = hasher(x)
            prog = (epoch + step / steps_per_epoch) / cfg.epochs
            loss, parts = loss_fn(u, y, idx_d, prog)
            if hasher.classifier is not None:
                cls = classification_loss(hasher.classifier(torch.tanh(u)), y)
                loss = loss + cfg.cls_weight * cls
                parts["cls"] = cls.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            parts["loss"] = loss.item()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if step % 20 == 0:
                bar.set_postfix(loss=f"{parts['loss']:.4f}")
                if hook is not None:
                    hook({"epoch": epoch, "epochs": cfg.epochs, "step": step,
                          "steps": steps_per_epoch})
        rec: dict[str, Any] = {k: v / steps_per_epoch for k, v in sums.items()}
        rec.update(epoch=epoch + 1, lr=lr, seconds=time.perf_counter() - t0)
        log.info("epoch %d/%d %s %s", epoch + 1, cfg.epochs, precision,
                 " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k != "epoch"))
        rec["precision"] = precision
        history.append(rec)
        if hook is not None:
            hook({"epoch": epoch + 1, "epochs": cfg.epochs, "step": 0, "steps": steps_per_epoch})
        if checkpoint_dir is not None:
            save_checkpoint(
                checkpoint_dir, modules, opt,
                {"epoch": epoch + 1, "history": history, "config": cfg.to_dict()},
            )
    hasher.eval()
    return hasher.cpu().set_precision("fp32"), history


def encode(hasher: Hasher, images: np.ndarray | torch.Tensor, batch_size: int = 512,
           device: str | torch.device = "cpu", precision: str | None = None) -> np.ndarray:
    """Sign codes (N, K) int8 in {-1, +1} of uint8 images (N, C, H, W) on ``device``.

    ``precision`` (``auto``, ``fp32``, ``bf16``) overrides the hasher's own (fp32 unless set);
    the codes are signs of float32 outputs either way.
    """
    return encode_uint8(hasher.to(device), images, batch_size, precision)
