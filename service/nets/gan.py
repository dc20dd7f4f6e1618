"""Decoder, generator and discriminator of the label-conditioned attack generators.

Shapes follow UntargetedGAN (Huang et al.), Tables 1-3, at 224 px RGB:

* decoder: f (512) -> FC 512-25088 -> 128x14x14 -> 4 up-sampling stages 128-64-32-16-8
  -> conv 3x3 to a 3x224x224 label map;
* generator: [image, label map] (6 channels) -> conv 7x7 6-64 -> conv 4x4/2 64-128 ->
  conv 4x4/2 128-256 -> 6 residual blocks (256) -> up 256-128 -> up 128-64 -> concat image
  (67 channels) -> conv 3x3 67-3 -> tanh, scaled by eps;
* discriminator: conv 7x7 3-64 -> conv 4x4/2 64-128-256-512-1024 (LeakyReLU) -> a final conv
  covering the remaining map -> C+1 outputs (labels, real/fake).

The same classes scale to other sizes: ``stages`` (up/down-sampling stages) and the base
width are arguments, so 28 px grayscale uses 2 decoder stages from 7x7 and narrower layers.
:func:`paper_shapes` gives the 224 px configuration.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.nets.catalog import NETS


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    return nn.Identity()


def decoder_stages(height: int, width: int, max_stages: int = 4) -> int:
    """Largest number of x2 up-sampling stages (<= max_stages) that divides both sides."""
    s = 0
    while s < max_stages and height % (2 ** (s + 1)) == 0 and width % (2 ** (s + 1)) == 0:
        s += 1
    return s


@NETS.register("label_decoder")
class LabelDecoder(nn.Module):
    """Label feature (B, feature_dim) -> label map (B, C, H, W)."""

    def __init__(self, out_channels: int, height: int, width: int, feature_dim: int = 512,
                 base_channels: int = 128, stages: int | None = None, norm: str = "none") -> None:
        super().__init__()
        self.stages = decoder_stages(height, width) if stages is None else stages
        f = 2 ** self.stages
        if height % f or width % f:
            raise ValueError(f"{height}x{width} is not divisible by 2^{self.stages}")
        self.base = (base_channels, height // f, width // f)
        self.fc = nn.Linear(feature_dim, base_channels * (height // f) * (width // f))
        layers: list[nn.Module] = []
        ch = base_channels
        for _ in range(self.stages):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1),
                       _norm(norm, ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        layers.append(nn.Conv2d(ch, out_channels, 3, padding=1))
        self.up = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.up(self.fc(f).view(-1, *self.base))


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), _norm(norm, ch), nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, padding=1), _norm(norm, ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@NETS.register("perturbation_generator")
class PerturbationGenerator(nn.Module):
    """[x, condition map] -> perturbation in [-eps, eps] (tanh scaled by eps).

    Args:
        in_channels: image channels C (the input has 2C channels: image + label map;
            ``cond_channels`` overrides the second C, e.g. 0 for a label-free generator).
        width: channels after the first conv (paper: 64).
        blocks: residual blocks (paper: 6).
        norm: "batch", "instance" or "none" (the paper's table lists none).
        skips: U-Net style: also feed the full- and half-resolution encoder features to the
            decoder (not in the paper; off by default, shapes then match Table 2).
    """

    def __init__(self, in_channels: int, width: int = 64, blocks: int = 6,
                 cond_channels: int | None = None, norm: str = "batch",
                 skips: bool = False) -> None:
        super().__init__()
        c = in_channels
        cc = in_channels if cond_channels is None else cond_channels
        w = width
        self.skips = skips
        k = 2 if skips else 1
        self.encode = nn.Sequential(
            nn.Conv2d(c + cc, w, 7, padding=3), _norm(norm, w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), _norm(norm, 2 * w), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), _norm(norm, 4 * w),
            nn.ReLU(inplace=True),
        )
        self.res = nn.Sequential(*[ResidualBlock(4 * w, norm) for _ in range(blocks)])
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1), _norm(norm, 2 * w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(k * 2 * w, w, 4, stride=2, padding=1), _norm(norm, w),
            nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(k * w + c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, eps: float) -> torch.Tensor:
        inp = x if cond is None else torch.cat([x, cond], dim=1)
        if inp.shape[-1] % 4 or inp.shape[-2] % 4:
            raise ValueError(f"image side {tuple(x.shape[-2:])} must be divisible by 4")
        e1 = self.encode[:3](inp)
        e2 = self.encode[3:6](e1)
        h = self.decode[:3](self.res(self.encode[6:](e2)))
        h = self.decode[3:](torch.cat([h, e2], 1) if self.skips else h)
        h = torch.cat([h, e1, x], 1) if self.skips else torch.cat([h, x], 1)
        # tanh and the eps scaling in float32: the perturbation stays float32 under autocast
        return eps * torch.tanh(self.out(h).float())


@NETS.register("label_discriminator")
class LabelDiscriminator(nn.Module):
    """Image -> (B, C+1): predicted multi-hot labels (logits) and a real/fake score."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int,
                 base: int = 64, stages: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base, 7, padding=3),
                                   nn.LeakyReLU(0.2, inplace=True)]
        ch = base
        for _ in range(stages):
            layers += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1),
                       nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            hw = self.features(torch.zeros(1, in_channels, height, width)).shape[-2:]
        self.head = nn.Conv2d(ch, num_classes + 1, tuple(hw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten(1)


def paper_shapes(num_classes: int, bits: int) -> dict[str, dict[str, Any]]:
    """Constructor kwargs of the paper's 224 px RGB networks."""
    return {
        "prototype_net": {"num_classes": num_classes, "bits": bits, "feature_dim": 512},
        "label_decoder": {"out_channels": 3, "height": 224, "width": 224, "feature_dim": 512,
                          "base_channels": 128, "stages": 4},
        "perturbation_generator": {"in_channels": 3, "width": 64, "blocks": 6},
        "label_discriminator": {"in_channels": 3, "num_classes": num_classes, "height": 224,
                                "width": 224, "base": 64, "stages": 4},
    }


def small_shapes(channels: int, height: int, width: int, num_classes: int, bits: int,
                 width_mult: int = 16) -> dict[str, dict[str, Any]]:
    """Scaled-down networks for small images (e.g. 28 px grayscale)."""
    stages = decoder_stages(height, width)
    return {
        "prototype_net": {"num_classes": num_classes, "bits": bits, "feature_dim": 512},
        "label_decoder": {"out_channels": channels, "height": height, "width": width,
                          "feature_dim": 512, "base_channels": 8 * 2 ** stages,
                          "stages": stages},
        "perturbation_generator": {"in_channels": channels, "width": width_mult, "blocks": 6},
        "label_discriminator": {"in_channels": channels, "num_classes": num_classes,
                                "height": height, "width": width, "base": width_mult,
                                "stages": stages},
    }
