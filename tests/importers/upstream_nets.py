"""Hash nets with the upstream state-dict names, written here from the upstream sources'
structure (not from service.importers), with seeded random weights.

* DeepHash-pytorch ``network.py`` (swuxyj/DeepHash-pytorch ab14068e): ``AlexNet``
  (``features``, ``hash_layer`` of 7 layers; the features are flattened without pooling) and
  ``ResNet`` (``conv1`` ... ``avgpool``, the same modules again as ``feature_layers``,
  ``hash_layer``).
* DeepHash-pytorch ``Unsupervised_GreedyHash.py``: torchvision VGG-16 as ``vgg`` with the
  classifier cut to 6 layers, ``fc_encode``; eval output is the sign.
* DHTA ``model.py`` / CIBA ``models.py`` ``VGGHash``: ``features``, ``hash_layer`` with
  children ``classifier0`` ... ``classifier5`` and ``hash``; tanh output.
* ProS-GAN ``model/backbone.py`` ``VGG``: ``features``, ``cl1`` (also ``classifier.0``),
  ``classifier``; tanh output.

Upstream builds them from ImageNet weights (``pretrained=True``); here torchvision's nets are
made on the meta device (no download, no slow initialisation) and filled with seeded random
values. Inputs are normalised outside the nets, as upstream's data loaders do.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision import models

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _tv(factory):
    with torch.device("meta"):
        net = factory(weights=None)
    return net.to_empty(device="cpu")


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights of a sensible scale, and random batch-norm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if name.endswith("num_batches_tracked"):
                t.zero_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=g)
            elif name.endswith("running_mean") or t.ndim == 1:
                t.normal_(0.0, 0.1, generator=g)
            else:
                t.normal_(0.0, 1.0 / t[0].numel() ** 0.5, generator=g)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
    return module.eval()


class DeepHashAlexNet(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.features = _tv(models.alexnet).features
        self.hash_layer = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hash_layer(self.features(x).view(x.size(0), 256 * 6 * 6))


class DeepHashResNet(nn.Module):
    def __init__(self, bits: int, depth: int) -> None:
        super().__init__()
        r = _tv(getattr(models, f"resnet{depth}"))
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.avgpool = r.avgpool
        self.feature_layers = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool,
                                            self.layer1, self.layer2, self.layer3, self.layer4,
                                            self.avgpool)
        self.hash_layer = nn.Linear(r.fc.in_features, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hash_layer(self.feature_layers(x).view(x.size(0), -1))


class GreedyHashVGG16(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.vgg = _tv(models.vgg16)
        self.vgg.classifier = nn.Sequential(*list(self.vgg.classifier.children())[:6])
        self.fc_encode = nn.Linear(4096, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vgg.features(x).view(x.size(0), -1)
        return self.fc_encode(self.vgg.classifier(x)).sign()


class VGGHash(nn.Module):
    def __init__(self, name: str, bits: int) -> None:
        super().__init__()
        v = _tv(getattr(models, name))
        self.features = v.features
        self.hash_layer = nn.Sequential(OrderedDict(
            [(f"classifier{i}", v.classifier[i]) for i in range(6)]
            + [("hash", nn.Linear(4096, bits))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hash_layer(self.features(x).view(x.size(0), -1)))


class ProsGanVGG(nn.Module):
    def __init__(self, name: str, bits: int) -> None:
        super().__init__()
        v = _tv(getattr(models, name))
        self.features = v.features
        self.cl1 = v.classifier[0]
        self.classifier = nn.Sequential(self.cl1, nn.ReLU(inplace=True), nn.Dropout(),
                                        v.classifier[3], nn.ReLU(inplace=True), nn.Dropout(),
                                        nn.Linear(4096, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.classifier(self.features(x).view(x.size(0), -1)))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """What upstream's ``transforms.Normalize(ImageNet)`` does to each image."""
    from torchvision import transforms

    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return torch.stack([norm(img) for img in x])
