"""A user's side of an import, made once per session: a small synthetic data set in the
DeepHash-pytorch list layout (64 px scenes: 60 database, 20 query images), a DeepHash-pytorch
ResNet-18 hash net with random weights saved with ``torch.save``, and the ``.npy`` files
DeepHash-pytorch's ``validate`` would save for it (codes from the net on images prepared by
torchvision's transforms, not by HashAudit's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from own_model import BITS, SIDE, deephash_codes
from upstream_nets import DeepHashResNet, randomize

from helpers import needs_fmnist


@pytest.fixture(scope="session")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    needs_fmnist()
    from service.data.fashion_mnist import load_fashion_mnist
    from service.data.scenes import SceneParams, write_scene_dataset

    out = tmp_path_factory.mktemp("own_data")
    scenes = out / "scenes"
    write_scene_dataset(scenes, load_fashion_mnist(None, "train"),
                        load_fashion_mnist(None, "test"), database=60, train=30, query=20,
                        seed=0, params=SceneParams(size=SIDE))
    net = randomize(DeepHashResNet(BITS, 18), seed=11)
    ckpt = out / "model.pt"
    torch.save(net.state_dict(), ckpt)
    saved = out / "save"
    saved.mkdir()
    for part, list_name in (("trn", "database.txt"), ("tst", "test.txt")):
        codes, labels = deephash_codes(net, scenes / list_name, scenes)
        np.save(saved / f"{part}_binary.npy", codes)
        np.save(saved / f"{part}_label.npy", labels)
    names = json.loads((scenes / "dataset.json").read_text())["class_names"]
    return {"root": scenes, "database": scenes / "database.txt", "query": scenes / "test.txt",
            "checkpoint": ckpt, "net": net, "save": saved, "class_names": names}

