"""``hashaudit index``: precomputed DeepHash-pytorch codes reproduce their mAP@all under
``hashaudit eval``, a mismatching code file is refused with the count, an interrupted index
resumes from its finished chunks, and an image folder works as a database."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from own_model import import_args, index_args

from service.cli import main
from service.errors import BadInput, BundleError
from service.importers.index import IndexSpec, index_bundle
from service.retrieval.metrics import map_at_k
from service.store import load_bundle


def test_precomputed_codes_reproduce_their_map_under_eval(own_data: dict, tmp_path: Path,
                                                          capsys) -> None:
    store, s = tmp_path / "store", own_data["save"]
    assert main(import_args(own_data, store, "own")) == 0
    assert main(index_args(own_data, store, "own", "--codes", str(s / "trn_binary.npy"),
                           "--labels", str(s / "trn_label.npy"), "--check-sample", "20")) == 0
    # the mAP@all of DeepHash-pytorch's own files, under HashAudit's protocol
    expect = map_at_k(np.load(s / "tst_binary.npy"), np.load(s / "trn_binary.npy"),
                      np.load(s / "tst_label.npy"), np.load(s / "trn_label.npy"), None)
    out = tmp_path / "eval.json"
    assert main(["eval", "own", "--store", str(store), "--device", "cpu",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["reproduced"] is True and res["gallery_codes_match"] is True
    assert res["figures"]["map_all"] == res["recorded"]["map_all"] == expect
    b = load_bundle(store / "own")
    check = b.manifest.extra["index"]["codes"]["check"]
    assert check == {"file": "trn_binary.npy", "sampled": 20, "seed": 0, "bit_tolerance": 0,
                     "differing": 0, "max_bits_differing": 0}
    assert b.reference is not None and b.reference["kind"] == "deephash_list"
    assert b.reference["options"]["database_list"] == str(own_data["database"].resolve())
    assert b.gallery.thumbnails.shape == (60, 3, 64, 64) and len(b.queries) == 20
    assert b.manifest.class_names == own_data["class_names"]


def test_mismatching_codes_are_refused_with_how_many_differ(own_data: dict,
                                                            tmp_path: Path) -> None:
    store, s = tmp_path / "store", own_data["save"]
    assert main(import_args(own_data, store, "own")) == 0
    codes = np.load(s / "trn_binary.npy")
    codes[[3, 10, 11, 40], :5] *= -1  # four codes off by five bits
    bad = tmp_path / "trn_binary.npy"
    np.save(bad, codes)
    spec = IndexSpec(database=own_data["database"], root=own_data["root"],
                     class_names=own_data["class_names"], codes=bad, check_sample=60)
    with pytest.raises(BadInput) as info:
        index_bundle(store / "own", spec)
    assert info.value.field == "codes"
    assert "4 of 60 sampled database codes differ from trn_binary.npy" in info.value.message
    assert "line 4 of database.txt, 5 of 16 bits" in info.value.message
    with pytest.raises(BundleError, match="not indexed yet"):  # left as it was
        load_bundle(store / "own")
    # five flipped bits pass only when the user tolerates five
    m = index_bundle(store / "own", IndexSpec(**{**spec.__dict__, "bit_tolerance": 5}))
    assert m.extra["index"]["codes"]["check"]["max_bits_differing"] == 5
    with pytest.raises(BadInput, match="shape"):  # a file of another database
        np.save(bad, codes[:50])
        index_bundle(store / "own", IndexSpec(**{**spec.__dict__, "bit_tolerance": 5}))


def test_an_interrupted_index_resumes_from_finished_chunks(own_data: dict, tmp_path: Path,
                                                           caplog) -> None:
    store = tmp_path / "store"
    assert main(import_args(own_data, store, "own")) == 0
    spec = IndexSpec(database=own_data["database"], root=own_data["root"],
                     query=own_data["query"], class_names=own_data["class_names"], chunk=16,
                     workers=2)
    seen = []

    def stop_after_two_chunks(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_bundle(store / "own", spec, progress=stop_after_two_chunks)
    work = store / ".index-own"
    assert sorted(p.name for p in work.glob("*.npz")) == ["db_000000.npz", "db_000001.npz"]
    with caplog.at_level(logging.INFO, logger="service.importers.index"):
        m = index_bundle(store / "own", spec)
    assert "db: 60 images, 28 encoded now, 32 from the work folder" in caplog.text
    assert not work.exists()  # removed once the bundle is written
    # the resumed gallery is what one uninterrupted run gives: `eval` re-encodes it all
    out = tmp_path / "eval.json"
    assert main(["eval", "own", "--store", str(store), "--device", "cpu",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["gallery_codes_match"] is True
    assert m.extra["indexed"] is True and m.dataset["sizes"] == {"train": 60, "database": 60,
                                                                 "query": 20}


def test_an_image_folder_database_without_queries(own_data: dict, tmp_path: Path,
                                                    capsys) -> None:
    folder = tmp_path / "folder"
    for k, line in enumerate(own_data["database"].read_text().splitlines()[:12]):
        cls = folder / ("even" if k % 2 == 0 else "odd")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(own_data["root"] / line.split()[0], cls / f"{k:02d}.png")
    store = tmp_path / "store"
    assert main(import_args(own_data, store, "own")) == 0
    assert main(["index", str(store / "own"), "--database", str(folder), "--device", "cpu",
                 "--no-progress"]) == 0
    b = load_bundle(store / "own")
    assert b.manifest.class_names == ["even", "odd"] and len(b.gallery) == 12
    assert len(b.queries) == 0 and b.manifest.evaluation == {}
    assert b.reference is not None and b.reference["kind"] == "image_folder"
    assert b.database_set().image_shape == (3, 64, 64)
    assert main(["eval", str(store / "own"), "--device", "cpu"]) == 2  # nothing to evaluate
    assert "no query split" in capsys.readouterr().err
