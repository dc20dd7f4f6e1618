"""PGD on hash codes: L-inf projected sign-gradient steps on a relaxed code objective.

Untargeted: minimise ``mean_k a_k * tanh(s * u_k(x'))`` for an anchor code ``a``, pushing the
adversarial code away from it. Anchors:

* ``pgd``: the query's own clean code sign(u(x)) (no labels needed);
* ``pgd_center``: the label's center code (the bundle's PrototypeNet code when it has one,
  otherwise the majority vote of database codes sharing the label).

``s`` = 1 / mean|u(x)| per sample by default (``scale="mean_abs"``), so the relaxation is not
saturated where a hasher's outputs are large; ``scale="none"`` uses the plain tanh(u), which is
stronger on the shipped bundle (typical |u| about 2.2, so the rescaling flattens the objective
around the decision boundary instead of sharpening it).

``restarts`` runs the whole loop from that many random starts and keeps, per query, the end
point with the lowest objective (restart r > 0 draws its start from the same seeded generator,
so results stay deterministic).
"""

from __future__ import annotations

from typing import Any

import torch

from service.attacks.base import (
    Attack,
    AttackInputError,
    check_restarts,
    register_attack,
    scale_for,
)

SCALES = ("mean_abs", "none")


class CodePGD(Attack):
    """Shared loop: random start, ``steps`` sign-gradient steps of size ``step_size``.

    Subclasses define :meth:`anchor` and the sign of the objective (``pull``: move toward the
    anchor, for targeted attacks).
    """

    pull: bool = False

    def __init__(
        self, hasher: Any, eps: float, steps: int = 20, step_size: float | None = None,
        random_start: bool = True, restarts: int = 1, scale: str = "mean_abs", **kw: Any,
    ) -> None:
        super().__init__(hasher, eps, **kw)
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size else 2.5 * self.eps / max(1, self.steps)
        self.random_start = random_start
        self.restarts = check_restarts(restarts)
        if scale not in SCALES:
            raise AttackInputError(f"{self.name}: scale must be one of {', '.join(SCALES)}; "
                                   f"got {scale!r}", field="scale")
        self.scale = scale

    def anchor(
        self, x: torch.Tensor, u0: torch.Tensor, labels: torch.Tensor | None,
        target: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, u: torch.Tensor, anchor: torch.Tensor, scale: torch.Tensor,
                  u0: torch.Tensor) -> torch.Tensor:
        """Per-sample loss to minimise."""
        sim = (anchor * torch.tanh(scale * u)).mean(dim=1)
        return -sim if self.pull else sim

    def perturb(self, x, labels, target, gen):
        with torch.no_grad():
            u0 = self.hasher(x)
        scale = scale_for(u0) if self.scale == "mean_abs" else torch.ones_like(u0[:, :1])
        anchor = self.anchor(x, u0, labels, target)
        if self.restarts == 1:
            return self._run(x, u0, anchor, scale, gen)
        best, best_loss = x, None
        for _ in range(self.restarts):
            x_adv = self._run(x, u0, anchor, scale, gen)
            with torch.no_grad():
                loss = self.objective(self.hasher(x_adv), anchor, scale, u0)
            if best_loss is None:
                best, best_loss = x_adv, loss
            else:
                better = loss < best_loss
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
                best_loss = torch.minimum(loss, best_loss)
        return best

    def _run(self, x: torch.Tensor, u0: torch.Tensor, anchor: torch.Tensor,
             scale: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One run of ``steps`` sign-gradient steps (from a random start when enabled)."""
        x_adv = x.clone()
        if self.random_start:
            noise = torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1
            x_adv = (x + self.eps * noise).clamp(0, 1)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = self.objective(self.hasher(x_adv), anchor, scale, u0).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv - self.step_size * grad.sign()
                x_adv = torch.max(torch.min(x_adv, x + self.eps), x - self.eps).clamp(0, 1)
        return x_adv.detach()


@register_attack("pgd")
class PGDOwnCode(CodePGD):
    """Untargeted PGD away from the query's own clean code (no labels needed).

    Optimises: minimise mean_k b_k * tanh(s * u_k(x')) with b = sign(u(x)) the clean code and
    s = 1 / mean|u(x)|, by ``steps`` sign-gradient steps from a random start in the eps ball.

    Args:
        hasher: the frozen victim. eps: L-inf budget in [0, 1] pixel units.
        steps: gradient steps (default 20). step_size: default 2.5 * eps / steps.
        random_start: start from a uniform point of the eps ball (default True).
        restarts: independent runs from fresh random starts; per query the one with the
            lowest objective is kept (default 1).
        scale: ``mean_abs`` (tanh(u / mean|u|), default) or ``none`` (plain tanh(u)).
        seed: seeds the random start.

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels, target: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "pgd", eps=8 / 255, steps=20)
        >>> x_adv = atk(x)
    """

    def anchor(self, x, u0, labels, target):
        return torch.where(u0 >= 0, 1.0, -1.0)


@register_attack("pgd_center")
class PGDCenterCode(CodePGD):
    """Untargeted PGD away from the query label's center code.

    Optimises: as ``pgd``, with the anchor b = the PrototypeNet code of the query's labels
    (the majority vote of database codes sharing a label when the bundle has no PrototypeNet).

    Args:
        hasher, eps, steps, step_size, random_start, restarts, scale, seed: as ``pgd``.
        context: the bundle's database codes and PrototypeNet (``attack_for_bundle`` sets it).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels, target: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "pgd_center", eps=8 / 255)
        >>> x_adv = atk(x, labels)
    """

    needs_labels = True
    needs_context = True

    def anchor(self, x, u0, labels, target):
        assert self.context is not None and labels is not None
        return self.context.prototype_codes(labels)
