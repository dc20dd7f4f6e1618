"""Attacks give the same answer whatever the batch size and device (issue 20), move pixels
that sit on the [0, 1] box boundary, and ``worst_case`` is at least as strong as its members."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.attacks import ATTACKS
from service.attacks.base import scale_for
from service.attacks.factory import attack_for_bundle
from service.attacks.runner import attack_batch
from service.attacks.worst_case import ITERATIVE_MEMBERS, served_one_pass_methods
from service.errors import AttackInputError
from service.retrieval.metrics import map_at_k_per_query
from service.store import load_bundle

STEPS = 5  # iterative attacks in these tests: enough to move codes, cheap


@pytest.fixture(scope="module")
def bundle(tiny_store: Path):
    return load_bundle(tiny_store / "tiny")


def _targets(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros_like(labels)
    for i, row in enumerate(labels):
        out[i, rng.choice(np.flatnonzero(row == 0))] = 1
    return out


def _run(bundle, method: str, images, labels, batch_size: int, eps: float = 8 / 255):
    cls = ATTACKS.get(method)
    target = _targets(labels) if cls.targeted else None
    opts = {"steps": STEPS} if cls.iterative else {}
    return attack_batch(bundle, method, eps, images, labels, target, batch_size=batch_size,
                        **opts)


def _agreement(a, b) -> tuple[float, float, float]:
    """Share of adversarial code bits equal, and the two mean Hamming distances moved."""
    return float((a.adv_codes == b.adv_codes).mean()), float(a.hamming.mean()), \
        float(b.hamming.mean())


@pytest.mark.parametrize("method", ATTACKS.names())
def test_every_attack_agrees_across_batch_sizes(bundle, method) -> None:
    """24 queries in one batch and in four batches of 6: the codes agree bit for bit up to
    random starts (a seeded generator per batch draws different noise for queries 7..24) and
    the Hamming distance moved is the same within a bit. An attack whose objective or
    optimiser depended on the batch (a batch-mean loss against a fixed Adam eps, batch norm
    in training mode) would move codes by different amounts."""
    q = bundle.queries
    images, labels = q.images[:24], q.labels[:24]
    one = _run(bundle, method, images, labels, batch_size=24)
    four = _run(bundle, method, images, labels, batch_size=6)
    agree, h1, h4 = _agreement(one, four)
    iterative = ATTACKS.get(method).iterative
    assert agree >= (0.85 if iterative else 0.99), (method, agree)
    assert abs(h1 - h4) <= max(1.0, 0.15 * max(h1, h4)), (method, h1, h4)
    # the first batch of 6 sees the same seed, the same noise and the same queries in both
    first = float((one.adv_codes[:6] == four.adv_codes[:6]).mean())
    assert first >= 0.97, (method, first)


@pytest.mark.parametrize("method", [m for m in ATTACKS.names() if ATTACKS.get(m).iterative])
def test_iterative_attacks_move_pixels_on_the_box_boundary(bundle, method) -> None:
    """Half of a Fashion-MNIST image is background at exactly 0. torch 2.14 gives
    ``clamp`` a zero gradient at its bounds, so an attack that clamps inside its forward pass
    never moves those pixels (HAG before issue 20: mAP@all 0.60 instead of 0.36 at 8/255)."""
    q = bundle.queries
    images, labels = q.images[:16], q.labels[:16]
    res = _run(bundle, method, images, labels, batch_size=16)
    at_zero = images == 0
    assert at_zero.mean() > 0.2
    moved = (res.adversarial != images)[at_zero].mean()
    assert moved > 0.05, (method, moved)


def test_worst_case_is_at_least_as_strong_as_each_member(bundle) -> None:
    """Per query, worst_case's AP@all is at most that of every member run alone (same seeds,
    same batch), and it reports which member won how many queries."""
    q = bundle.queries
    images, labels = q.images[:32], q.labels[:32]
    db_codes, db_labels = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
    eps = 8 / 255
    wc = attack_batch(bundle, "worst_case", eps, images, labels, steps=STEPS, batch_size=32)
    ap_wc = map_at_k_per_query(wc.adv_codes, db_codes, labels, db_labels)
    one_pass = served_one_pass_methods(bundle, eps)
    assert "untargeted_gan_plus" in one_pass and "uaa_gan" in one_pass
    assert not any(ATTACKS.get(m).targeted for m in one_pass)
    for m in ITERATIVE_MEMBERS:
        res = attack_batch(bundle, m.method, eps, images, labels, seed=m.seed, steps=STEPS,
                           batch_size=32, **dict(m.options))
        ap = map_at_k_per_query(res.adv_codes, db_codes, labels, db_labels)
        assert (ap_wc <= ap + 1e-9).all(), m
    for name in one_pass:
        res = attack_batch(bundle, name, eps, images, labels, batch_size=32)
        ap = map_at_k_per_query(res.adv_codes, db_codes, labels, db_labels)
        assert (ap_wc <= ap + 1e-9).all(), name
    used = wc.extra["used"]
    assert len(used) == len(ITERATIVE_MEMBERS) + len(one_pass)
    assert sum(u["won"] for u in used) == len(images)
    assert np.abs(wc.adversarial.astype(int) - images.astype(int)).max() <= 8


def test_worst_case_leaves_out_what_the_bundle_cannot_serve(bundle) -> None:
    """Above the generators' trained eps only the iterative members run."""
    atk = attack_for_bundle(bundle, "worst_case", 0.2, steps=1)
    assert len(atk.members) == len(ITERATIVE_MEMBERS)


def test_restarts_keep_the_best_objective_and_are_checked(bundle) -> None:
    x = torch.from_numpy(bundle.queries.images[:16]).float() / 255
    one = attack_for_bundle(bundle, "pgd", 8 / 255, steps=3, restarts=1)
    three = attack_for_bundle(bundle, "pgd", 8 / 255, steps=3, restarts=3)
    with torch.no_grad():
        u0 = bundle.hasher(x)
        anchor = torch.where(u0 >= 0, 1.0, -1.0)
        scale = scale_for(u0)
        obj = [a.objective(bundle.hasher(a(x)), anchor, scale, u0) for a in (one, three)]
    # restart 1 of the three-restart run is the one-restart run (same seeded generator)
    assert (obj[1] <= obj[0] + 1e-6).all()
    for bad in (0, 21, 2.5, True):
        with pytest.raises(AttackInputError) as err:
            attack_for_bundle(bundle, "pgd", 8 / 255, restarts=bad)
        assert err.value.field == "restarts"
    with pytest.raises(AttackInputError) as err:
        attack_for_bundle(bundle, "pgd", 8 / 255, scale="huge")
    assert err.value.field == "scale"


@pytest.mark.gpu
@pytest.mark.parametrize("method", [m for m in ATTACKS.names() if not ATTACKS.get(m).targeted])
def test_every_untargeted_attack_agrees_across_devices(method) -> None:
    """The shipped bundle, 200 queries at 8/255, fp32 with TF32 off on both devices: mAP@all
    on CUDA within 0.03 of the CPU's and the Hamming distance moved within one bit."""
    if not torch.cuda.is_available():
        pytest.fail("no CUDA device: run the gpu marker on a GPU host")
    from helpers import REPO
    from service.evaluation import retrieval_figures
    from service.store import ModelStore

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for device in ("cpu", "cuda"):
        b = ModelStore(REPO / "model_store", device, "fp32").get("fmnist-dpsh-32")
        q = b.queries
        images, labels = q.images[:200], q.labels[:200]
        try:
            res = attack_batch(b, method, 8 / 255, images, labels, batch_size=100,
                               **({"steps": 10} if ATTACKS.get(method).iterative else {}))
        except AttackInputError as exc:  # e.g. no generator of that kind in the bundle
            pytest.skip(exc.message)
        fig = retrieval_figures(res.adv_codes, labels, b.gallery.codes(b.manifest.bits),
                                b.gallery.labels, curves=False)
        out[device] = (fig["map_all"], float(res.hamming.mean()))
    assert abs(out["cpu"][0] - out["cuda"][0]) <= 0.03, out
    assert abs(out["cpu"][1] - out["cuda"][1]) <= 1.0, out
