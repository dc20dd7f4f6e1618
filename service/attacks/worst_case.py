"""``worst_case``: a fixed ensemble that keeps, per query, the candidate that hurts retrieval most
(in the spirit of AutoAttack, Croce & Hein 2020, the standard of RobustBench).

An audit that under-states the strongest attack over-states robustness, and no single attack is
the strongest on every query. ``worst_case`` runs a fixed list of attacks with no knob to tune:

* iterative: DHTA and PGD from the label's centre code, each from two random starts, PGD from
  the query's own code, all with the plain tanh(u) objective (``scale="none"``: on the shipped
  bundle, where typical |u| is about 2.2, the 1/mean|u| rescaling flattens the objective), and
  HAG; 20 steps each;
* one pass: every untargeted one-pass attack the bundle serves (its trained generators and any
  stored universal / class-universal patterns), found by building each registered one-pass
  attack for the bundle and keeping those that build (:func:`served_one_pass_methods`), so new
  kinds join without a change here;

and returns, for each query, the candidate whose uint8-rounded image gives its code the lowest
average precision over the whole database (the audit's headline mAP@all, query by query), with
ties going to the earlier member. The database and the query labels are what a white-box
auditor has; nothing is selected on anything but the query itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from service.attacks.base import (
    ATTACKS,
    Attack,
    AttackContext,
    AttackInputError,
    register_attack,
    to_uint8_within,
)
from service.errors import BundleError


@dataclass(frozen=True)
class Member:
    """One candidate of the ensemble: a registered method, its options and its seed."""

    method: str
    options: tuple[tuple[str, Any], ...] = ()
    seed: int = 0


# The fixed iterative part (20 steps each unless a test asks for fewer).
ITERATIVE_MEMBERS: tuple[Member, ...] = (
    Member("dhta", (("scale", "none"),), 0),
    Member("dhta", (("scale", "none"),), 1),
    Member("pgd_center", (("scale", "none"),), 0),
    Member("pgd_center", (("scale", "none"),), 1),
    Member("pgd", (("scale", "none"),), 0),
    Member("hag", (), 0),
)


def served_one_pass_methods(bundle: Any, eps: float) -> list[str]:
    """Untargeted one-pass (non-iterative) attacks that ``bundle`` can run at ``eps``.

    Each registered one-pass untargeted method is built for the bundle; one that refuses
    (no trained generator or pattern, eps above what it was trained for) is not served.
    """
    from service.attacks.factory import attack_for_bundle

    out = []
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        if cls.iterative or cls.targeted or name == WorstCase.name:
            continue
        try:
            attack_for_bundle(bundle, name, eps)
        except (AttackInputError, BundleError):
            continue
        out.append(name)
    return out


def average_precision_all(codes: torch.Tensor, labels: torch.Tensor, db_codes: torch.Tensor,
                          db_labels: torch.Tensor) -> torch.Tensor:
    """AP over the whole database of each +-1 code (the protocol's mAP@all, query by query).

    Hamming ranking with ties by database order (a stable sort); relevance = a shared label.
    """
    bits = codes.shape[1]
    dist = 0.5 * (bits - codes @ db_codes.T)
    rel = (labels @ db_labels.T) > 0
    order = torch.sort(dist, dim=1, stable=True).indices
    hits = rel.gather(1, order).to(torch.float64)
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
    prec_sum = (hits.cumsum(1) * hits / ranks).sum(1)
    return prec_sum / hits.sum(1).clamp_min(1.0)


@register_attack("worst_case")
class WorstCase(Attack):
    """Per query, the strongest of a fixed ensemble of attacks (the audit's headline row).

    Optimises: for each member m (:data:`ITERATIVE_MEMBERS`, then every one-pass attack the
    bundle serves) the image x_m; returns per query argmin_m AP@all(sign(u(round8(x_m)))),
    the average precision of the uint8-rounded candidate's code over the bundle's database.

    Args:
        hasher: the frozen victim. eps: L-inf budget in [0, 1] pixel units.
        members: the member attacks, built for the bundle (``attack_for_bundle`` sets them).
        labels_of_members: their display names, in the same order.
        steps: steps of the iterative members (default 20; tests use fewer).
        context: the bundle's database (``attack_for_bundle`` sets it).

    Shape:
        x: (B, C, H, W) float in [0, 1]; labels: (B, num_classes) multi-hot.
        Returns (B, C, H, W) float in [0, 1] on the uint8 grid, within ``eps`` of ``x``.

    Example:
        >>> atk = attack_for_bundle(bundle, "worst_case", eps=8 / 255)
        >>> x_adv = atk(x, labels)
        >>> atk.wins  # how many queries each member won so far
    """

    needs_labels = True
    needs_context = True

    def __init__(self, hasher: Any, eps: float, members: list[Attack] | None = None,
                 member_names: list[str] | None = None, steps: int = 20, **kw: Any) -> None:
        super().__init__(hasher, eps, **kw)
        if not members:
            raise AttackInputError("worst_case is built for a bundle (attack_for_bundle)",
                                   field="method")
        self.members = members
        self.member_names = member_names or [m.name for m in members]
        self.steps = int(steps)
        self.wins = [0] * len(members)

    @classmethod
    def bundle_kwargs(cls, bundle: Any, eps: float, seed: int,
                      options: dict[str, Any]) -> dict[str, Any]:
        """Build the members for ``bundle`` (called by ``attack_for_bundle``)."""
        from service.attacks.factory import attack_for_bundle

        steps = int(options.get("steps", 20))
        members, names = [], []
        for m in ITERATIVE_MEMBERS:
            members.append(attack_for_bundle(bundle, m.method, eps, seed=seed + m.seed,
                                             steps=steps, **dict(m.options)))
            names.append(f"{m.method}-{steps}" + ("" if not m.options else " plain tanh")
                         + (f" restart {m.seed + 1}" if m.seed else ""))
        for name in served_one_pass_methods(bundle, eps):
            members.append(attack_for_bundle(bundle, name, eps, seed=seed))
            names.append(name)
        return {"members": members, "member_names": names}

    def perturb(self, x, labels, target, gen):
        ctx: AttackContext | None = self.context
        assert ctx is not None and labels is not None
        best_x, best_ap = x, None
        for i, atk in enumerate(self.members):
            cand = atk(x, labels)
            cand = to_uint8_within(cand, x, self.eps).float() / 255.0
            with torch.no_grad():
                u = self.hasher(cand)
                codes = torch.where(u >= 0, 1.0, -1.0)
                ap = average_precision_all(codes, labels, ctx.db_codes, ctx.db_labels)
            if best_ap is None:
                best_x, best_ap, who = cand, ap, torch.zeros_like(ap, dtype=torch.long)
            else:
                better = ap < best_ap
                best_x = torch.where(better.view(-1, 1, 1, 1), cand, best_x)
                best_ap = torch.where(better, ap, best_ap)
                who = torch.where(better, torch.full_like(who, i), who)
        for i in who.tolist():
            self.wins[i] += 1
        return best_x

    def used(self) -> list[dict[str, Any]]:
        """Members in order with the number of queries each won (for reports)."""
        return [{"member": n, "won": w} for n, w in zip(self.member_names, self.wins,
                                                        strict=True)]
