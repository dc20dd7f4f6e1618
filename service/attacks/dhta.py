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
    """Push the code away from the majority-vote anchor of the query's labels."""

    def anchor(self, x, u0, labels, target):
        assert self.context is not None and labels is not None
        return self.context.anchor_codes(labels)


@register_attack("dhta_targeted")
class DHTATargeted(CodePGD):
    """Pull the code toward the majority-vote anchor of the target label."""

    targeted = True
    needs_context = True
    pull = True

    def anchor(self, x, u0, labels, target):
        assert self.context is not None and target is not None
        return self.context.anchor_codes(target)
