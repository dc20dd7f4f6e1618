"""PrototypeNet: multi-hot label -> 512-d label feature -> K-bit prototype code.

After ProS-GAN / UntargetedGAN: the label feature conditions the generator (through the
decoder); the tanh code is the label's prototype in Hamming space; a reconstruction head
predicts the label back from the feature, keeping the feature semantic.
"""

from __future__ import annotations

import torch
from torch import nn

from service.nets.catalog import NETS


@NETS.register("prototype_net")
class PrototypeNet(nn.Module):
    """y (B, C) -> {"feature": (B, feature_dim), "code": tanh (B, bits), "logits": (B, C)}."""

    def __init__(self, num_classes: int, bits: int, feature_dim: int = 512,
                 hidden: int = 1024) -> None:
        super().__init__()
        self.num_classes, self.bits, self.feature_dim = num_classes, bits, feature_dim
        self.feature = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, feature_dim), nn.ReLU(inplace=True),
        )
        self.code_head = nn.Linear(feature_dim, bits)
        self.label_head = nn.Linear(feature_dim, num_classes)

    def forward(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.feature(y.float())
        return {"feature": f, "code": torch.tanh(self.code_head(f)),
                "logits": self.label_head(f)}
