"""Grad-CAM on a real tiny hasher."""

from __future__ import annotations

import torch

from service.attacks.base import scale_for
from service.nets.saliency import cam_distance, gradcam
from service.store import load_bundle


def test_gradcam_maps_are_normalised_and_differentiable(tiny_store):
    b = load_bundle(tiny_store / "tiny")
    x = torch.from_numpy(b.queries.images[:6]).float() / 255
    with torch.no_grad():
        u0 = b.hasher(x)
    ref, scale = torch.where(u0 >= 0, 1.0, -1.0), scale_for(u0)
    cam = gradcam(b.hasher, x, ref, scale)
    fmap = b.hasher.forward_features(x)
    assert cam.shape == (6, *fmap.shape[-2:]) and not cam.requires_grad
    assert torch.all(cam >= 0) and torch.allclose(cam.flatten(1).amax(1), torch.ones(6))
    xa = (x + 0.05 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    cam_a = gradcam(b.hasher, xa, ref, scale, differentiable=True)
    d = cam_distance(cam, cam_a)
    assert d.shape == (6,) and torch.all(d >= 0)
    (g,) = torch.autograd.grad(-d.mean(), xa)
    assert g.abs().sum() > 0
