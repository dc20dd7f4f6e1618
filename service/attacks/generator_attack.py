"""Generator attacks: one forward pass of a trained perturbation generator.

``untargeted_gan`` (UntargetedGAN, Huang et al.: the paper's loss) and
``untargeted_gan_plus`` (same networks, a training loss whose hashing term does not saturate)
share this inference code: PrototypeNet label feature -> decoder label map -> generator
perturbation (tanh scaled by the generator's trained eps) -> projection to the requested eps.
``uaa_gan`` (UAA-GAN, label-free) runs the generator on the image alone; ``targeted_gan``
(ProS-GAN style) conditions the same networks on the *target* label. ``universal_gan`` is an
image-only generator whose output is a residual on top of the query's class pattern
(:mod:`service.attacks.universal`).

A generator entry with ``base`` in its manifest entry (``class_pattern`` or
``universal_pattern``) was trained as a residual on top of the bundle's fitted pattern:
delta = clip(P(eps, labels) + G(x), -eps, eps). Its last layer starts at zero, so training
starts from the pattern itself, and best-checkpoint selection on validation keeps it at
least as strong as the pattern there.
The trained parts come from the bundle (:meth:`service.store.Bundle.generator_parts`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.attacks.base import Attack, AttackInputError, register_attack
from service.precision import as_batch, autocast, to_memory_format


class GeneratorAttack(Attack):
    """Generator attack: one forward pass of a trained perturbation generator.

    Optimises nothing at inference: the generator was trained against this hasher
    (``hashaudit train generator``); its tanh output is scaled by the requested eps (within
    the eps range it was trained over) and projected onto the eps ball.

    Args:
        hasher: the frozen victim. eps: L-inf budget, at most the generator's trained eps.
        parts: PrototypeNet, label decoder and generator from the bundle
            (``attack_for_bundle`` loads them with ``bundle.generator_parts``).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels, target: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "untargeted_gan", eps=8 / 255)
        >>> x_adv = atk(x, labels)
    """

    needs_labels = True
    iterative = False
    conditional = True  # the generator sees a decoded label map (False: image only)

    def __init__(self, hasher: Any, eps: float, parts: dict[str, Any] | None = None,
                 **kw: Any) -> None:
        super().__init__(hasher, eps, **kw)
        if parts is None:
            raise AttackInputError(
                f"{self.name} needs a generator trained for this bundle "
                "(hashaudit train generator)", field="method")
        self.prototype: nn.Module | None = parts["prototype"]
        self.decoder: nn.Module | None = parts["decoder"]
        if self.conditional and (self.prototype is None or self.decoder is None):
            raise AttackInputError(f"{self.name} needs a PrototypeNet and a label decoder",
                                   field="method")
        self.generator: nn.Module = parts["generator"].eval()
        self.base: str | None = parts["entry"].get("base")
        self.patterns = parts.get("patterns")
        if self.base and self.patterns is None:
            raise AttackInputError(f"{self.name} was trained on the bundle's universal "
                                   "patterns, which it lacks", field="method")
        self.trained_eps = float(parts["eps"])
        lo = parts["entry"].get("training", {}).get("eps_range", [self.trained_eps])[0]
        # Generators trained over an eps range scale their tanh output by the requested eps;
        # below the range they use its lower end and the projection cuts to the request.
        self.scale_eps = min(max(self.eps, float(lo)), self.trained_eps)
        if self.eps > self.trained_eps + 1e-9:
            raise AttackInputError(
                f"{self.name} was trained for eps <= {self.trained_eps:.4f}; "
                f"asked for {self.eps:.4f}", field="eps")
        for m in (self.prototype, self.decoder, self.generator):
            if m is not None:
                m.eval().requires_grad_(False)
        # The generator runs in the victim's precision (bf16 on CUDA: channels-last too).
        self.channels_last = self.hasher.channels_last
        for m in (self.decoder, self.generator):
            if m is not None:
                to_memory_format(m, self.channels_last)

    @classmethod
    def available(cls, manifest: Any) -> bool:
        return any(g["attack"] == cls.name for g in manifest.generators)

    def label_maps(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoded label maps; each distinct label set in the batch is decoded once."""
        uniq, inverse = torch.unique(labels, dim=0, return_inverse=True)
        maps = self.decoder(self.prototype(uniq)["feature"])
        return maps[inverse]

    def perturb(self, x, labels, target, gen):
        with torch.inference_mode(), autocast(self.precision, x.device):
            cond = (self.label_maps(target if self.targeted else labels)
                    if self.conditional else None)
            delta = self.generator(as_batch(x, self.channels_last), cond, self.scale_eps)
        delta = delta.float()
        if self.base:
            base = self.patterns.delta(
                self.eps, labels if self.base == "class_pattern" else None).to(x.device)
            delta = (base + delta).clamp(-self.eps, self.eps)
        return (x + delta).clone()


@register_attack("untargeted_gan")
class UntargetedGAN(GeneratorAttack):
    """UntargetedGAN (Huang et al.), trained with the paper's loss (eqs. 3-6): the generator,
    conditioned on the decoded label map of the query's labels, pushes the code away from the
    label's prototype code. Arguments, shapes and use as :class:`GeneratorAttack`."""


@register_attack("untargeted_gan_plus")
class UntargetedGANPlus(GeneratorAttack):
    """UntargetedGAN networks trained with the non-saturating hashing term (u rescaled by its
    typical magnitude, only bits not flipped yet counted). Arguments, shapes and use as
    :class:`GeneratorAttack`."""


@register_attack("saliency_gan")
class SaliencyGAN(GeneratorAttack):
    """UntargetedGAN+ networks trained with an extra Grad-CAM difference term, so that the
    perturbation moves the hasher's saliency and transfers to unseen hashers. Arguments,
    shapes and use as :class:`GeneratorAttack`."""


@register_attack("uaa_gan")
class UAAGAN(GeneratorAttack):
    """UAA-GAN, label-free: the generator sees the image alone (trained with LSGAN +
    reconstruction + a hard-negative triplet on relaxed codes). ``labels`` are ignored.
    Arguments and shapes as :class:`GeneratorAttack`; example: ``atk(x)``."""

    needs_labels = False
    conditional = False


@register_attack("targeted_gan")
class TargetedGAN(GeneratorAttack):
    """Targeted generator (ProS-GAN style): conditioned on the decoded map of the *target*
    label, trained to pull the code toward its prototype code. Arguments and shapes as
    :class:`GeneratorAttack`; example: ``atk(x, target=target)``."""

    needs_labels = False
    targeted = True


@register_attack("universal_gan")
class UniversalGAN(GeneratorAttack):
    """Class pattern plus an image-dependent residual: an image-only generator trained on top
    of the bundle's ``class_universal`` pattern of the query's labels (delta = clip(P_y +
    G(x), eps)). Arguments and shapes as :class:`GeneratorAttack`."""

    conditional = False
