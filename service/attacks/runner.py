"""One call to attack a batch of images with any registered method against a bundle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.attacks.base import Attack, to_uint8_within
from service.attacks.factory import attack_for_bundle
from service.nets.hasher import encode_uint8
from service.retrieval.codes import codes_to_hex


@dataclass
class AttackResult:
    """Adversarial uint8 images and what they do to the codes."""

    method: str
    eps: float
    adversarial: np.ndarray  # (B, C, H, W) uint8, within eps of the input
    clean_codes: np.ndarray  # (B, K) int8 +-1
    adv_codes: np.ndarray  # (B, K) int8 +-1
    hamming: np.ndarray  # (B,) distance clean code -> adversarial code
    linf: np.ndarray  # (B,) true per-image L-inf in [0, 1] units after uint8 rounding
    seconds: float  # wall time of the attack itself (excludes hashing the outputs)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. worst_case: members used

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"clean_code": codes_to_hex(c), "adv_code": codes_to_hex(a), "hamming": int(h),
             "linf": float(li), "linf_levels": round(float(li) * 255)}
            for c, a, h, li in zip(self.clean_codes, self.adv_codes, self.hamming, self.linf,
                                   strict=True)
        ]


def attack_batch(
    bundle: Any, method: str, eps: float, images: np.ndarray,
    labels: np.ndarray | None = None, target: np.ndarray | None = None, seed: int = 0,
    batch_size: int = 256, attack: Attack | None = None, **options: Any,
) -> AttackResult:
    """Attack uint8 images (B, C, H, W) already at the bundle's input size.

    The output is rounded to uint8 within eps of the input (what a user receives as PNG),
    and the codes are computed on those rounded images. ``attack``: an attack already built
    for this bundle, method, eps and seed (the server keeps a few); built here when None.
    """
    if attack is None:
        attack = attack_for_bundle(bundle, method, eps, seed=seed, **options)
    dev = bundle.device
    advs, t_attack = [], 0.0
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(dev).float() / 255.0
        y = None if labels is None else torch.from_numpy(labels[i:i + batch_size]).float()
        t = None if target is None else torch.from_numpy(target[i:i + batch_size]).float()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        xa = attack(x, y, t)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_attack += time.perf_counter() - t0
        advs.append(to_uint8_within(xa, x, eps).cpu().numpy())
    adv = np.concatenate(advs)
    # clean and adversarial codes in one forward pass (eval mode: rows do not interact)
    both = encode_uint8(bundle.hasher, np.concatenate([images, adv]))
    clean_c, adv_c = both[:len(images)], both[len(images):]
    ham = (clean_c != adv_c).sum(1)
    linf = np.abs(adv.astype(np.int16) - images.astype(np.int16)).reshape(len(adv), -1).max(1)
    extra = {"used": attack.used()} if hasattr(attack, "used") else {}
    return AttackResult(method, eps, adv, clean_c, adv_c, ham, linf / 255.0, t_attack, extra)
