"""`hashaudit train backdoor` (one poisoned and one clean model) on the tiny real bundle.

The backdoor's effect (the trigger raising t-MAP on the poisoned model only) is asserted on
the same functions through the audit job in tests/jobs/test_backdoor_audit.py; here a short run
checks the command, its report and the frozen bundle."""

from __future__ import annotations

import json
from pathlib import Path

from service.store import load_bundle
from service.training.train_cli import main as train


def test_train_backdoor_writes_report_and_flagged_bundle(tiny_store: Path, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    out = tmp_path / "backdoor.json"
    assert train(["backdoor", "--bundle", "tiny", "--store", str(store), "--target", "Bag",
                  "--poisons", "20", "--patch", "8", "--epochs", "2", "--name", "tiny-poisoned",
                  "--out", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    p, c = rep["poisoned"], rep["clean"]
    assert rep["target_name"] == "Bag" and len(rep["poison_indices"]) == 20
    assert rep["patch_side"] == 8 and rep["hasher_recipe"]["epochs"] == 2
    for fig in (p, c):
        assert set(fig) == {"clean_map", "clean_map_1000", "t_map_triggered",
                            "t_map_untriggered"}
        assert all(0.0 <= v <= 1.0 for v in fig.values()), fig
    b = load_bundle(store / "tiny-poisoned")
    assert b.manifest.evaluation["figures"]["map_all"] == p["clean_map"]
    assert b.manifest.extra["poisoned"]["target_name"] == "Bag"
    assert b.manifest.generators == []
    assert b.manifest.training["backdoor"]["source_bundle"] == "tiny"
