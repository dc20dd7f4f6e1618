"""CUDA checks (marker ``gpu``; skipped by default, run with ``pytest -m gpu`` on a GPU host)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("no CUDA device: run the gpu marker on a GPU host")
    return torch.device("cuda")


def test_auto_device_picks_cuda(cuda):
    from service.device import resolve_device

    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("method", ["pgd", "untargeted_gan"])
def test_attacks_on_cuda_stay_within_eps_and_match_cpu_codes(cuda, method):
    """The shipped bundle on CUDA: uint8 output within eps, codes as the CPU computes them."""
    from helpers import REPO
    from service.attacks.runner import attack_batch
    from service.nets.hasher import encode_uint8
    from service.store import ModelStore

    gpu_bundle = ModelStore(REPO / "model_store", "cuda").get("fmnist-dpsh-32")
    cpu_bundle = ModelStore(REPO / "model_store", "cpu").get("fmnist-dpsh-32")
    q = gpu_bundle.queries
    images, labels = q.images[:256], q.labels[:256]
    eps = 8 / 255
    res = attack_batch(gpu_bundle, method, eps, images, labels)
    diff = np.abs(res.adversarial.astype(int) - images.astype(int))
    assert res.adversarial.dtype == np.uint8 and diff.max() <= 8
    cpu_codes = encode_uint8(cpu_bundle.hasher, res.adversarial)
    agree = (cpu_codes == res.adv_codes).all(1).mean()
    assert agree > 0.99, agree  # bits with |u| ~ 0 may flip between devices
    assert res.hamming.mean() > 1.0


def test_paper_scale_generator_forward_on_cuda(cuda):
    """224 px RGB, the paper's decoder/generator shapes, ResNet-50 hasher (random init)."""
    from service.nets import build_hasher, create_net
    from service.nets.gan import paper_shapes

    s = paper_shapes(num_classes=80, bits=64)
    hasher = build_hasher("resnet50", bits=64, in_channels=3, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225)).to(cuda).eval()
    dec = create_net("label_decoder", **s["label_decoder"]).to(cuda).eval()
    gen = create_net("perturbation_generator", **s["perturbation_generator"]).to(cuda).eval()
    x = torch.rand(8, 3, 224, 224, device=cuda)
    feat = torch.randn(8, 512, device=cuda)
    with torch.inference_mode():
        delta = gen(x, dec(feat), 8 / 255)
        u = hasher(x + delta)
    assert delta.abs().max() <= 8 / 255 + 1e-6 and u.shape == (8, 64)


def test_backdoor_audit_chunks_run_on_cuda(cuda, tmp_path):
    """A short backdoor audit with the bundle on CUDA (what a GPU worker holds): trigger,
    poisoning, retraining and evaluation all run, and the poisoned bundle is frozen."""
    from helpers import REPO
    from service.inference import BundleService
    from service.jobs.queue import run_local_audit
    from service.jobs.spec import normalize_spec
    from service.store import ModelStore, load_bundle

    store = ModelStore(REPO / "model_store", "cuda")
    svc = BundleService(store.get("fmnist-dpsh-32"))
    spec = normalize_spec(svc, {"type": "backdoor", "seed": 0, "backdoor": {
        "target": "Bag", "poisons": [20], "num_train": 500, "epochs": 1, "trigger_steps": 10}})
    queue, audit_id = run_local_audit(store, spec, artifact_dir=tmp_path)
    st = queue.status(audit_id)
    assert st["state"] == "done", st["error"]
    row = st["result"]["rows"][1]
    assert row["poisons"] == 20 and 0.0 <= row["t_map_triggered"] <= 1.0
    assert load_bundle(row["bundle"]["path"]).manifest.extra["poisoned"]["target_name"] == "Bag"
