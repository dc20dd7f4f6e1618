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
    """Pull the code toward the target label's prototype code (PrototypeNet)."""

    def anchor(self, x, u0, labels, target):
        assert self.context is not None and target is not None
        return self.context.prototype_codes(target)
