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
    from service.jobs.queue import run_local_audit
    from service.jobs.spec import normalize_spec
    from service.serving import BundleService
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


def _rgb224(images: np.ndarray) -> np.ndarray:
    """Grey uint8 images (N, 1, h, w) -> RGB uint8 at 224 px (bilinear), natural-looking
    inputs for a 224 px net on a machine without a photo data set."""
    x = torch.from_numpy(images).float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear",
                                        align_corners=False)
    return x.repeat(1, 3, 1, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def _resnet50(cuda: torch.device, bits: int = 64):
    from service.nets import build_hasher

    torch.manual_seed(0)
    return build_hasher("resnet50", bits=bits, in_channels=3, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225)).to(cuda).eval()


# Measured: on one H200 (torch 2.11), 1,000 images: 99.60% of bits, 76.5% of whole codes; on
# the CPU (torch 2.14.1 autocast, the first 128 of those images): 99.52% and 72.7%.
def test_resnet50_bf16_codes_agree_with_fp32_at_224px(cuda):
    """Issue 17's bar: fp32 and bf16 codes of a 64-bit ResNet-50 hasher (random init) agree
    on >= 99% of bits, here over the shipped bundle's 1,000 query images at 224 px RGB."""
    from helpers import REPO
    from service.nets.hasher import precision_agreement
    from service.store import ModelStore

    images = _rgb224(ModelStore(REPO / "model_store").get("fmnist-dpsh-32").queries.images)
    hasher = _resnet50(cuda).set_precision("auto")
    assert hasher.precision == "bf16" and hasher.channels_last
    conv = hasher.backbone.trunk[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    agree = precision_agreement(hasher, images, batch_size=128)
    print(f"\nResNet-50 64 bits, 224 px, {agree['images']} images: bf16 vs fp32 "
          f"{100 * agree['bits']:.2f}% of bits, {100 * agree['codes']:.1f}% of codes equal")
    assert agree["bits"] >= 0.99, agree


@pytest.mark.parametrize("method", ["pgd", "dhta", "untargeted_gan", "uaa_gan"])
def test_bf16_attacks_on_cuda_stay_within_eps(cuda, method):
    """The shipped bundle in bf16 on CUDA (what HASHAUDIT_PRECISION=auto serves there)."""
    from helpers import REPO
    from service.attacks.runner import attack_batch
    from service.nets.hasher import code_agreement, encode_uint8
    from service.store import ModelStore

    bundle = ModelStore(REPO / "model_store", "cuda", "auto").get("fmnist-dpsh-32")
    cpu = ModelStore(REPO / "model_store", "cpu").get("fmnist-dpsh-32")
    assert bundle.hasher.precision == "bf16" and bundle.hasher.channels_last
    q = bundle.queries
    images, labels = q.images[:256], q.labels[:256]
    res = attack_batch(bundle, method, 8 / 255, images, labels)
    diff = np.abs(res.adversarial.astype(int) - images.astype(int))
    assert res.adversarial.dtype == np.uint8 and diff.max() <= 8
    assert res.hamming.mean() > 1.0
    agree = code_agreement(encode_uint8(cpu.hasher, res.adversarial), res.adv_codes)
    assert agree["bits"] > 0.98, agree


def test_paper_scale_generator_attack_in_bf16_on_cuda(cuda):
    """224 px RGB, paper shapes, ResNet-50 victim, everything in bf16 + channels-last: the
    delivered uint8 images are within eps."""
    from service.attacks import to_uint8_within
    from service.attacks.generator_attack import UntargetedGAN
    from service.nets import create_net
    from service.nets.gan import paper_shapes

    s = paper_shapes(num_classes=80, bits=64)
    torch.manual_seed(0)
    parts = {"prototype": create_net("prototype_net", **s["prototype_net"]).to(cuda),
             "decoder": create_net("label_decoder", **s["label_decoder"]).to(cuda),
             "generator": create_net("perturbation_generator",
                                     **s["perturbation_generator"]).to(cuda),
             "eps": 16 / 255, "entry": {"training": {"eps_range": [2 / 255, 16 / 255]}}}
    atk = UntargetedGAN(_resnet50(cuda).set_precision("bf16"), 8 / 255, parts=parts)
    assert parts["generator"].out.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (16, 3, 224, 224), device=cuda).float() / 255
    labels = torch.zeros(16, 80, device=cuda)
    labels[torch.arange(16), torch.arange(16) % 80] = 1
    x_adv = atk(x, labels)
    assert x_adv.dtype == torch.float32 and torch.isfinite(x_adv).all()
    a8 = to_uint8_within(x_adv, x, 8 / 255)
    assert (a8.int() - (x * 255).round().int()).abs().max() <= 8


def test_bf16_training_on_cuda_records_it_and_returns_fp32(cuda, tmp_path):
    """A ResNet-18 HashNet hasher at 64 px RGB and a generator against the shipped bundle,
    both trained with precision auto (= bf16 + channels-last here)."""
    import shutil

    from safetensors.torch import save

    from helpers import REPO
    from service.data.base import ArrayImageSet
    from service.training.generator_trainer import GeneratorConfig, train_generator
    from service.training.hasher import HasherConfig, train_hasher

    rng = np.random.default_rng(0)
    labels = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 256)]
    images = rng.integers(0, 256, (256, 3, 64, 64), dtype=np.uint8)
    cfg = HasherConfig(arch="resnet18", bits=32, loss="hashnet", epochs=1, batch_size=64,
                       mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    hasher, hist = train_hasher(cfg, ArrayImageSet(images, labels, list("abcd")),
                                device="cuda", progress=False)
    assert hist[0]["precision"] == "bf16" and np.isfinite(hist[0]["loss"])
    assert hasher.precision == "fp32" and not hasher.channels_last
    save(hasher.state_dict())

    shutil.copytree(REPO / "model_store" / "fmnist-dpsh-32", tmp_path / "b")
    entry = train_generator(tmp_path / "b", GeneratorConfig(
        attack="untargeted_gan_plus", eps_min=8 / 255, eps_max=16 / 255, epochs=1,
        batch_size=64, num_train=256), device="cuda", progress=False)
    assert entry["training"]["precision"] == "bf16"
    assert np.isfinite(entry["training"]["history"][0]["l_t"])
