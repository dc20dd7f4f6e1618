"""HAG-style attack (after Yang et al. 2018, "Adversarial examples for Hamming space search").

Maximises the Hamming distance to the clean code through a masked tanh-code objective: only
bits that have not flipped yet contribute, so the budget goes to the bits still to move instead
of pushing flipped bits further. Optimised with Adam on the perturbation and projected onto
the eps ball after every step.

The hasher sees ``x + delta`` itself, never ``(x + delta).clamp(0, 1)``: the projection after
every step already keeps it in [0, 1], and a clamp in the forward pass makes the result depend
on the torch version. torch 2.14 gives ``clamp`` a zero gradient *at* its bounds (2.11 passes
it through), so every pixel sitting exactly on 0 or 1 (half of a Fashion-MNIST image is
background at 0) got no gradient, Adam never moved it, and the same attack reached mAP@all
0.60 on a torch-2.14 CPU against 0.37 on a torch-2.11 GPU at 8/255 (issue 20;
``scripts/hag_device_check.py`` measures both).
"""

from __future__ import annotations

from typing import Any

import torch

from service.attacks.base import Attack, register_attack, scale_for


@register_attack("hag")
class HAG(Attack):
    """HAG-style untargeted attack: flip the bits that still agree with the clean code.

    Optimises: minimise sum_k m_k * b_k * tanh(s * u_k(x + delta)) over delta, where
    b = sign(u(x)), m_k = 1 while bit k still agrees with b, s = 1 / mean|u(x)|; Adam on
    delta, clipped to the eps ball and to [0, 1] after every step.

    Args:
        hasher: the frozen victim. eps: L-inf budget in [0, 1] pixel units.
        steps: Adam steps (default 20). lr: default eps / 4.

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels, target: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "hag", eps=8 / 255, steps=20)
        >>> x_adv = atk(x)
    """

    def __init__(self, hasher: Any, eps: float, steps: int = 20, lr: float | None = None,
                 **kw: Any) -> None:
        super().__init__(hasher, eps, **kw)
        self.steps = int(steps)
        self.lr = float(lr) if lr else self.eps / 4

    def perturb(self, x, labels, target, gen):
        with torch.no_grad():
            u0 = self.hasher(x)
        b = torch.where(u0 >= 0, 1.0, -1.0)
        scale = scale_for(u0)
        delta = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        for _ in range(self.steps):
            u = self.hasher(x + delta)  # in [0, 1] already: see the module docstring
            mask = (b * u > 0).float().detach()  # bits still agreeing with the clean code
            loss = (mask * b * torch.tanh(scale * u)).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-self.eps, self.eps)
                delta.copy_((x + delta).clamp(0, 1) - x)
        return (x + delta).detach()
