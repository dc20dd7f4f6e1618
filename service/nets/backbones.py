"""Feature backbones for hashers.

Every backbone exposes ``out_features`` and splits its forward pass in two so that saliency
methods (Grad-CAM) can reach the last convolutional feature map:
``forward_features(x) -> (B, C', h, w)`` and ``forward_head(fmap) -> (B, out_features)``.

``small_cnn`` is sized for images up to about 64 px (Fashion-MNIST at 28 px). The torchvision
backbones (ResNet-18/50, VGG-11) are built with random weights: nothing is downloaded. A user
who has a torchvision state dict on disk may pass ``state_dict_path`` to start from it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from service.errors import ConfigError
from service.nets.catalog import BACKBONES

log = logging.getLogger(__name__)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class Backbone(nn.Module):
    """Base class: ``forward(x) = forward_head(forward_features(x))``."""

    out_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@BACKBONES.register("small_cnn")
class SmallCNN(Backbone):
    """Three VGG-style stages (width w, 2w, 4w) and a pooled fully connected head.

    Args:
        in_channels: image channels (1 for grayscale).
        width: channels of the first stage.
        out_features: size of the feature vector fed to the hash layer.
        pool: spatial size of the adaptive average pool before the head (2 keeps some layout).
    """

    def __init__(
        self, in_channels: int = 1, width: int = 32, out_features: int = 256, pool: int = 2
    ) -> None:
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            *_conv_bn(in_channels, w), *_conv_bn(w, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * pool * pool, out_features), nn.ReLU(inplace=True)
        )
        self.out_features = out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(fmap))


def _load_user_state_dict(model: nn.Module, path: str | None) -> None:
    """Load a torchvision state dict the user supplied (safetensors or a weights-only .pth)."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"state_dict_path {p} does not exist", field="state_dict_path")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)  # never unpickles objects
    missing, unexpected = model.load_state_dict(state, strict=False)
    log.info("loaded %s (missing %d, unexpected %d keys)", p, len(missing), len(unexpected))


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Return ``conv`` for ``in_channels`` inputs, averaging RGB weights for grayscale."""
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1))
    return new


class _ResNet(Backbone):
    def __init__(self, depth: int, in_channels: int, state_dict_path: str | None) -> None:
        super().__init__()
        net = {18: tvm.resnet18, 50: tvm.resnet50}[depth](weights=None)
        _load_user_state_dict(net, state_dict_path)
        net.conv1 = _adapt_first_conv(net.conv1, in_channels)
        self.trunk = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool,
            net.layer1, net.layer2, net.layer3, net.layer4,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = net.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(fmap), 1)


@BACKBONES.register("resnet18")
def resnet18(in_channels: int = 3, state_dict_path: str | None = None) -> Backbone:
    """torchvision ResNet-18 trunk (random init unless ``state_dict_path`` is given)."""
    return _ResNet(18, in_channels, state_dict_path)


@BACKBONES.register("resnet50")
def resnet50(in_channels: int = 3, state_dict_path: str | None = None) -> Backbone:
    """torchvision ResNet-50 trunk (random init unless ``state_dict_path`` is given)."""
    return _ResNet(50, in_channels, state_dict_path)


@BACKBONES.register("vgg11")
class VGG11(Backbone):
    """torchvision VGG-11 (BN) features + the first two fully connected layers (4096-d)."""

    def __init__(self, in_channels: int = 3, state_dict_path: str | None = None) -> None:
        super().__init__()
        net = tvm.vgg11_bn(weights=None)
        _load_user_state_dict(net, state_dict_path)
        first = net.features[0]
        assert isinstance(first, nn.Conv2d)
        net.features[0] = _adapt_first_conv(first, in_channels)
        self.trunk = net.features
        self.pool = net.avgpool
        self.head = nn.Sequential(nn.Flatten(), *list(net.classifier.children())[:-1])
        self.out_features = 4096

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(fmap))
