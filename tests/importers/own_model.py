"""What a DeepHash-pytorch user has and types: shared by the import tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from upstream_nets import IMAGENET_MEAN, IMAGENET_STD

SIDE = 64
BITS = 16


def deephash_codes(net: torch.nn.Module, list_file: Path, root: Path) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """``compute_result`` of DeepHash-pytorch's utils/tools.py for one list: sign codes
    (float32) and labels, images through Resize, CenterCrop, ToTensor, Normalize."""
    prep = transforms.Compose([transforms.Resize(SIDE), transforms.CenterCrop(SIDE),
                               transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    codes, labels = [], []
    for line in list_file.read_text().splitlines():
        path, *lab = line.split()
        img = Image.open(root / path).convert("RGB")
        with torch.no_grad():
            codes.append(net(prep(img)[None]).sign()[0].numpy())
        labels.append([int(v) for v in lab])
    return np.stack(codes).astype(np.float32), np.asarray(labels, np.int64)



def import_args(data: dict, store: Path, name: str) -> list[str]:
    return ["import", "deephash", "--arch", "ResNet18", "--checkpoint",
            str(data["checkpoint"]), "--name", name, "--bits", str(BITS), "--resize",
            str(SIDE), "--crop", str(SIDE), "--store", str(store)]


def index_args(data: dict, store: Path, name: str, *extra: str) -> list[str]:
    return ["index", name, "--database", str(data["database"]), "--root", str(data["root"]),
            "--query", str(data["query"]), "--class-names", ",".join(data["class_names"]),
            "--store", str(store), "--device", "cpu", "--no-progress", "--workers", "2",
            *extra]
