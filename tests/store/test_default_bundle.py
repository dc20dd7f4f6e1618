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
    assert total < 24 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


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


def test_shipped_generators_belong_to_this_hasher(bundle) -> None:
    m = bundle.manifest
    hasher_sha = next(f["sha256"] for f in m.files if f["path"] == "hasher.safetensors")
    assert {g["attack"] for g in m.generators} == {
        "untargeted_gan", "untargeted_gan_plus", "uaa_gan", "targeted_gan", "universal_gan"}
    assert all(g["target_hasher_sha"] == hasher_sha for g in m.generators)
    assert m.extra["patterns"]["target_hasher_sha"] == hasher_sha
    # hasher byte-identical to the one the bundle was built with (other work measures it)
    assert hasher_sha == "3b3e666857b6edc41524e958557aa33aff2764662ce85481c570a0c51cde5f58"


def test_shipped_generators_kept_their_best_validation_epoch(bundle) -> None:
    m = bundle.manifest
    for g in m.generators:
        val = g["training"]["validation"]
        curve = val["curve"]
        assert val["num"] == 1000 and val["selected"] == "best", g["attack"]
        assert [c["epoch"] for c in curve] == list(range(len(curve)))
        ok = [c for c in curve if c["epoch"] == 0 or c.get("admissible", True)]
        pick = (max if g["attack"] == "targeted_gan" else min)(
            ok, key=lambda c: sum(c["figures"].values()))
        assert val["best_epoch"] == pick["epoch"], g["attack"]
    recipe = m.extra["generator_recipe"]
    assert recipe["config"]["patterns"]["eps"] == ["8/255", "16/255", 0.1]
    assert all(r["command"].startswith("hashaudit train generator") for r in recipe["runs"])
    assert {g for r in recipe["runs"] for g in r["generators"]} == {
        g["attack"] for g in m.generators}


@pytest.mark.slow  # about 2 min on one CPU thread (12 attacks x 1,000 queries)
def test_generator_bar_on_all_queries(bundle) -> None:
    """Issue 20's bar: every untargeted generator at least as strong as its pattern
    (class_universal; universal for the label-free uaa_gan) at 8/255 and 16/255 on all 1,000
    queries, uint8-rounded (the time limit is checked by benchmarks/generator_bar.py)."""
    from benchmarks.generator_bar import bar_rows, check_bar

    rows = bar_rows(bundle, [8 / 255, 16 / 255])
    assert check_bar(rows, max_ms=float("inf")) == []
    assert {r["method"] for r in rows if r["kind"] == "generator"} == {
        "untargeted_gan", "untargeted_gan_plus", "uaa_gan", "universal_gan"}


# Measured on all 1,000 queries at 16/255 (benchmarks/generator_bar.py): 0.888 clean -> 0.204
# (untargeted_gan), 0.206 (untargeted_gan_plus); the label-free uaa_gan (0.522) is weaker.
@pytest.mark.parametrize("method,min_drop", [
    ("untargeted_gan", 0.2), ("untargeted_gan_plus", 0.3), ("uaa_gan", 0.1)])
def test_shipped_generators_attack_it(bundle, method, min_drop) -> None:
    from service.attacks.runner import attack_batch
    from service.evaluation import retrieval_figures

    q = bundle.queries
    n = 300
    db = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
    res = attack_batch(bundle, method, 16 / 255, q.images[:n], q.labels[:n])
    clean = retrieval_figures(res.clean_codes, q.labels[:n], *db, curves=False)["map_all"]
    adv = retrieval_figures(res.adv_codes, q.labels[:n], *db, curves=False)["map_all"]
    assert adv < clean - min_drop, (clean, adv)
    assert res.linf.max() <= 16 / 255 + 1e-9


def test_shipped_targeted_generator_raises_t_map(bundle) -> None:
    from service.attacks.runner import attack_batch
    from service.jobs.audit_types.attack_chunk import target_labels
    from service.retrieval.metrics import targeted_map

    q = bundle.queries
    n = 300
    target = target_labels(q.labels[:n], seed=0)
    db_codes, db_labels = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
    res = attack_batch(bundle, "targeted_gan", 16 / 255, q.images[:n], q.labels[:n], target)
    before = targeted_map(res.clean_codes, db_codes, target, db_labels)
    after = targeted_map(res.adv_codes, db_codes, target, db_labels)
    # Weak (measured on 1,000 queries: t-MAP 0.106 -> 0.156 at 16/255), but it must move.
    assert after > before + 0.03, (before, after)
