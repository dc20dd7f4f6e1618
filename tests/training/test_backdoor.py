"""Clean-label backdoor audit on the tiny real bundle, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from service.store import load_bundle
from service.training.cli import main as train


def test_backdoor_trigger_raises_t_map_on_the_poisoned_model(tiny_store: Path, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    out = tmp_path / "backdoor.json"
    assert train(["backdoor", "--bundle", "tiny", "--store", str(store), "--target", "Bag",
                  "--poisons", "80", "--patch", "8", "--epochs", "20", "--name", "tiny-poisoned",
                  "--out", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    p, c = rep["poisoned"], rep["clean"]
    assert rep["target_name"] == "Bag" and len(rep["poison_indices"]) == 80
    # the trigger pulls queries of other classes toward Bag only on the poisoned model
    assert p["t_map_triggered"] > c["t_map_triggered"] + 0.1, (p, c)
    assert p["t_map_triggered"] > p["t_map_untriggered"] + 0.1, p
    # clean behaviour stays close
    assert abs(p["clean_map"] - c["clean_map"]) < 0.15, (p, c)
    b = load_bundle(store / "tiny-poisoned")
    assert b.manifest.extra["poisoned"]["target_name"] == "Bag"
    assert b.manifest.generators == []
    assert b.manifest.training["backdoor"]["source_bundle"] == "tiny"
