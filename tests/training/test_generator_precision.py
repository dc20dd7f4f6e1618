"""Generator training in bf16 (CPU autocast; CUDA adds channels-last, see tests/test_gpu.py):
it trains, records its precision, and what it writes attacks within eps."""

from __future__ import annotations

import shutil

import numpy as np

from helpers import REPO
from service.attacks.runner import attack_batch
from service.store import ModelStore
from service.training.generator_trainer import GeneratorConfig, train_generator


def test_bf16_generator_training_records_its_precision(tmp_path) -> None:
    store = tmp_path / "store"
    shutil.copytree(REPO / "model_store" / "fmnist-dpsh-32", store / "b")
    cfg = GeneratorConfig(attack="untargeted_gan_plus", eps_min=8 / 255, eps_max=16 / 255,
                          epochs=1, batch_size=64, num_train=128, width=8, blocks=2,
                          precision="bf16", val_num=200)
    entry = train_generator(store / "b", cfg, device="cpu", progress=False)
    t = entry["training"]
    assert t["precision"] == "bf16" and t["config"]["precision"] == "bf16"
    assert np.isfinite(t["history"][0]["l_t"]) and 0 <= t["history"][0]["bits_flipped"] <= 1

    bundle = ModelStore(store, "cpu", "bf16").get("b")
    q = bundle.queries
    res = attack_batch(bundle, "untargeted_gan_plus", 16 / 255, q.images[:16], q.labels[:16])
    assert np.abs(res.adversarial.astype(int) - q.images[:16].astype(int)).max() <= 16
