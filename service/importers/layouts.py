"""Upstream hash nets, re-created with their exact state-dict key names.

Each :class:`Layout` builds a module whose ``state_dict()`` keys are those of one upstream
class, assembled from the very submodules of a HashAudit hasher (a
:class:`~service.nets.torchvision_trunk.TorchvisionTrunk` backbone and its ``hash_layer``).
``load_state_dict(user_state, strict=True)`` on that module therefore checks every upstream
name and shape and fills the hasher in one step; no key is renamed by hand. Where upstream
registers one module under two names (DeepHash-pytorch's ResNet keeps ``conv1`` and
``feature_layers.0``), both names are expected and must hold equal tensors.

Sources matched (the versions read, by commit):

* swuxyj/DeepHash-pytorch ``ab14068e`` (2022-09-19; ``network.py`` last changed in
  ``796d5f7``, 2020-08-23): ``network.py`` ``AlexNet`` and ``ResNet`` (ResNet18/34/50/101/152),
  and the VGG-16 of ``Unsupervised_GreedyHash.py`` / ``Unsupervised_BiHalf.py`` (``vgg`` +
  ``fc_encode``). ``network.py`` holds no VGG.
* jiawangbai/DHTA-master ``9a38fb6a`` ``model.py`` ``VGGHash`` and KuofengGao/CIBA
  ``99b9ff98`` ``models.py`` ``VGGHash``: the same VGG layout (``features``,
  ``hash_layer.classifier0..5``, ``hash_layer.hash``).
* xunguangwang/ProS-GAN ``fdb70406`` ``model/backbone.py`` and
  xunguangwang/Targeted-Attack-and-Defense-for-Deep-Hashing (THA) ``aea6f6cd``
  ``model/backbone.py``: ``AlexNet`` (``classifier`` where DeepHash-pytorch says
  ``hash_layer``), ``VGG`` (``cl1`` shared with ``classifier.0``), ``ResNet`` (the names of
  DeepHash-pytorch's), and the HashNet variants ``AlexNetFc`` / ``VGGFc``.

Every one of them builds on torchvision's AlexNet, VGG or ResNet and applies the ImageNet
normalisation outside the net (THA inside its ``forward``; ProS-GAN not at all): HashAudit's
hasher normalises inside, with the mean and std recorded in the bundle.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from service.errors import ConfigError
from service.nets.torchvision_trunk import MODELS, RESNETS, TorchvisionTrunk, head_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEEPHASH = {"repository": "swuxyj/DeepHash-pytorch",
            "commit": "ab14068ea9b33e8fe12de49d976d0c2e3f0dc129"}
DHTA = {"repository": "jiawangbai/DHTA-master",
        "commit": "9a38fb6acb0dfb5fa9b1f56e5c03ebea41fb528b"}
CIBA = {"repository": "KuofengGao/CIBA", "commit": "99b9ff98a8585f2497f47f851e95d965a1f9a4b4"}
PROSGAN = {"repository": "xunguangwang/ProS-GAN",
           "commit": "fdb7040698b7e32af58d65a003c9a4e02d299fa5"}
THA = {"repository": "xunguangwang/Targeted-Attack-and-Defense-for-Deep-Hashing",
       "commit": "aea6f6cdf3fac5796b906a57240036ebc75f86e4"}

# The test transforms the upstream code evaluates with.
DEEPHASH_EVAL = {"resize": 256, "crop": 224, "interpolation": "bilinear",
                 "resize_mode": "shorter", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                 "source": "DeepHash-pytorch utils/tools.py image_transform (test): "
                           "Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet)"}
DHTA_EVAL = {"resize": 256, "crop": 224, "interpolation": "bicubic", "resize_mode": "stretch",
             "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
             "source": "DHTA dataset.py / CIBA dataloader.py (test): ResizeImage(256) (a "
                       "256x256 stretch, Pillow's default bicubic filter), PlaceCrop(224, "
                       "15.5, 15.5) (Pillow rounds the box: offset 16, the centre), ToTensor, "
                       "Normalize(ImageNet)"}

Builder = Callable[[TorchvisionTrunk, nn.Linear], nn.Module]


@dataclass(frozen=True)
class Layout:
    """One upstream class's module tree over a hasher's modules.

    Attributes:
        name: ``<repository short name>/<class>``, as recorded in the manifest.
        fmt: the ``hashaudit import`` format that offers it (``deephash`` or
            ``torchvision``).
        models: the torchvision models it is built on.
        hash_key: state-dict prefix of the hash layer (a ``nn.Linear``).
        avgpool: whether the upstream forward pools before flattening (see
            :mod:`service.nets.torchvision_trunk`).
        build: ``(trunk, hash_layer) -> module`` with the upstream names.
        upstream: where the names come from: ``{repository, commit, path, symbol}`` each.
        evaluation: the upstream test transform (resize, crop, interpolation, resize_mode,
            mean, std, source).
    """

    name: str
    fmt: str
    models: tuple[str, ...]
    hash_key: str
    avgpool: bool
    build: Builder
    upstream: tuple[dict[str, str], ...]
    evaluation: dict[str, Any] = field(default_factory=lambda: dict(DEEPHASH_EVAL))


def _module(**children: nn.Module) -> nn.Module:
    m = nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m


def _resnet_parts(t: TorchvisionTrunk) -> dict[str, nn.Module]:
    return {n: getattr(t, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                        "layer3", "layer4", "avgpool")}


def _deephash_resnet(t: TorchvisionTrunk, h: nn.Linear) -> nn.Module:
    parts = _resnet_parts(t)
    return _module(**parts, feature_layers=nn.Sequential(*parts.values()), hash_layer=h)


def _numbered(t: TorchvisionTrunk) -> OrderedDict[str, nn.Module]:
    return OrderedDict((f"classifier{i}", t.classifier[i]) for i in range(6))


VGGS = tuple(m for m in MODELS if m.startswith("vgg"))
RESNET_MODELS = tuple(RESNETS)

LAYOUTS: tuple[Layout, ...] = (
    Layout("DeepHash-pytorch/AlexNet", "deephash", ("alexnet",), "hash_layer.6", False,
           lambda t, h: _module(features=t.features,
                                hash_layer=nn.Sequential(*t.classifier, h)),
           ({**DEEPHASH, "path": "network.py", "symbol": "AlexNet"},)),
    Layout("DeepHash-pytorch/ResNet", "deephash", RESNET_MODELS, "hash_layer", True,
           _deephash_resnet,
           ({**DEEPHASH, "path": "network.py", "symbol": "ResNet"},
            {**PROSGAN, "path": "model/backbone.py", "symbol": "ResNet"},
            {**THA, "path": "model/backbone.py", "symbol": "ResNet"})),
    Layout("DeepHash-pytorch/GreedyHashModelUnsupervised", "deephash", VGGS, "fc_encode",
           False,
           lambda t, h: _module(vgg=_module(features=t.features,
                                            classifier=nn.Sequential(*t.classifier)),
                                fc_encode=h),
           ({**DEEPHASH, "path": "Unsupervised_GreedyHash.py",
             "symbol": "GreedyHashModelUnsupervised"},
            {**DEEPHASH, "path": "Unsupervised_BiHalf.py", "symbol": "BiHalfModelUnsupervised"})),
    Layout("DHTA/VGGHash", "deephash", VGGS, "hash_layer.hash", False,
           lambda t, h: _module(features=t.features,
                                hash_layer=nn.Sequential(OrderedDict(
                                    [*_numbered(t).items(), ("hash", h)]))),
           ({**DHTA, "path": "model.py", "symbol": "VGGHash"},
            {**CIBA, "path": "models.py", "symbol": "VGGHash"}),
           dict(DHTA_EVAL)),
    Layout("ProS-GAN/AlexNet", "deephash", ("alexnet",), "classifier.6", False,
           lambda t, h: _module(features=t.features,
                                classifier=nn.Sequential(*t.classifier, h)),
           ({**PROSGAN, "path": "model/backbone.py", "symbol": "AlexNet"},
            {**THA, "path": "model/backbone.py", "symbol": "AlexNet"})),
    Layout("ProS-GAN/VGG", "deephash", VGGS, "classifier.6", False,
           lambda t, h: _module(features=t.features, cl1=t.classifier[0],
                                classifier=nn.Sequential(*t.classifier, h)),
           ({**PROSGAN, "path": "model/backbone.py", "symbol": "VGG"},
            {**THA, "path": "model/backbone.py", "symbol": "VGG"})),
    Layout("ProS-GAN/HashNetFc", "deephash", ("alexnet", *VGGS), "hash_layer", False,
           lambda t, h: _fc(t, h),
           ({**PROSGAN, "path": "model/backbone.py", "symbol": "AlexNetFc / VGGFc"},
            {**THA, "path": "model/backbone.py", "symbol": "AlexNetFc / VGGFc"})),
)


def _fc(t: TorchvisionTrunk, h: nn.Linear) -> nn.Module:
    classifier = nn.Sequential(_numbered(t))
    return _module(features=t.features, classifier=classifier,
                   feature_layers=nn.Sequential(t.features, classifier), hash_layer=h)


def torchvision_layout(model: str, hash_key: str | None) -> Layout:
    """A torchvision ``model`` whose last layer is a hash ``nn.Linear`` at ``hash_key``
    (default: where the classifier's last layer sits, ``fc`` or ``classifier.6``); the other
    keys are torchvision's own."""
    if model not in MODELS:
        raise ConfigError(f"arch: unknown torchvision model {model!r}; known: "
                          f"{', '.join(MODELS)}", field="arch")
    key = hash_key or head_name(model)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key) or len(key) > 100:
        raise ConfigError(f"hash_layer: {key!r} is not a module path such as fc or "
                          "classifier.6", field="hash_layer")

    def build(t: TorchvisionTrunk, h: nn.Linear) -> nn.Module:
        if t.is_resnet:
            root = _module(**_resnet_parts(t))
        else:
            root = _module(features=t.features, avgpool=t.avgpool,
                           classifier=nn.Sequential(*t.classifier))
        *path, leaf = key.split(".")
        node = root
        for part in path:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        if leaf in node._modules:
            raise ConfigError(f"hash_layer: {key!r} is a layer of {model} itself; name the "
                              "hash layer's own module", field="hash_layer")
        node.add_module(leaf, h)
        return root

    return Layout(f"torchvision/{model}", "torchvision", (model,), key, True, build,
                  ({"repository": "pytorch/vision", "commit": "", "path":
                    f"torchvision/models ({model})", "symbol": model},),
                  {**DEEPHASH_EVAL, "source": "torchvision's ImageNet evaluation: Resize(256), "
                                              "CenterCrop(224), Normalize(ImageNet)"})


def deephash_model(arch: str) -> str:
    """The torchvision model of an upstream ``--arch`` name: ``AlexNet``, ``ResNet50``,
    ``VGG16``, ``VGG16BN`` / ``vgg16_bn`` (case-insensitive)."""
    a = arch.strip().lower().replace("-", "").replace("_", "")
    m = re.fullmatch(r"(vgg\d+)(bn)?", a)
    model = (m.group(1) + ("_bn" if m.group(2) else "")) if m else a
    if model not in MODELS:
        raise ConfigError(f"arch: unknown upstream architecture {arch!r}; use AlexNet, "
                          "ResNet18/34/50/101/152 or VGG11/13/16/19 (with BN: VGG16BN)",
                          field="arch")
    return model


def layouts_for(fmt: str, model: str) -> list[Layout]:
    return [lay for lay in LAYOUTS if lay.fmt == fmt and model in lay.models]
