"""The hasher: backbone -> linear hash layer -> K real outputs whose signs are the code.

The hasher takes images in [0, 1] pixel space and normalises them itself, so attacks can
work on raw pixels and project onto the L-inf ball there. ``forward`` returns the
pre-activation ``u`` (B, K); ``codes`` gives sign(u) in {-1, +1}; ``relaxed`` gives tanh(s*u),
the differentiable surrogate that losses and attacks use.

A hasher carries its numeric precision (:mod:`service.precision`): ``fp32`` (the default) or
``bf16``, set with :meth:`Hasher.set_precision`. Its forward pass runs under the matching
autocast and always returns float32 ``u``, so codes, losses and attack objectives downstream
are computed in float32 whatever the precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from service.nets.backbones import Backbone
from service.nets.catalog import create_backbone
from service.precision import (
    Precision,
    as_batch,
    autocast,
    resolve_precision,
    to_memory_format,
    uses_channels_last,
)


def _channel_vector(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


class Hasher(nn.Module):
    """Backbone + hash layer (+ an auxiliary classifier on the relaxed codes, for training)."""

    def __init__(
        self,
        backbone: Backbone,
        bits: int,
        num_classes: int = 0,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.bits = bits
        self.hash_layer = nn.Linear(backbone.out_features, bits)
        self.classifier = nn.Linear(bits, num_classes) if num_classes > 0 else None
        self.register_buffer("mean", _channel_vector(mean))
        self.register_buffer("std", _channel_vector(std))
        self.precision: Precision = "fp32"
        self.channels_last = False

    def set_precision(self, precision: str) -> Hasher:
        """Compute forward passes in ``precision`` (``auto``, ``fp32`` or ``bf16``) from now on.

        ``auto`` resolves against the device the hasher is on now (bf16 on CUDA), so call this
        after moving it. bf16 on CUDA also puts the weights in channels-last format (back to the
        default format for anything else). Not part of the state dict: a loaded bundle's hasher
        starts in fp32.
        """
        dev = next(self.parameters()).device
        self.precision = resolve_precision(precision, dev)
        self.channels_last = uses_channels_last(self.precision, dev)
        to_memory_format(self, self.channels_last)
        return self

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Pre-activation outputs ``u`` (B, bits), float32, for images ``x`` in [0, 1].

        ``precision`` (``fp32`` or ``bf16``) overrides the hasher's own for this call.
        """
        with autocast(precision or self.precision, x.device):
            u = self.hash_layer(self.backbone(as_batch(self.normalise(x), self.channels_last)))
        return u.float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (for saliency methods), float32."""
        with autocast(self.precision, x.device):
            fmap = self.backbone.forward_features(as_batch(self.normalise(x),
                                                           self.channels_last))
        return fmap.float()

    def forward_from_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """Outputs ``u`` (float32) from a map of :meth:`forward_features`."""
        with autocast(self.precision, fmap.device):
            u = self.hash_layer(self.backbone.forward_head(fmap))
        return u.float()

    def relaxed(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Differentiable code surrogate tanh(scale * u) in (-1, 1)."""
        return torch.tanh(scale * self(x))

    @torch.no_grad()
    def codes(self, x: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Binary codes in {-1, +1} (sign(0) = +1) of the float32 outputs, as float."""
        u = self(x, precision)
        return torch.where(u >= 0, torch.ones_like(u), -torch.ones_like(u))


def build_hasher(
    arch: str,
    bits: int,
    num_classes: int = 0,
    in_channels: int = 1,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    arch_kwargs: dict[str, Any] | None = None,
) -> Hasher:
    """Build a hasher from data (as a bundle manifest records it)."""
    backbone = create_backbone(arch, in_channels=in_channels, **(arch_kwargs or {}))
    assert isinstance(backbone, Backbone)
    return Hasher(backbone, bits=bits, num_classes=num_classes, mean=mean, std=std)


@torch.no_grad()
def encode_uint8(hasher: Hasher, images: Any, batch_size: int = 512,
                 precision: str | None = None) -> Any:
    """Sign codes (N, K) as int8 numpy of uint8 images (N, C, H, W), on the hasher's device.

    ``precision`` (``auto``, ``fp32`` or ``bf16``) overrides the hasher's own for this call;
    the sign is always taken of float32 outputs.
    """
    import numpy as np

    hasher.eval()
    dev = next(hasher.parameters()).device
    prec = None if precision is None else resolve_precision(precision, dev)
    imgs = torch.as_tensor(images)
    out = [hasher.codes(imgs[i:i + batch_size].to(dev).float().div_(255.0), prec)
           .to(torch.int8).cpu()
           for i in range(0, len(imgs), batch_size)]
    if not out:
        return np.zeros((0, hasher.bits), dtype=np.int8)
    return torch.cat(out).numpy()


def code_agreement(codes_a: Any, codes_b: Any) -> dict[str, float]:
    """How far two code arrays (N, K) agree: fraction of equal bits and of equal codes."""
    import numpy as np

    a, b = np.asarray(codes_a), np.asarray(codes_b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, K) code arrays of one shape; got {a.shape}, {b.shape}")
    if a.size == 0:
        return {"bits": 1.0, "codes": 1.0, "images": len(a)}
    eq = a == b
    return {"bits": float(eq.mean()), "codes": float(eq.all(1).mean()), "images": len(a)}


def precision_agreement(hasher: Hasher, images: Any, batch_size: int = 256) -> dict[str, float]:
    """fp32 vs bf16 codes of the same uint8 images (N, C, H, W) on the hasher's device.

    Returns ``bits`` (fraction of equal bits), ``codes`` (fraction of images whose whole code
    is equal) and ``images``. The hasher's own precision is left as it was.
    """
    fp32 = encode_uint8(hasher, images, batch_size, precision="fp32")
    bf16 = encode_uint8(hasher, images, batch_size, precision="bf16")
    return code_agreement(fp32, bf16)
