from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import needs_fmnist
from service.data import load_fashion_mnist
from service.errors import ConfigError
from service.training.hasher import HasherConfig, train_hasher


@pytest.fixture(scope="module")
def small_train():
    needs_fmnist()
    data = load_fashion_mnist(split="train")
    return data.subset(np.arange(256))


CFG = dict(arch_kwargs={"width": 8}, bits=16, epochs=2, batch_size=64, lr=3e-3)


def test_resume_from_a_mid_run_checkpoint_matches(small_train, tmp_path) -> None:
    ck = tmp_path / "ck"
    cfg = HasherConfig(**CFG)
    # Simulate a run killed right after its first checkpoint was written.
    from service.training import hasher as mod

    calls = {"n": 0}
    real_save = mod.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(*a, **kw):
        real_save(*a, **kw)
        calls["n"] += 1
        raise Stop

    mod.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            train_hasher(cfg, small_train, device="cpu", checkpoint_dir=ck, progress=False)
    finally:
        mod.save_checkpoint = real_save
    assert calls["n"] == 1
    resumed, hist = train_hasher(cfg, small_train, device="cpu", checkpoint_dir=ck,
                                 progress=False)
    straight, hist_s = train_hasher(cfg, small_train, device="cpu", progress=False)
    assert [h["epoch"] for h in hist] == [1, 2]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(),
                              strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_checkpoint_of_another_config_is_refused(small_train, tmp_path) -> None:
    ck = tmp_path / "ck"
    train_hasher(HasherConfig(**{**CFG, "epochs": 1}), small_train, device="cpu",
                 checkpoint_dir=ck, progress=False)
    with pytest.raises(ConfigError, match="another config"):
        train_hasher(HasherConfig(**{**CFG, "epochs": 1, "bits": 32}), small_train,
                     device="cpu", checkpoint_dir=ck, progress=False)


def test_unknown_hasher_config_key_is_named() -> None:
    with pytest.raises(ConfigError, match="bitz"):
        HasherConfig.from_dict({"bitz": 3})


def test_history_records_the_precision_each_epoch_ran_in(small_train) -> None:
    """CPU default (auto) is fp32; bf16 trains under CPU autocast. Either way the returned
    hasher is fp32 again, in the default memory format (safetensors can write it)."""
    from safetensors.torch import save

    cfg = {**CFG, "epochs": 1}
    fp32, hist32 = train_hasher(HasherConfig(**cfg), small_train, device="cpu", progress=False)
    bf16, hist16 = train_hasher(HasherConfig(**cfg, precision="bf16"), small_train,
                                device="cpu", progress=False)
    assert [h["precision"] for h in hist32] == ["fp32"]
    assert [h["precision"] for h in hist16] == ["bf16"]
    assert np.isfinite(hist16[0]["loss"]) and hist16[0]["loss"] != hist32[0]["loss"]
    for h in (fp32, bf16):
        assert h.precision == "fp32" and not h.channels_last
        save(h.state_dict())
