"""DHTA / P2P-style anchor-code attacks (after Bai et al. 2020, "Targeted attack for deep
hashing based retrieval").

The anchor code of a label set is the majority vote (sign of the sum) of the database codes
that share a label with it: one code that stands for the whole class. Targeted: pull the
adversarial code toward the target label's anchor. Untargeted: push it away from the query
label's anchor.
"""

from __future__ import annotations

from service.attacks.base import register_attack
from service.attacks.pgd import CodePGD, PGDCenterCode


@register_attack("dhta")
class DHTAUntargeted(PGDCenterCode):
    """Untargeted DHTA-style attack: away from the anchor code of the query's labels.

    Optimises: as ``pgd``, with the anchor = sign of the sum of the database codes that share
    a label with the query (one code standing for the class).

    Args:
        hasher, eps, steps, step_size, random_start, seed: as ``pgd``.
        context: the bundle's database codes (``attack_for_bundle`` sets it).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels, target: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "dhta", eps=8 / 255)
        >>> x_adv = atk(x, labels)
    """

    def anchor(self, x, u0, labels, target):
        assert self.context is not None and labels is not None
        return self.context.anchor_codes(labels)


@register_attack("dhta_targeted")
class DHTATargeted(CodePGD):
    """Targeted DHTA attack: toward the anchor code of the target label.

    Optimises: maximise mean_k a_k * tanh(s * u_k(x')) with a = sign of the sum of the
    database codes carrying the target label; sign-gradient steps from a random start.

    Args:
        hasher, eps, steps, step_size, random_start, seed: as ``pgd``.
        context: the bundle's database codes (``attack_for_bundle`` sets it).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels, target: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "dhta_targeted", eps=8 / 255)
        >>> x_adv = atk(x, target=target)
    """

    targeted = True
    needs_context = True
    pull = True

    def anchor(self, x, u0, labels, target):
        assert self.context is not None and target is not None
        return self.context.anchor_codes(target)
