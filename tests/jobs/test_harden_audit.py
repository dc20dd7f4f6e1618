"""Harden audits (``POST /audit`` with ``"type": "harden"``) end to end: a real API server, a
real worker fine-tuning the real tiny hasher adversarially, real Redis; the hardened bundle is
downloaded over HTTP and loaded with its checksums; bad requests answer 422 naming the field."""

from __future__ import annotations

import copy
import io
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import audit_stack, check_renders_in_chromium, start_worker, stop_process, submit

# tiny on purpose: the job is about plumbing (progress, cancel, freezing, report), the
# robustness figures of a real run are in benchmarks/harden.py
TINY = {"epochs": 2, "num_train": 200, "steps": 2, "queries": 30, "audit_eps": ["8/255"],
        "robust_queries": 10, "restarts": 2, "generator_epochs": 1, "generator_num_train": 60}


@pytest.fixture(scope="module")
def stack(tiny_store: Path, redis_db, tmp_path_factory: pytest.TempPathFactory):
    artifacts = str(tmp_path_factory.mktemp("artifacts"))
    with audit_stack(tiny_store, tmp_path_factory.mktemp("harden_logs"),
                     HASHAUDIT_ARTIFACT_DIR=artifacts) as server:
        yield server


def _poll(url: str, audit_id: str, done, timeout: float = 240) -> tuple[dict, list[dict]]:
    """Poll until ``done(status)``; returns that status and every progress seen before."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/audit/{audit_id}", timeout=30).json()
        if done(st):
            return st, seen
        seen.append(st["progress"])
        time.sleep(0.2)
    raise AssertionError(f"harden audit {audit_id}: not there in {timeout} s: {seen[-1:]}")


def test_harden_audit_on_a_worker(stack, tiny_bundle, tmp_path):
    """Cancel a long harden job mid-training (the worker stops and serves on), then run a tiny
    one: epoch progress, both models re-audited (PGD-100 x restarts and transfer rows), the
    hardened bundle frozen with its provenance and downloadable, the report renders."""
    worker = start_worker(stack.worker_env, stack.logs / "w-h.log", "w-harden")
    try:
        long_id = submit(stack.url, {"type": "harden", "model": "tiny",
                                     "harden": {**TINY, "epochs": 500}})
        st, _ = _poll(stack.url, long_id, lambda s: s["progress"]["done_epochs"] >= 1)
        assert st["type"] == "harden" and st["progress"]["total_epochs"] == 500
        assert st["progress"]["stages"]["train"]["state"] == "running", st["progress"]
        r = httpx.delete(f"{stack.url}/audit/{long_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"

        audit_id = submit(stack.url, {"type": "harden", "model": "tiny", "seed": 3,
                                      "harden": TINY})
        st, seen = _poll(stack.url, audit_id,
                         lambda s: s["state"] in ("done", "failed", "cancelled"))
    finally:
        stop_process(worker)
    assert st["state"] == "done", st
    cancelled = httpx.get(f"{stack.url}/audit/{long_id}").json()
    assert cancelled["state"] == "cancelled" and cancelled["result"] is None
    assert cancelled["progress"]["done_epochs"] < 100, cancelled["progress"]
    assert any(p["stages"]["train"].get("epoch") == 1 for p in seen), seen[-3:]
    assert st["progress"]["done_epochs"] == 2

    r = st["result"]
    methods = {(x["model"], x["method"]) for x in r["rows"]}
    served = [m for m in ("dhta", "hag", "pgd", "pgd_center", "uaa_gan", "untargeted_gan",
                          "untargeted_gan_plus", "saliency_gan")]
    for m in served:
        assert ("original", m) in methods and ("hardened", m) in methods, (m, methods)
    assert ("original", "pgd100x5") in methods and ("hardened", "pgd100x5") in methods
    assert ("hardened", "transfer") in methods and ("original", "transfer") not in methods
    assert ("original", "targeted_gan") not in methods  # untargeted methods only
    robust = next(x for x in r["rows"] if x["method"] == "pgd100x5")
    assert robust["queries"] == 10 and robust["pgd20_same_queries"] is not None
    # the original model's clean figures are the bundle's own on these queries
    assert r["clean"]["original"]["num_queries"] == 30
    assert r["generators"]["retrained"] and "untargeted_gan_plus" in r["generators"]["names"]
    assert not any(x.get("borrowed_generator") for x in r["rows"])
    assert "mAP@all" in r["verdict"] and r["checks"], r

    # the frozen hardened bundle, over HTTP, loads with its checksums and names its parent
    b = r["bundle"]
    dl = httpx.get(f"{stack.url}/audit/{audit_id}/bundles/{b['name']}", timeout=60)
    assert dl.status_code == 200, dl.text
    with tarfile.open(fileobj=io.BytesIO(dl.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    from service.store import load_bundle

    hb = load_bundle(tmp_path / b["name"])
    assert hb.sha == b["sha"]
    prov = hb.manifest.extra["hardened"]
    assert prov["parent"] == "tiny" and prov["parent_sha"] == tiny_bundle.sha
    assert prov["attack"] == "pgd_center" and abs(prov["eps"] - 8 / 255) < 1e-12
    assert prov["recipe"]["loss"] == tiny_bundle.manifest.training["config"]["hasher"]["loss"]
    assert {g["attack"] for g in hb.manifest.generators} == set(r["generators"]["names"])
    assert hb.manifest.extra["prototype"]["target_hasher_sha"] != \
        tiny_bundle.manifest.extra["prototype"]["target_hasher_sha"]

    html = httpx.get(f"{stack.url}/audit/{audit_id}/report?format=html", timeout=60).text
    assert "Harden" in html and b["name"] in html and "PGD-100" in html
    check_renders_in_chromium(html, tmp_path, min_images=1)


@pytest.mark.parametrize("harden,field", [
    ({"attack": "fgsm"}, "harden.attack"),
    ({"attack": "targeted_gan"}, "harden.attack"),
    ({"eps": "40/255"}, "harden.eps"),
    ({"audit_eps": ["8/255", "2"]}, "harden.audit_eps"),
    ({"epochs": 0}, "harden.epochs"),
    ({"adv_fraction": 1.5}, "harden.adv_fraction"),
    ({"restarts": 0}, "harden.restarts"),
    ({"robust_queries": 101}, "harden.robust_queries"),  # tiny has 100 queries
    ({"queries": 0}, "harden.queries"),
    ({"robust_eps": "1/255"}, "harden.robust_eps"),
    ({"center_weight": -1}, "harden.center_weight"),
    ({"center_weight": 1000}, "harden.center_weight"),
])
def test_bad_harden_requests_are_422(stack, harden, field):
    r = httpx.post(f"{stack.url}/audit", json={"type": "harden", "model": "tiny",
                                                      "harden": harden}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.text


def test_bundle_without_training_data_is_refused(tiny_bundle):
    """A bundle whose training images cannot be read (no train split in its gallery, no data
    source) is refused naming ``model``, before anything is queued."""
    from service.errors import BadInput
    from service.jobs.spec import normalize_spec
    from service.serving import BundleService

    # the defaults fit a small bundle (PGD-100 row on at most all of its 100 queries)
    spec = normalize_spec(BundleService(tiny_bundle), {"type": "harden", "harden": {}},
                          max_queries=100)["harden"]
    assert spec["robust_queries"] == 100 and spec["retrain_generators"]
    assert spec["attack"] == "pgd_center" and spec["audit_eps"][1] == 8 / 255
    bare = copy.copy(tiny_bundle)
    bare.splits = {k: v for k, v in tiny_bundle.splits.items() if k != "train"}
    with pytest.raises(BadInput) as exc:
        normalize_spec(BundleService(bare), {"type": "harden", "harden": {}}, max_queries=100)
    assert exc.value.field == "model" and "training data" in exc.value.message


def test_total_training_work_is_capped(tiny_bundle, monkeypatch):
    """epochs x training images is checked against the per-job cap before anything is queued
    (the tiny bundle's 1,000 training images need a lower cap to reach it)."""
    from service.errors import BadInput
    from service.jobs.audit_types import harden
    from service.jobs.spec import normalize_spec
    from service.serving import BundleService

    monkeypatch.setattr(harden, "TRAIN_IMAGES_MAX", 5000)
    svc = BundleService(tiny_bundle)
    spec = normalize_spec(svc, {"type": "harden", "harden": {"epochs": 5}}, max_queries=100)
    assert spec["harden"]["train_images"] * 5 <= 5000
    assert spec["harden"]["center_weight"] == harden.DEFAULT_CENTER_WEIGHT
    with pytest.raises(BadInput) as exc:
        normalize_spec(svc, {"type": "harden", "harden": {"epochs": 6}}, max_queries=100)
    assert exc.value.field == "harden.epochs" and "at most 5000" in exc.value.message


def test_harden_cli_runs_the_job_in_process(tiny_store, tmp_path):
    """`hashaudit audit harden` runs the same task code without a server: the options reach
    the job (center weight, no generator re-training), the report and the bundle are written;
    a bad option value exits 2 naming its field."""
    import json
    import os
    import subprocess
    import sys

    from helpers import REPO

    base = [sys.executable, "-m", "service.cli", "audit", "harden", "--bundle", "tiny",
            "--store", str(tiny_store), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HASHAUDIT_REDIS_URL", None)
    out = tmp_path / "out"
    r = subprocess.run([*base, "--epochs", "1", "--num-train", "100", "--steps", "1",
                        "--center-weight", "0.5", "--queries", "20", "--audit-eps", "8/255",
                        "--robust-queries", "5", "--restarts", "1", "--no-retrain-generators",
                        "--artifacts", str(tmp_path / "art"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    res = rep.get("result", rep)
    assert res["settings"]["center_weight"] == 0.5 and res["settings"]["epochs"] == 1
    assert not res["generators"]["retrained"]
    assert any(x.get("borrowed_generator") for x in res["rows"])  # said, not hidden
    assert "center term weight 0.5" in (out / "report.html").read_text()
    assert len(list((tmp_path / "art" / "audits").glob("*/tiny-hardened-*"))) == 1
    r = subprocess.run([*base, "--center-weight", "-2"], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2 and "harden.center_weight" in r.stderr, r.stderr[-2000:]
