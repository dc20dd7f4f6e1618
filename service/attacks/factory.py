"""Build any registered attack for a loaded bundle."""

from __future__ import annotations

from typing import Any

import torch

from service.attacks.base import ATTACKS, Attack, AttackContext
from service.attacks.generator_attack import GeneratorAttack
from service.attacks.universal import PatternAttack


def bundle_context(bundle: Any) -> AttackContext:
    """Database codes/labels and PrototypeNet of a bundle, on its device (made once per
    loaded bundle and kept with it, :meth:`service.store.Bundle.cached`)."""

    def build() -> AttackContext:
        dev = bundle.device
        return AttackContext(
            torch.from_numpy(bundle.gallery.codes(bundle.manifest.bits)).float().to(dev),
            torch.from_numpy(bundle.gallery.labels).float().to(dev),
            bundle.prototype(),
        )

    return bundle.cached("attack_context", build)


def attack_for_bundle(bundle: Any, method: str, eps: float, seed: int = 0,
                      **options: Any) -> Attack:
    """Instantiate ``method`` against ``bundle``'s hasher (generators come from the bundle)."""
    cls = ATTACKS.get(method, field="method")
    kw: dict[str, Any] = dict(options)
    if issubclass(cls, GeneratorAttack):
        kw["parts"] = bundle.generator_parts(method, eps)
    if issubclass(cls, PatternAttack):
        kw["patterns"] = bundle.patterns()
    if cls.needs_context or cls.needs_labels:
        kw.setdefault("context", bundle_context(bundle))
    hook = getattr(cls, "bundle_kwargs", None)  # attacks built from other attacks
    if hook is not None:
        kw.update(hook(bundle, eps, seed, options))
    return cls(bundle.hasher, eps, seed=seed, **kw)
