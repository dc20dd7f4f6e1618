"""Universal perturbations: fixed patterns fitted once against a bundle's hasher.

``class_universal`` adds one pattern per class (label-conditioned); ``universal`` adds one
pattern to every image (label-free). They cost one addition at inference and are the floor a
trained generator has to beat: a generator that does no better has learned nothing about the
individual image. The patterns are fitted at bundle time (``hashaudit train patterns``) for a
grid of eps values and stored in the bundle (``extra.patterns`` in the manifest); a generator
trained on top of them (``base`` in its manifest entry, e.g. ``universal_gan``) adds a residual.

Which pattern a request gets (:meth:`PatternSet.delta`):

* eps: the pattern fitted for the smallest grid eps >= the requested eps;
* labels: the mean of the patterns of the query's classes (one class: its pattern; a
  multi-label query: the normalised sum of its classes' patterns);
* either way the result is rescaled so that its largest pixel change is exactly eps (a fitted
  pattern sits at +-eps almost everywhere, so for one class at a grid eps this changes nothing).
  A query with no label gets no perturbation from ``class_universal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from service.attacks.base import Attack, AttackInputError, register_attack


@dataclass
class PatternSet:
    """Fitted universal patterns of a bundle, float32.

    Attributes:
        eps: the fitted eps grid, ascending.
        per_class: (E, C, ch, H, W) one pattern per eps and class.
        universal: (E, ch, H, W) one label-free pattern per eps.
    """

    eps: list[float]
    per_class: torch.Tensor
    universal: torch.Tensor

    def to(self, device: torch.device | str) -> PatternSet:
        return PatternSet(list(self.eps), self.per_class.to(device), self.universal.to(device))

    def index(self, eps: float) -> int:
        """Grid position of the smallest fitted eps >= ``eps``."""
        for i, e in enumerate(self.eps):
            if e >= eps - 1e-6:
                return i
        raise AttackInputError(
            f"the bundle's universal patterns are fitted for eps up to {max(self.eps):.4f}; "
            f"asked for {eps:.4f}", field="eps")

    def delta(self, eps: float, labels: torch.Tensor | None) -> torch.Tensor:
        """The perturbation at ``eps``: (B, ch, H, W) for labels (B, C), else (1, ch, H, W)."""
        i = self.index(eps)
        if labels is None:
            s = self.universal[i].unsqueeze(0)
        else:
            y = labels.to(self.per_class.device, torch.float32)
            pats = self.per_class[i].flatten(1)
            s = (y @ pats / y.sum(1, keepdim=True).clamp_min(1.0)).view(
                len(y), *self.per_class.shape[2:])
        peak = s.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return s * (eps / peak)


def available_patterns(manifest: Any) -> bool:
    return bool(manifest.extra.get("patterns"))


class PatternAttack(Attack):
    """A fixed universal pattern added to the image (see the module docstring).

    Args:
        hasher: the victim (only checked, never run: the pattern was fitted against it).
        eps: L-inf budget, at most the largest fitted eps.
        patterns: the bundle's :class:`PatternSet` (``attack_for_bundle`` loads it).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels (B, num_classes) multi-hot.
    """

    iterative = False
    per_class: ClassVar[bool] = True

    def __init__(self, hasher: Any, eps: float, patterns: PatternSet | None = None,
                 **kw: Any) -> None:
        super().__init__(hasher, eps, **kw)
        if patterns is None:
            raise AttackInputError(f"{self.name} needs universal patterns fitted for this "
                                   "bundle (hashaudit train patterns)", field="method")
        patterns.index(self.eps)  # refuses an eps above the fitted grid
        self.patterns = patterns

    @classmethod
    def available(cls, manifest: Any) -> bool:
        return available_patterns(manifest)

    def perturb(self, x, labels, target, gen):
        d = self.patterns.delta(self.eps, labels if self.per_class else None)
        return x + d.to(x.device)


@register_attack("class_universal")
class ClassUniversal(PatternAttack):
    """One fixed pattern per class, fitted against the hasher (label-conditioned).

    Optimises nothing at inference: the pattern of the query's class was fitted once
    (``hashaudit train patterns``) by signed-gradient descent of the agreement between the
    relaxed adversarial code and the clean code over that class's training images. A
    multi-label query gets the normalised sum of its classes' patterns.

    Args:
        hasher: the frozen victim. eps: L-inf budget, at most the largest fitted eps.
        patterns: the bundle's :class:`PatternSet` (``attack_for_bundle`` loads it).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "class_universal", eps=8 / 255)
        >>> x_adv = atk(x, labels)
    """

    needs_labels = True


@register_attack("universal")
class Universal(PatternAttack):
    """One fixed pattern for every image, fitted against the hasher (label-free).

    Optimises nothing at inference: the pattern was fitted once (``hashaudit train
    patterns``) by signed-gradient descent of the agreement between the relaxed adversarial
    code and the clean code over all training images. Labels are ignored.

    Args:
        hasher: the frozen victim. eps: L-inf budget, at most the largest fitted eps.
        patterns: the bundle's :class:`PatternSet` (``attack_for_bundle`` loads it).

    Shape:
        x: (B, C, H, W) float in [0, 1].
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "universal", eps=8 / 255)
        >>> x_adv = atk(x)
    """

    per_class = False
