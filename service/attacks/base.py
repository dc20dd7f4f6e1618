"""The attack base class: frozen victim, L-inf projection in [0, 1] pixel space, seeds.

Every attack is one file that subclasses :class:`Attack`, implements :meth:`Attack.perturb`
and registers itself with ``@ATTACKS.register("name")``; the registry name is the API's name.
The base class owns what every attack must honour:

* the victim hasher is in eval mode and its parameters never receive gradients;
* the result lies in the L-inf ball of radius ``eps`` around ``x`` and in [0, 1];
* :func:`to_uint8_within` rounds to the uint8 grid a user receives (PNG) without leaving
  the ball, so true per-pixel L-inf <= eps also after rounding;
* randomness (random starts, sampled targets) comes from a generator seeded per call.

Precision: attacks run in the victim's precision (``Hasher.set_precision``; bf16 autocast on
CUDA when the API, a worker or a benchmark asks for it). The hasher's forward pass runs under
autocast and hands back float32 outputs, so objectives and their gradients with respect to
the float32 images are float32; the perturbation, the projection and :func:`to_uint8_within`
never leave float32, so bf16 changes which pixels move, never how far.
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from service.errors import AttackInputError
from service.nets import Hasher
from service.registry import Registry

log = logging.getLogger(__name__)

ATTACKS: Registry[type[Attack]] = Registry("attack")


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L-inf ball of radius ``eps`` around ``x`` intersected with [0, 1]."""
    return torch.max(torch.min(x_adv, x + eps), x - eps).clamp_(0.0, 1.0)


def to_uint8_within(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to the uint8 grid and keep each pixel within ``eps`` of ``x``'s uint8 value.

    ``x`` is the clean image (on the uint8 grid when it came from a PNG/JPEG). The allowed
    change is ``floor(eps * 255 + 1e-6)`` grey levels, so the delivered image honours eps.
    """
    budget = math.floor(eps * 255.0 + 1e-6)
    x8 = torch.round(x * 255.0)
    a8 = torch.round(x_adv * 255.0)
    a8 = torch.max(torch.min(a8, x8 + budget), x8 - budget).clamp_(0, 255)
    return a8.to(torch.uint8)


@dataclass
class AttackContext:
    """What some attacks need beyond the victim: the database and label prototypes.

    Attributes:
        db_codes: (N, K) database codes in {-1, +1} (float).
        db_labels: (N, C) multi-hot database labels (float).
        prototype: optional frozen PrototypeNet (label -> prototype code).
    """

    db_codes: torch.Tensor
    db_labels: torch.Tensor
    prototype: torch.nn.Module | None = None
    _anchor_cache: dict[bytes, torch.Tensor] = field(default_factory=dict, repr=False)

    def anchor_codes(self, labels: torch.Tensor) -> torch.Tensor:
        """DHTA/P2P anchor: majority vote of the database codes that share a label with each row.

        Ties in the vote go to +1 (sign(0) = +1). A label set with no database item gets the
        all-zero vector (no pull in any direction).
        """
        out = []
        for row in labels.detach().cpu():
            key = row.to(torch.uint8).numpy().tobytes()
            if key not in self._anchor_cache:
                member = (self.db_labels.cpu() @ row.float()) > 0
                if member.any():
                    vote = self.db_codes.cpu()[member].sum(0)
                    self._anchor_cache[key] = torch.where(vote >= 0, 1.0, -1.0)
                else:
                    self._anchor_cache[key] = torch.zeros(self.db_codes.shape[1])
            out.append(self._anchor_cache[key])
        return torch.stack(out).to(labels.device)

    def prototype_codes(self, labels: torch.Tensor) -> torch.Tensor:
        """Sign of the PrototypeNet code for each label row (falls back to the vote anchor)."""
        if self.prototype is None:
            return self.anchor_codes(labels)
        with torch.no_grad():
            h = self.prototype(labels.float())["code"]
        return torch.where(h >= 0, 1.0, -1.0)


class Attack(abc.ABC):
    """Base class of all attacks.

    Args:
        hasher: the victim; frozen here (eval mode, no parameter gradients).
        eps: L-inf budget in [0, 1] pixel units (8/255 = 0.0314).
        context: database and prototypes, for attacks that need them.
        seed: seeds the per-call random generator.
    """

    name: ClassVar[str] = ""
    targeted: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    needs_context: ClassVar[bool] = False
    iterative: ClassVar[bool] = True

    def __init__(
        self, hasher: Hasher, eps: float, context: AttackContext | None = None, seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < eps <= 1.0:
            raise AttackInputError(f"eps must be in (0, 1], got {eps}", field="eps")
        if kwargs:
            raise AttackInputError(
                f"{self.name}: unknown options {sorted(kwargs)}", field="options"
            )
        if self.needs_context and context is None:
            raise AttackInputError(f"{self.name} needs the bundle's database", field="method")
        self.hasher = hasher.eval()
        for p in self.hasher.parameters():
            p.requires_grad_(False)
        self.eps = float(eps)
        self.context = context
        self.seed = seed

    @classmethod
    def available(cls, manifest: Any) -> bool:
        """Whether a bundle with this manifest can run the attack (generator and pattern
        attacks need parts trained into the bundle; the others run on every bundle)."""
        return True

    @property
    def device(self) -> torch.device:
        return next(self.hasher.parameters()).device

    @property
    def precision(self) -> str:
        """The victim's forward precision (``fp32`` or ``bf16``), which the attack runs in."""
        return self.hasher.precision

    @abc.abstractmethod
    def perturb(
        self, x: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Return adversarial images for ``x`` (projection is applied by the caller)."""

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attack a batch ``x`` (B, C, H, W) in [0, 1]; returns float images in the eps ball."""
        if x.dim() != 4:
            raise AttackInputError("images must be a (B, C, H, W) batch", field="image")
        if self.needs_labels and labels is None:
            raise AttackInputError(f"{self.name} needs the query labels", field="labels")
        if self.targeted and target is None:
            raise AttackInputError(f"{self.name} is targeted: give a target label", field="target")
        x = x.to(self.device, torch.float32)
        labels = labels.to(self.device, torch.float32) if labels is not None else None
        target = target.to(self.device, torch.float32) if target is not None else None
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        with torch.enable_grad():
            x_adv = self.perturb(x, labels, target, gen)
        return project(x_adv.detach(), x, self.eps)


MAX_RESTARTS = 20


def check_restarts(restarts: Any) -> int:
    """``restarts`` as an int in 1..:data:`MAX_RESTARTS`; an AttackInputError naming it else."""
    if isinstance(restarts, bool) or not isinstance(restarts, int) \
            or not 1 <= restarts <= MAX_RESTARTS:
        raise AttackInputError(f"restarts must be an integer in 1..{MAX_RESTARTS}, got "
                               f"{restarts!r}", field="restarts")
    return restarts


def scale_for(u: torch.Tensor) -> torch.Tensor:
    """Per-sample temperature 1/mean|u| so that tanh(scale*u) is not saturated.

    A trained hasher's outputs are large (|u| >> 1), where tanh(u) is flat and its gradient
    vanishes; dividing by the typical magnitude keeps the relaxed code informative.
    """
    return 1.0 / u.detach().abs().mean(dim=1, keepdim=True).clamp_min(1e-6)


def register_attack(name: str) -> Any:
    """Class decorator: register an Attack subclass under ``name`` and set its ``name``."""

    def deco(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        ATTACKS.register(name)(cls)
        return cls

    return deco


def create_attack(name: str, hasher: Hasher, eps: float, **kwargs: Any) -> Attack:
    """Build a registered attack by name (unknown names list the known ones)."""
    cls = ATTACKS.get(name, field="method")
    return cls(hasher, eps, **kwargs)
