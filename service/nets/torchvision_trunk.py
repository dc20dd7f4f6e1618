"""The ``torchvision`` backbone: a torchvision classification net without its last layer.

This is the backbone of every imported hasher (``service.importers``): DeepHash-pytorch and
the code derived from it (DHTA, CIBA, ProS-GAN) build their hash nets from torchvision's
AlexNet, VGG and ResNet and put a linear hash layer where the classifier's last layer was.
The submodules keep torchvision's own attribute names (``conv1``, ``layer1``, ...,
``features``, ``classifier.0``, ...), so a hasher's state dict reads ``backbone.<torchvision
key>`` plus ``hash_layer.weight`` / ``hash_layer.bias``. Nothing is downloaded: the net is
built without weights (on the ``meta`` device, then allocated), its parameters set to zero and
its batch-norm layers to the identity, because this backbone only ever holds weights loaded
from a state dict (torchvision's random initialisation of a VGG-16 alone takes 5 s on a CPU
core). It is not meant to be trained from scratch.

``avgpool=False`` (AlexNet and VGG only) flattens the last feature map directly, as the
DeepHash-pytorch AlexNet and the DHTA/CIBA/ProS-GAN VGG nets do; torchvision's adaptive pool
is the identity at their 224 px input (6x6 and 7x7 maps), so both agree there, and without it
another input size fails as it does upstream instead of silently pooling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tvm

from service.errors import ConfigError
from service.nets.backbones import Backbone
from service.nets.catalog import BACKBONES

RESNETS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18, "resnet34": tvm.resnet34, "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101, "resnet152": tvm.resnet152,
}
PLAIN: dict[str, Callable[..., nn.Module]] = {
    "alexnet": tvm.alexnet,
    "vgg11": tvm.vgg11, "vgg13": tvm.vgg13, "vgg16": tvm.vgg16, "vgg19": tvm.vgg19,
    "vgg11_bn": tvm.vgg11_bn, "vgg13_bn": tvm.vgg13_bn, "vgg16_bn": tvm.vgg16_bn,
    "vgg19_bn": tvm.vgg19_bn,
}
MODELS = (*RESNETS, *PLAIN)


def head_name(model: str) -> str:
    """The state-dict prefix of ``model``'s last (classification) layer in torchvision."""
    return "fc" if model in RESNETS else "classifier.6"


def _empty(factory: Callable[..., nn.Module]) -> nn.Module:
    """``factory(weights=None)`` without its random initialisation: zero parameters, batch
    norm at mean 0, variance 1, scale 1 (weights are loaded afterwards)."""
    with torch.device("meta"):
        net = factory(weights=None)
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*net.parameters(), *net.buffers()):
            t.zero_()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            nn.init.ones_(m.weight)
    return net


@BACKBONES.register("torchvision")
class TorchvisionTrunk(Backbone):
    """A torchvision ResNet, VGG or AlexNet up to (not including) its last linear layer.

    Args:
        model: ``resnet18`` ... ``resnet152``, ``alexnet``, ``vgg11`` ... ``vgg19`` and the
            ``_bn`` variants (default ``resnet18``).
        avgpool: keep torchvision's adaptive average pool before the classifier (AlexNet
            and VGG; a ResNet always pools).
        in_channels: must be 3 (these are ImageNet nets; grey images are converted to RGB).
    """

    def __init__(self, model: str = "resnet18", avgpool: bool = True,
                 in_channels: int = 3) -> None:
        super().__init__()
        if model not in MODELS:
            raise ConfigError(f"unknown torchvision model {model!r}; known: "
                              f"{', '.join(MODELS)}", field="arch")
        if in_channels != 3:
            raise ConfigError(f"{model} takes RGB input (3 channels), got {in_channels}",
                              field="channels")
        self.model = model
        self.is_resnet = model in RESNETS
        if self.is_resnet:
            if not avgpool:
                raise ConfigError(f"{model} always pools before its last layer",
                                  field="arch_kwargs.avgpool")
            net = _empty(RESNETS[model])
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                         "layer4", "avgpool"):
                setattr(self, name, getattr(net, name))
            self.out_features = int(net.fc.in_features)
        else:
            net = _empty(PLAIN[model])
            self.features = net.features
            self.avgpool = net.avgpool if avgpool else nn.Identity()
            layers = list(net.classifier.children())
            self.classifier = nn.Sequential(*layers[:-1])  # keeps indices 0..5
            last = layers[-1]
            assert isinstance(last, nn.Linear)
            self.out_features = int(last.in_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_resnet:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(fmap), 1)
        return x if self.is_resnet else self.classifier(x)
