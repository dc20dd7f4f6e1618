"""hashaudit attack and hashaudit train generator through main(argv)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_GENERATOR_ARGS
from service.cli import main
from service.retrieval.codes import hex_to_codes
from service.store import load_bundle


def _write_queries(bundle, folder: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        p = folder / f"q{i}.png"
        Image.fromarray(bundle.queries.images[i, 0]).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("method", ["untargeted_gan_plus", "pgd"])
def test_attack_cli_writes_pngs_within_eps_and_true_codes(tiny_store, tmp_path, method) -> None:
    b = load_bundle(tiny_store / "tiny")
    files = _write_queries(b, tmp_path)
    out = tmp_path / "out"
    labels = ",".join(b.manifest.class_names[int(np.argmax(b.queries.labels[0]))].split(","))
    rc = main(["attack", *map(str, files), "--bundle", "tiny", "--store", str(tiny_store),
               "--method", method, "--eps", "8/255", "--labels", labels, "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "attack.json").read_text())
    assert report["method"] == method and len(report["images"]) == 3
    for i, row in enumerate(report["images"]):
        adv = np.asarray(Image.open(row["output"]))
        clean = b.queries.images[i, 0]
        assert adv.shape == clean.shape and adv.dtype == np.uint8
        assert np.abs(adv.astype(int) - clean.astype(int)).max() <= 8
        import torch

        code = b.hasher.codes(torch.from_numpy(adv[None, None].copy()).float() / 255)[0]
        assert np.array_equal(code.numpy().astype(np.int8), hex_to_codes(row["adv_code"], 16))
        clean_code = hex_to_codes(row["clean_code"], 16)
        assert row["hamming"] == int((clean_code != code.numpy()).sum())


def test_attack_cli_names_a_bad_label(tiny_store, tmp_path, capsys) -> None:
    b = load_bundle(tiny_store / "tiny")
    files = _write_queries(b, tmp_path, 1)
    rc = main(["attack", str(files[0]), "--bundle", "tiny", "--store", str(tiny_store),
               "--method", "pgd_center", "--labels", "Spaceship"])
    assert rc == 2
    assert "Spaceship" in capsys.readouterr().err


def test_generator_training_resumes_from_its_checkpoint(tiny_bundle_copy, tmp_path) -> None:
    ck = tmp_path / "ck"
    args = [*TINY_GENERATOR_ARGS, "--bundle", str(tiny_bundle_copy), "--num-train", "200",
            "--checkpoint-dir", str(ck), "--epochs", "1"]
    args[args.index("--epochs") + 1] = "1"  # the base list's own --epochs
    assert main(["train", *args]) == 0
    state = json.loads((ck / "state.json").read_text())
    assert state["epoch"] == 1
    # Same config again: the checkpoint is complete, nothing to redo, same weights written.
    assert main(["train", *args]) == 0
    b = load_bundle(tiny_bundle_copy)
    assert any(g["training"]["history"][-1]["epoch"] == 1 for g in b.manifest.generators)
