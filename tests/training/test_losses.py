from __future__ import annotations

import pytest
import torch

from service.training.losses import LOSSES, classification_loss


def _toy(n: int = 64, classes: int = 4, bits: int = 16):
    g = torch.Generator().manual_seed(0)
    labels = torch.nn.functional.one_hot(torch.arange(n) % classes, classes).float()
    feats = torch.randn(n, 8, generator=g) + 3 * labels @ torch.randn(classes, 8, generator=g)
    return feats, labels


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_is_finite_and_trains_codes_to_separate_classes(name: str) -> None:
    torch.manual_seed(0)
    feats, labels = _toy()
    n, bits = len(feats), 16
    head = torch.nn.Linear(8, bits)
    loss_fn = LOSSES.create(name, num_train=n, bits=bits, num_classes=labels.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    idx = torch.arange(n)
    first = None
    for step in range(150):
        loss, parts = loss_fn(head(feats), labels, idx, step / 150)
        assert torch.isfinite(loss)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    codes = torch.sign(head(feats))
    same = (labels @ labels.t()) > 0
    dist = (bits - codes @ codes.t()) / 2
    assert dist[same].mean() + 2 < dist[~same].mean()
    assert loss_fn.U.abs().sum() > 0  # the memory bank was filled


def test_classification_loss_picks_ce_or_bce() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    single = torch.tensor([[1.0, 0.0, 0.0]])
    multi = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.isclose(classification_loss(logits, single),
                         torch.nn.functional.cross_entropy(logits, torch.tensor([0])))
    assert torch.isclose(classification_loss(logits, multi),
                         torch.nn.functional.binary_cross_entropy_with_logits(logits, multi))
