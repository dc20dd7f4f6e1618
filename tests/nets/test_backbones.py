from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models as tvm

from service.errors import UnknownName
from service.nets import BACKBONES, build_hasher, create_backbone


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_and_exposes_features(name: str) -> None:
    size = 28 if name == "small_cnn" else 64
    channels = 1 if name == "small_cnn" else 3
    h = build_hasher(name, bits=24, num_classes=5, in_channels=channels,
                     mean=[0.5] * channels, std=[0.5] * channels).eval()
    x = torch.rand(2, channels, size, size)
    u = h(x)
    assert u.shape == (2, 24) and torch.isfinite(u).all()
    fmap = h.forward_features(x)
    assert fmap.dim() == 4
    assert torch.allclose(h.forward_from_features(fmap), u, atol=1e-5)
    codes = h.codes(x)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert h.classifier is not None and h.classifier(torch.tanh(u)).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "resnet50"])
def test_paper_scale_backbones_at_224px(name: str) -> None:
    h = build_hasher(name, bits=64, in_channels=3, mean=[0.485, 0.456, 0.406],
                     std=[0.229, 0.224, 0.225]).eval()
    with torch.no_grad():
        u = h(torch.rand(1, 3, 224, 224))
        fmap = h.forward_features(torch.rand(1, 3, 224, 224))
    assert u.shape == (1, 64)
    assert fmap.shape[-2:] == (7, 7)


def test_grayscale_input_for_torchvision_backbone() -> None:
    net = create_backbone("resnet18", in_channels=1)
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 512)


def test_user_supplied_torchvision_state_dict_is_loaded(tmp_path) -> None:
    ref = tvm.resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net = create_backbone("resnet18", state_dict_path=str(path))
    assert torch.equal(net.trunk[0].weight, ref.conv1.weight)
    pth = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), pth)
    net2 = create_backbone("resnet18", state_dict_path=str(pth))
    assert torch.equal(net2.trunk[4][0].conv1.weight, ref.layer1[0].conv1.weight)


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(UnknownName) as err:
        create_backbone("alexnet")
    assert "small_cnn" in err.value.message and "resnet50" in err.value.message
