"""The hashaudit command: train hasher / train bundle / eval, through main(argv)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import REPO, TINY_ARGS, needs_fmnist
from service.cli import main
from service.store import load_bundle


def test_eval_reproduces_the_recorded_figures_exactly(tiny_store: Path, tmp_path: Path,
                                                      capsys) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "tiny", "--store", str(tiny_store), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["reproduced"] is True and res["gallery_codes_match"] is True
    for k in ("map_all", "map_1000", "p_r2"):
        assert res["figures"][k] == res["recorded"][k]
    assert "reproduced" in capsys.readouterr().out


def test_tiny_bundle_beats_chance(tiny_store: Path) -> None:
    f = load_bundle(tiny_store / "tiny").manifest.evaluation["figures"]
    # 10 balanced classes: a random ranking scores about 0.1.
    assert f["map_all"] > 0.3


def test_eval_flags_a_changed_record(tiny_bundle_copy: Path, capsys) -> None:
    from service.store.bundle import finalize
    from service.store.manifest import Manifest

    m = Manifest.from_json((tiny_bundle_copy / "manifest.json").read_text())
    figs = dict(m.evaluation["figures"], map_all=m.evaluation["figures"]["map_all"] + 0.01)
    m = m.replace(evaluation={**m.evaluation, "figures": figs})
    finalize(tiny_bundle_copy, m, [f["path"] for f in m.files])
    assert main(["eval", str(tiny_bundle_copy)]) == 1
    assert "NOT reproduced" in capsys.readouterr().out


def test_train_bundle_from_a_config_file(tmp_path: Path) -> None:
    needs_fmnist()
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        'name = "cfgb"\nversion = "3"\n[data]\nkind = "fashion_mnist_mosaic"\n'
        "num_train_items = 300\nnum_test_items = 60\nnum_query = 40\nnum_database = 300\n"
        'num_train = 200\nseed = 1\n[hasher]\narch = "small_cnn"\narch_kwargs = {width = 8}\n'
        'bits = 8\nloss = "hashnet"\nepochs = 1\nbatch_size = 50\n'
    )
    store = tmp_path / "store"
    assert main(["train", "bundle", "--config", str(cfg), "--store", str(store),
                 "--device", "cpu", "--no-progress"]) == 0
    b = load_bundle(store / "cfgb")
    assert b.manifest.version == "3" and b.manifest.hasher["family"] == "hashnet"
    assert b.gallery.labels.sum(1).max() > 1  # mosaics are multi-label
    assert b.manifest.training["config"]["data"]["kind"] == "fashion_mnist_mosaic"


def test_missing_data_says_how_to_get_it(tmp_path: Path, capsys) -> None:
    args = [a for a in TINY_ARGS]
    args[args.index("tiny")] = "nodata"
    rc = main(["train", *args, "--store", str(tmp_path),
               "--data-option", f'root="{tmp_path / "nothing"}"'])
    assert rc == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().out


def test_bad_config_file_is_named(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("name = \n")
    assert main(["train", "bundle", "--config", str(cfg)]) == 2
    assert "bad.toml" in capsys.readouterr().out


def test_shipped_config_parses() -> None:
    from service.training.bundle_builder import read_config
    from service.training.hasher import HasherConfig

    cfg = read_config(REPO / "configs" / "default_bundle.toml")
    HasherConfig.from_dict(cfg["hasher"])


@pytest.mark.parametrize("argv", [["--help"], []])
def test_help(argv, capsys) -> None:
    assert main(argv) == 0
    assert "hashaudit train" in capsys.readouterr().out
