"""Universal patterns (class_universal, universal), generators on top of them, and
best-checkpoint selection on a validation split from the training side (issue 20)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.attacks import ATTACKS, AttackInputError
from service.attacks.factory import attack_for_bundle
from service.attacks.universal import PatternSet
from service.errors import ConfigError
from service.serving import BundleService
from service.store import load_bundle
from service.training.generator_trainer import GeneratorConfig, train_generator
from service.training.patterns import Validator, validation_split
from service.training.recipe import parse_recipe


@pytest.fixture(scope="module")
def bundle(tiny_store: Path):
    return load_bundle(tiny_store / "tiny")


def test_pattern_lookup_multi_label_rule_and_eps_grid() -> None:
    per_class = torch.zeros(2, 3, 1, 2, 2)
    per_class[:, 0] = 1.0
    per_class[:, 1, 0, 0, 0] = -1.0
    per_class[:, 1, 0, 1, 1] = 0.5
    per_class *= torch.tensor([0.05, 0.1]).view(2, 1, 1, 1, 1)
    ps = PatternSet([0.05, 0.1], per_class, per_class[:, 0])
    y = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    d = ps.delta(0.05, y)
    assert torch.allclose(d[0], per_class[0, 0])  # one class at a grid eps: its pattern
    two = (per_class[0, 0] + per_class[0, 1]) / 2  # normalised sum, peak rescaled to eps
    assert torch.allclose(d[1], two * 0.05 / two.abs().max())
    assert d[1].abs().max() == pytest.approx(0.05) and d[2].abs().max() == 0
    # 0.07 uses the 0.1 pattern, scaled so its peak is 0.07; label-free: one pattern
    assert ps.delta(0.07, y)[0].abs().max() == pytest.approx(0.07)
    assert ps.delta(0.07, None).shape == (1, 1, 2, 2)
    with pytest.raises(AttackInputError) as err:
        ps.delta(0.2, y)
    assert err.value.field == "eps"


def test_fitted_patterns_are_recorded_validated_and_served(bundle) -> None:
    info = bundle.manifest.extra["patterns"]
    assert info["eps"] == sorted(info["eps"]) and max(info["eps"]) == pytest.approx(0.1)
    ps = bundle.patterns()
    for k, e in enumerate(ps.eps):
        assert ps.per_class[k].abs().max() <= e + 1e-6 and ps.universal[k].abs().max() <= e + 1e-6
    v = info["validation"]
    assert v["metric"] == "map_all" and v["num"] == 200  # a fifth of the tiny train split
    for key in ("class_universal", "universal"):
        assert set(v[key]) == {"8/255", "16/255"}
        assert all(v[key][e] < v["clean"][e] for e in v[key])
    names = BundleService(bundle).methods()
    assert {"class_universal", "universal", "universal_gan"} <= set(names)
    # a bundle without patterns does not offer them
    no_pat = bundle.manifest.replace(extra={k: x for k, x in bundle.manifest.extra.items()
                                            if k != "patterns"})
    assert not ATTACKS.get("class_universal").available(no_pat)
    assert ATTACKS.get("universal_gan").available(no_pat)  # its generator entry is there
    with pytest.raises(AttackInputError, match="fitted for eps up to"):
        attack_for_bundle(bundle, "class_universal", 0.2)


def test_validation_split_comes_from_the_training_side(bundle) -> None:
    train, val = validation_split(bundle, 1000, 0)
    assert len(val) == 200 and len(train) == 800 and not set(train) & set(val)
    assert set(bundle.gallery.ids[val]) <= set(bundle.splits["train"])
    assert not set(bundle.gallery.ids[val]) & set(bundle.queries.ids)  # different pools anyway
    again, val2 = validation_split(bundle, 1000, 0)
    assert np.array_equal(val, val2)


def test_best_checkpoint_is_kept_and_never_worse_than_the_pattern(tiny_bundle_copy) -> None:
    cfg = GeneratorConfig(attack="untargeted_gan_plus", base="class_pattern", epochs=2,
                          batch_size=50, num_train=400, width=4, blocks=1, lr=1e-3,
                          val_num=200, patience=0)
    entry = train_generator(tiny_bundle_copy, cfg, device="cpu", progress=False)
    assert entry["base"] == "class_pattern"
    val = entry["training"]["validation"]
    curve = val["curve"]
    assert [c["epoch"] for c in curve] == [0, 1, 2]
    assert val["reference"] == curve[0]["figures"]  # epoch 0 is the pattern itself
    ok = [c for c in curve if c["epoch"] == 0 or c["admissible"]]
    assert val["best_epoch"] == min(ok, key=lambda c: c["loss"])["epoch"]
    assert entry["training"]["history"][-1]["val"] == curve[-1]["figures"]

    # What the bundle now serves scores (on the same validation split) as the kept epoch.
    b = load_bundle(tiny_bundle_copy)
    _, val_pos = validation_split(b, 200, 0)
    v = Validator(b, val_pos, cfg.val_eps)

    def perturb(x, y, t, eps):
        return attack_for_bundle(b, "untargeted_gan_plus", eps)(x, y)

    served = v.figures(perturb)
    best = curve[val["best_epoch"]]["figures"]
    for e, ref in val["reference"].items():
        assert served[e] == pytest.approx(best[e], abs=0.01)  # fp16 weights in the bundle
        assert served[e] <= ref + 0.01


def test_recipe_is_checked_and_names_the_bad_key() -> None:
    pat, gens = parse_recipe({
        "patterns": {"eps": ["8/255", 0.1], "steps": 5},
        "defaults": {"epochs": 1, "val_eps": ["8/255"]},
        "generator": [{"attack": "universal_gan"}, {"attack": "uaa_gan",
                                                     "base": "universal_pattern"}]})
    assert pat.eps == [pytest.approx(8 / 255), 0.1] and pat.steps == 5
    assert gens[0].base == "class_pattern" and gens[1].val_eps == [pytest.approx(8 / 255)]
    with pytest.raises(ConfigError) as err:
        parse_recipe({"generator": [{"attack": "uaa_gan", "epoch": 3}]})
    assert err.value.field == "generator[0]"
    with pytest.raises(ConfigError) as err:
        parse_recipe({"generator": [{"attack": "uaa_gan", "base": "class_pattern"}]})
    assert err.value.field == "base"
    with pytest.raises(ConfigError) as err:
        parse_recipe({"patterns": {"eps": ["300/255"]}})
    assert err.value.field == "patterns.eps"
