"""The hasher: backbone -> linear hash layer -> K real outputs whose signs are the code.

The hasher takes images in [0, 1] pixel space and normalises them itself, so attacks can
work on raw pixels and project onto the L-inf ball there. ``forward`` returns the
pre-activation ``u`` (B, K); ``codes`` gives sign(u) in {-1, +1}; ``relaxed`` gives tanh(s*u),
the differentiable surrogate that losses and attacks use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from service.nets.backbones import Backbone
from service.nets.catalog import create_backbone


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

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation outputs ``u`` (B, bits) for images ``x`` in [0, 1]."""
        return self.hash_layer(self.backbone(self.normalise(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map (for saliency methods)."""
        return self.backbone.forward_features(self.normalise(x))

    def forward_from_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.hash_layer(self.backbone.forward_head(fmap))

    def relaxed(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Differentiable code surrogate tanh(scale * u) in (-1, 1)."""
        return torch.tanh(scale * self(x))

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Binary codes in {-1, +1} (sign(0) = +1), as float."""
        u = self(x)
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
def encode_uint8(hasher: Hasher, images: Any, batch_size: int = 512) -> Any:
    """Sign codes (N, K) as int8 numpy of uint8 images (N, C, H, W), on the hasher's device."""
    import numpy as np

    hasher.eval()
    dev = next(hasher.parameters()).device
    imgs = torch.as_tensor(images)
    out = [hasher.codes(imgs[i:i + batch_size].to(dev).float().div_(255.0)).to(torch.int8).cpu()
           for i in range(0, len(imgs), batch_size)]
    if not out:
        return np.zeros((0, hasher.bits), dtype=np.int8)
    return torch.cat(out).numpy()
