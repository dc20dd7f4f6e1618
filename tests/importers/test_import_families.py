"""Every upstream family: a net with the upstream names and random weights, saved with
``torch.save``, imported into a bundle and loaded back from its safetensors, gives the same
outputs (bit for bit, CPU) as the net itself on the same preprocessed images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision import models
from upstream_nets import (
    DeepHashAlexNet,
    DeepHashResNet,
    GreedyHashVGG16,
    ProsGanVGG,
    VGGHash,
    normalise,
    randomize,
)

from service.cli import main
from service.errors import BundleError, ConfigError
from service.importers.importer import ImportSpec, build_hasher_from_checkpoint, import_checkpoint
from service.store import load_bundle, load_hasher


def _images(n: int, side: int, seed: int) -> torch.Tensor:
    """uint8 images at model size, as [0, 1] floats (ToTensor of a preprocessed image)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)).float() / 255


def _imported_outputs(folder: Path, x: torch.Tensor) -> torch.Tensor:
    _, hasher = load_hasher(folder)
    with torch.no_grad():
        return hasher(x)


CASES = {
    # name: (net factory, --arch, side, layout, output of the upstream net from u)
    "alexnet": (lambda: DeepHashAlexNet(32), "AlexNet", 224, "DeepHash-pytorch/AlexNet",
                lambda u: u),
    "vgg11": (lambda: VGGHash("vgg11", 24), "VGG11", 224, "DHTA/VGGHash", torch.tanh),
    "vgg16": (lambda: GreedyHashVGG16(48), "VGG16", 224,
              "DeepHash-pytorch/GreedyHashModelUnsupervised", torch.sign),
    "resnet18": (lambda: DeepHashResNet(16, 18), "ResNet18", 64, "DeepHash-pytorch/ResNet",
                 lambda u: u),
    "resnet50": (lambda: DeepHashResNet(64, 50), "ResNet50", 64, "DeepHash-pytorch/ResNet",
                 lambda u: u),
}


@pytest.mark.parametrize("case", list(CASES))
def test_upstream_net_imports_with_identical_codes(case: str, tmp_path: Path) -> None:
    factory, arch, side, layout, out = CASES[case]
    net = randomize(factory(), seed=len(case))
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    # 64 px ResNets: a shorter-side resize to the crop (their pooling takes any size)
    sizes = {} if side == 224 else {"resize": side, "crop": side}
    m = import_checkpoint(ImportSpec("deephash", arch, case, **sizes), ckpt, tmp_path / "store")
    prov = m.extra["provenance"]
    assert prov["layout"] == layout and m.extra["indexed"] is False
    assert prov["checkpoint"]["loader"].startswith("torch.load(weights_only=True")
    assert m.input["transform"]["crop"] == [side, side]
    x = _images(2, side, seed=7)
    with torch.no_grad():
        theirs = net(normalise(x))
    u = _imported_outputs(tmp_path / "store" / case, x)
    assert torch.equal(out(u), theirs)  # bit for bit, not close
    assert torch.equal(torch.where(u >= 0, 1.0, -1.0), torch.where(theirs >= 0, 1.0, -1.0))


def test_torchvision_format_with_a_named_hash_layer(tmp_path: Path) -> None:
    """A torchvision ResNet-18 whose classifier became Identity and whose hash layer sits
    at ``hash``, saved as safetensors, through the CLI."""
    tv = models.resnet18(weights=None)
    tv.fc = nn.Identity()
    tv.hash = nn.Linear(512, 12)
    randomize(tv, seed=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    assert main(["import", "torchvision", "--arch", "resnet18", "--weights", str(path),
                 "--hash-layer", "hash", "--bits", "12", "--crop", "64", "--name", "tvr18",
                 "--store", str(tmp_path / "store")]) == 0
    x = _images(3, 64, seed=1)
    with torch.no_grad():
        theirs = tv.hash(tv(normalise(x)))
    assert torch.equal(_imported_outputs(tmp_path / "store" / "tvr18", x), theirs)
    manifest, _ = load_hasher(tmp_path / "store" / "tvr18")
    prov = manifest.extra["provenance"]
    assert prov["format"] == "torchvision" and prov["hash_layer"] == "hash"
    assert prov["checkpoint"]["loader"] == "safetensors"
    # not indexed yet: served nowhere, with a message that says what to do
    with pytest.raises(BundleError, match="hashaudit index tvr18"):
        load_bundle(tmp_path / "store" / "tvr18")


def test_torchvision_default_hash_layer_is_the_classifier_slot(tmp_path: Path) -> None:
    tv = models.resnet18(weights=None)
    tv.fc = nn.Linear(512, 8)
    randomize(tv, seed=4)
    ckpt = tmp_path / "r.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()},
                "epoch": 12}, ckpt)  # wrapped, and saved from DataParallel
    hasher, lay, _, rec = build_hasher_from_checkpoint(
        ImportSpec("torchvision", "resnet18", "x", crop=64), ckpt)
    assert lay.hash_key == "fc" and rec["state_key"] == "state_dict"
    assert rec["stripped_prefix"] == "module."
    x = _images(2, 64, seed=2)
    with torch.no_grad():
        assert torch.equal(hasher(x), tv(normalise(x)))


def test_prosgan_vgg_layout_is_told_from_the_dhta_one_by_its_keys(tmp_path: Path) -> None:
    """ProS-GAN registers cl1 twice (``cl1`` and ``classifier.0``); the key names alone pick
    the layout among the VGG ones, and the two names must hold one tensor."""
    from service.importers.importer import match_layout
    from service.nets.torchvision_trunk import TorchvisionTrunk

    net = ProsGanVGG("vgg11", 16)  # structure only: key names and shapes
    state = net.state_dict()
    spec = ImportSpec("deephash", "VGG11", "x")
    trunk = TorchvisionTrunk("vgg11")
    assert match_layout(spec, "vgg11", trunk, state, "m.pt").name == "ProS-GAN/VGG"
    dhta = VGGHash("vgg11", 16).state_dict()
    assert match_layout(spec, "vgg11", trunk, dhta, "m.pt").name == "DHTA/VGGHash"


def test_wrong_arch_bits_shared_layers_and_crop_are_refused(tmp_path: Path) -> None:
    net = randomize(DeepHashResNet(16, 18), seed=1)
    ckpt = tmp_path / "r18.pt"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(ConfigError) as info:
        build_hasher_from_checkpoint(ImportSpec("deephash", "ResNet50", "x"), ckpt)
    assert info.value.field == "checkpoint" and "DeepHash-pytorch/ResNet" in info.value.message
    assert "--arch" in info.value.message and "conv3.weight" in info.value.message
    with pytest.raises(ConfigError) as info:
        build_hasher_from_checkpoint(ImportSpec("deephash", "ResNet18", "x", bits=32), ckpt)
    assert info.value.field == "bits" and "16 bits" in info.value.message
    with pytest.raises(ConfigError) as info:
        build_hasher_from_checkpoint(ImportSpec("deephash", "VGG99", "x"), ckpt)
    assert info.value.field == "arch"
    state = net.state_dict()
    state["feature_layers.0.weight"] = state["feature_layers.0.weight"] + 1  # no longer shared
    torch.save(state, tmp_path / "split.pt")
    with pytest.raises(ConfigError, match="conv1.weight and feature_layers.0.weight"):
        build_hasher_from_checkpoint(ImportSpec("deephash", "ResNet18", "x"),
                                     tmp_path / "split.pt")
    alex = tmp_path / "alex.pt"
    torch.save(DeepHashAlexNet(8).state_dict(), alex)
    with pytest.raises(ConfigError) as info:  # AlexNet's hash layer takes 256x6x6 features
        build_hasher_from_checkpoint(ImportSpec("deephash", "AlexNet", "x", crop=64), alex)
    assert info.value.field == "crop" and "224" in info.value.message
