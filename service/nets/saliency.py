"""Grad-CAM on a hasher (after the Grad-CAM-constrained generative attack paper).

The "class score" of a hasher is the similarity of its relaxed code to a reference code
(the clean code, or a prototype): ``s = sum_k ref_k * tanh(scale * u_k)``. Grad-CAM weights
each channel of the last convolutional map ``A`` by the spatial mean of ds/dA and takes
``ReLU(sum_c w_c A_c)``, normalised per image to a maximum of 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.nets.hasher import Hasher


def gradcam(hasher: Hasher, x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor,
            differentiable: bool = False) -> torch.Tensor:
    """(B, h, w) saliency maps of ``x`` for the code similarity to ``ref`` (B, K).

    With ``differentiable``, the map keeps its graph to ``x`` through the feature map (the
    channel weights are treated as constants, which avoids double back-propagation).
    """
    with torch.enable_grad():
        fmap = hasher.forward_features(x)
        probe = fmap if differentiable else fmap.detach().requires_grad_(True)
        u = hasher.forward_from_features(probe)
        score = (ref * torch.tanh(scale * u)).sum()
        (grad,) = torch.autograd.grad(score, probe, retain_graph=differentiable)
    weights = grad.detach().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * (fmap if differentiable else fmap.detach())).sum(1))
    return cam / cam.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]


def cam_distance(cam_a: torch.Tensor, cam_b: torch.Tensor) -> torch.Tensor:
    """Per-image L2 distance between two saliency maps."""
    return (cam_a - cam_b).flatten(1).norm(dim=1)
