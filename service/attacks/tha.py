"""THA-style targeted PGD (after "Targeted attack for deep hashing via prototype-supervised
adversarial networks" / "Targeted attack on deep hashing", the THA/ProS family): pull the
adversarial code toward the target label's prototype code, the bundle's PrototypeNet code of
that label (the majority vote of database codes when the bundle has no PrototypeNet).
"""

from __future__ import annotations

from service.attacks.base import register_attack
from service.attacks.dhta import DHTATargeted


@register_attack("tha_targeted")
class THATargeted(DHTATargeted):
    """Targeted THA-style attack: toward the target label's prototype code.

    Optimises: as ``dhta_targeted``, with the anchor = the PrototypeNet code of the target
    label (the majority-vote anchor when the bundle has no PrototypeNet).

    Args:
        hasher, eps, steps, step_size, random_start, seed: as ``pgd``.
        context: the bundle's PrototypeNet and database (``attack_for_bundle`` sets it).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels, target: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1], within ``eps`` of ``x`` (L-inf).

    Example:
        >>> atk = attack_for_bundle(bundle, "tha_targeted", eps=8 / 255)
        >>> x_adv = atk(x, target=target)
    """

    def anchor(self, x, u0, labels, target):
        assert self.context is not None and target is not None
        return self.context.prototype_codes(target)
