"""The shipped default bundle: present, intact, good enough, and reproducible."""

from __future__ import annotations

import pytest

from helpers import REPO
from service.config import Settings
from service.evaluation import evaluate_bundle
from service.store import ModelStore

STORE = REPO / "model_store"
NAME = Settings().default_bundle


@pytest.fixture(scope="module")
def bundle():
    return ModelStore(STORE).get(NAME)


def test_default_bundle_is_small_enough_for_git() -> None:
    total = sum(p.stat().st_size for p in (STORE / NAME).iterdir())
    assert total < 20 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


def test_default_bundle_protocol_and_quality(bundle) -> None:
    m = bundle.manifest
    assert m.bits == 32 and m.dataset["name"] == "fashion-mnist"
    sizes = m.dataset["sizes"]
    assert sizes["database"] >= 10_000 and sizes["query"] >= 1_000
    assert set(bundle.splits["train"]) <= set(bundle.splits["database"])
    fig = m.evaluation["figures"]
    assert fig["map_all"] >= 0.88, fig["map_all"]
    assert 0 < fig["p_r2"] <= 1 and 0 < fig["map_1000"] <= 1


def test_eval_reproduces_the_shipped_figures_exactly(bundle) -> None:
    res = evaluate_bundle(bundle)
    for k in ("map_all", "map_1000", "p_r2"):
        assert res["figures"][k] == res["recorded"][k], k
    assert res["gallery_codes_match"] is True
