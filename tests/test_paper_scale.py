"""Paper-scale path on CPU at 64 px: the GPU script's CPU mode builds synthetic RGB
multi-label scenes, trains a bundle that references them (not copies), trains the
UntargetedGAN generator and attacks; the bundle is then served (/attack on a 640x480 JPEG
follows the recorded resize + centre crop), attacked by every registered method, and audited
through a real worker with its report rendered."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import (
    TINY_GENERATOR_ARGS,
    audit_stack,
    needs_fmnist,
    start_worker,
    stop_process,
    submit,
    wait,
)

NAME = "scenes64-small_cnn-hashnet-16"
CPU_MODE = ["--device", "cpu", "--size", "64", "--database", "300", "--train", "200",
            "--query", "40", "--arch", "small_cnn", "--arch-kwargs", '{"width": 8}',
            "--bits", "16", "--epochs", "2", "--batch-size", "50", "--gen-epochs", "1",
            "--gen-batch-size", "50", "--gen-width", "8", "--proto-steps", "60", "--steps", "3",
            "--workers", "2",
            "--attack-batch", "40", "--eps", "8/255", "16/255", "--precision", "fp32", "bf16"]


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The GPU script's CPU mode, then the other generators for the same bundle."""
    needs_fmnist()
    from benchmarks.paper_scale import main
    from service.training.train_cli import main as train

    out = tmp_path_factory.mktemp("paper_scale")
    assert main([*CPU_MODE, "--out", str(out)]) == 0
    report = json.loads((out / "paper_scale.json").read_text())
    store = out / "store"
    for attack in ("untargeted_gan_plus", "uaa_gan", "targeted_gan", "saliency_gan"):
        args = [*TINY_GENERATOR_ARGS, "--bundle", NAME, "--attack", attack,
                "--store", str(store)]
        args[args.index("--epochs") + 1] = "1"
        args[args.index("--num-train") + 1] = "200"
        assert train(args) == 0
    return {"out": out, "store": store, "report": report, "scenes": out / "scenes"}


@pytest.fixture(scope="module")
def bundle(scale_run):
    from service.store.bundle import load_bundle

    return load_bundle(scale_run["store"] / NAME)


def test_cpu_mode_reports_every_stage_and_row(scale_run):
    rep = scale_run["report"]
    assert all(s["ok"] for s in rep["stages"].values()), rep["stages"]
    rows = rep["rows"]
    assert {(r["precision"], r["eps_255"], r["method"]) for r in rows} == {
        (p, e, m) for p in ("fp32", "bf16") for e in (8, 16)
        for m in ("untargeted_gan", "pgd-3", "dhta-3")}
    assert all("error" not in r and r["within_eps"] for r in rows), rows
    clean = rep["stages"]["attacks"]["clean"]["map_all"]
    assert 0 < clean <= 1
    assert any(r["map_all"] < clean for r in rows)
    agree = rep["stages"]["attacks"]["fp32_bf16_agreement"]
    assert 0.5 < agree["bits"] <= 1


def test_bundle_references_its_data_and_stays_small(scale_run, bundle):
    m = bundle.manifest
    ref = m.dataset["reference"]
    assert ref["kind"] == "scenes"
    assert ref["options"]["root"] == str(scale_run["scenes"].resolve())
    assert {Path(p).name for p in ref["files"]} == {"dataset.json", "database.txt", "test.txt"}
    assert m.input["transform"]["resize_shorter"] == 64 and m.input["transform"]["crop"] == [64,
                                                                                              64]
    files = {p.name for p in (scale_run["store"] / NAME).iterdir()}
    assert not any(f.endswith((".jpg", ".png")) and f != "thumbnails.png" for f in files)
    # what grows with the database: packed codes, labels, ids and a 64 px PNG thumbnail
    per_image = scale_run["report"]["stages"]["hasher_bundle"]["bytes_per_database_image"]
    assert per_image < 3 * 64 * 64 + 64
    images, labels = bundle.train_split(20, seed=1)
    assert images.shape == (20, 3, 64, 64) and labels.shape == (20, 10)
    from service.data.sources import load_source

    db, _ = load_source({"kind": "scenes", "root": str(scale_run["scenes"])})
    pos = bundle.train_positions(20, seed=1)
    want = db.subset(bundle.gallery.ids[pos]).materialize().images
    assert np.array_equal(images, want)


def test_queries_not_embedded_are_read_through_the_source(scale_run, bundle, tmp_path):
    from service.store.bundle import QUERIES_FILE, load_bundle, save_bundle

    m = bundle.manifest.replace(files=[], extra={k: v for k, v in bundle.manifest.extra.items()
                                                 if k not in ("thumbnails", "queries")})
    save_bundle(tmp_path / "b", m, bundle.hasher, bundle.gallery, bundle.queries,
                bundle.splits, embed_queries=False)
    from safetensors.numpy import load_file

    assert "images" not in load_file(tmp_path / "b" / QUERIES_FILE)
    copy = load_bundle(tmp_path / "b")
    assert not copy.queries.embedded
    assert np.array_equal(copy.queries.images, bundle.queries.images)


def test_missing_or_changed_source_is_a_clear_error(scale_run, tmp_path):
    from service.errors import BundleError, DataNotFound
    from service.store.bundle import load_bundle

    scenes = scale_run["scenes"]
    listing = scenes / "database.txt"
    saved = listing.read_bytes()
    try:
        listing.write_bytes(saved.replace(b" 0 ", b" 1 ", 1))
        with pytest.raises(BundleError) as exc:
            load_bundle(scale_run["store"] / NAME).train_split(5)
        assert "database.txt changed since the bundle was made" in exc.value.message
    finally:
        listing.write_bytes(saved)
    moved = tmp_path / "moved"
    shutil.move(scenes, moved)
    try:
        with pytest.raises(DataNotFound) as exc2:
            load_bundle(scale_run["store"] / NAME).train_split(5)
        assert NAME in exc2.value.message and "data source" in exc2.value.message
    finally:
        shutil.move(moved, scenes)
    assert len(load_bundle(scale_run["store"] / NAME).train_split(5)[0]) == 5


def test_every_registered_method_attacks_the_rgb_bundle(bundle):
    from service.attacks import ATTACKS
    from service.attacks.runner import attack_batch

    q = bundle.queries
    images, labels = q.images[:8], q.labels[:8]
    target = np.zeros_like(labels)
    target[np.arange(8), (labels.argmax(1) + 1) % labels.shape[1]] = 1
    skipped = []
    for method in ATTACKS.names():
        cls = ATTACKS.get(method)
        if not cls.available(bundle.manifest):
            skipped.append(method)
            continue
        opts = {"steps": 2} if cls.iterative else {}
        res = attack_batch(bundle, method, 8 / 255, images, labels,
                           target if cls.targeted else None, **opts)
        diff = np.abs(res.adversarial.astype(int) - images.astype(int)).max()
        assert res.adversarial.shape == images.shape and diff <= 8, method
    # this bundle has every generator but no universal patterns (nor generators on them)
    assert skipped == ["class_universal", "universal", "universal_gan"], skipped


@pytest.fixture(scope="module")
def stack(scale_run, redis_db, tmp_path_factory):
    with audit_stack(scale_run["store"], tmp_path_factory.mktemp("scale_logs"),
                     HASHAUDIT_DEFAULT_BUNDLE=NAME) as server:
        yield server


def test_served_attack_follows_the_recorded_resize_and_crop(stack, bundle):
    from service.data.preprocess import InputTransform
    from service.nets.hasher import encode_uint8
    from service.retrieval.codes import codes_to_hex

    rng = np.random.default_rng(4)
    photo = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    r = httpx.post(f"{stack.url}/attack", files={"image": ("p.jpg", buf.getvalue())},
                   data={"labels": ["Bag"], "method": "pgd", "eps": "8/255"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    pre = body["preprocess"]
    assert pre["received_size"] == [640, 480] and pre["resized"] is True
    assert "shorter side to 64 (640x480 -> 85x64)" in pre["resize"]
    assert "centre crop to 64x64" in pre["resize"]
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        local = InputTransform.from_input(bundle.manifest.input).apply(img)
    assert local.shape == (3, 64, 64)
    assert body["codes"]["clean"]["hex"] == codes_to_hex(encode_uint8(bundle.hasher,
                                                                     local[None])[0])
    import base64

    adv = Image.open(io.BytesIO(base64.b64decode(body["adversarial_png"])))
    assert adv.size == (64, 64) and adv.mode == "RGB"


def test_audit_through_a_worker_renders_its_report(stack):
    worker = start_worker(stack.worker_env, stack.logs / "w.log", "w-scale")
    try:
        audit_id = submit(stack.url, {"model": NAME, "methods": ["untargeted_gan", "pgd"],
                                      "eps": ["8/255"], "queries": {"count": 20},
                                      "chunk_size": 10, "batch_size": 10, "seed": 0})
        st = wait(stack.url, audit_id, timeout=300)
    finally:
        stop_process(worker)
    assert st["state"] == "done", st
    res = st["result"]
    assert {a["method"] for a in res["attacks"]} == {"untargeted_gan", "pgd"}
    page = httpx.get(f"{stack.url}/audit/{audit_id}/report",
                     headers={"Accept": "text/html"}, timeout=30)
    assert page.status_code == 200 and "<h2 id='glossary'>Glossary</h2>" in page.text
    assert NAME in page.text
