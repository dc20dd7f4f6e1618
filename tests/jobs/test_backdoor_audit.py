"""Backdoor audits (``POST /audit`` with ``"type": "backdoor"``) end to end: a real API server,
real worker processes retraining real tiny hashers, real Redis; the poisoned bundle is
downloaded over HTTP and loaded with its checksums."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import (
    REPO,
    audit_stack,
    check_renders_in_chromium,
    start_worker,
    stop_process,
    submit,
    wait,
)

# the setting of tests/training/test_backdoor.py, where the trigger takes hold on this bundle
BACKDOOR = {"target": "Bag", "poisons": [80], "patch": 8, "epochs": 20}


@pytest.fixture(scope="module")
def stack(tiny_store: Path, redis_db, tmp_path_factory: pytest.TempPathFactory):
    artifacts = str(tmp_path_factory.mktemp("artifacts"))
    with audit_stack(tiny_store, tmp_path_factory.mktemp("backdoor_logs"),
                     HASHAUDIT_ARTIFACT_DIR=artifacts) as server:
        yield server


def _wait_training(url: str, audit_id: str, timeout: float = 120) -> dict:
    """Poll until some model has trained an epoch; returns that status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/audit/{audit_id}", timeout=30).json()
        if any(s.get("epoch", 0) >= 1 for s in st["progress"]["stages"].values()):
            return st
        time.sleep(0.2)
    raise AssertionError(f"backdoor audit {audit_id}: no epoch trained in {timeout} s")


def _progress_while_running(url: str, audit_id: str, timeout: float = 300) -> list[dict]:
    """Poll until the audit ends; returns every progress seen while it ran."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/audit/{audit_id}", timeout=30).json()
        if st["state"] in ("done", "failed", "cancelled"):
            return seen
        seen.append(st["progress"])
        time.sleep(0.2)
    raise AssertionError(f"backdoor audit {audit_id} not finished")


def test_backdoor_audit_on_a_worker(stack, tmp_path):
    """Cancel a long backdoor audit mid-training (the worker stops and serves on), then run
    one: the trigger raises t-MAP on the poisoned model only, the clean mAP holds, and the
    poisoned bundle downloads and loads."""
    worker = start_worker(stack.worker_env, stack.logs / "w-bd.log", "w-bd")
    try:
        long_id = submit(stack.url, {"type": "backdoor", "model": "tiny", "backdoor": {
            **BACKDOOR, "epochs": 400}})
        st = _wait_training(stack.url, long_id)
        stages = st["progress"]["stages"]
        assert st["type"] == "backdoor" and stages["trigger"]["state"] == "done", st
        assert st["progress"]["total_epochs"] == 800
        r = httpx.delete(f"{stack.url}/audit/{long_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"

        audit_id = submit(stack.url, {"type": "backdoor", "model": "tiny", "backdoor": BACKDOOR})
        seen = _progress_while_running(stack.url, audit_id)
        st = httpx.get(f"{stack.url}/audit/{audit_id}").json()
    finally:
        stop_process(worker)
    assert st["state"] == "done", st
    # the cancelled audit's training stopped: its epochs did not run to the end
    cancelled = httpx.get(f"{stack.url}/audit/{long_id}").json()
    assert cancelled["state"] == "cancelled" and cancelled["result"] is None
    assert cancelled["progress"]["done_epochs"] < 100, cancelled["progress"]
    # progress was visible per epoch while it ran
    assert any(0 < p["done_epochs"] < p["total_epochs"] for p in seen), seen[-3:]
    assert st["progress"]["done_epochs"] == st["progress"]["total_epochs"] == 40

    r = st["result"]
    base, row = r["rows"][0], r["rows"][1]
    assert [x["poisons"] for x in r["rows"]] == [0, 80] and r["target_name"] == "Bag"
    assert r["baseline"] == base and base["bundle"] is None
    assert row["t_map_triggered"] > base["t_map_triggered"] + 0.1, (row, base)
    assert row["t_map_triggered"] > row["t_map_untriggered"] + 0.1, row
    assert abs(row["t_map_gain"] - (row["t_map_triggered"] - base["t_map_triggered"])) < 1e-12
    assert abs(row["clean_map"] - base["clean_map"]) < 0.15, (row, base)
    assert len(r["examples"]) == 3 and r["patch_side"] == 8

    # the frozen poisoned bundle, over HTTP, loads with its checksums and flags itself
    name = row["bundle"]["name"]
    dl = httpx.get(f"{stack.url}/audit/{audit_id}/bundles/{name}", timeout=60)
    assert dl.status_code == 200, dl.text
    with tarfile.open(fileobj=io.BytesIO(dl.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    from service.store import load_bundle
    from service.training.backdoor_audit import bundle_name

    assert name == bundle_name({"model": "tiny"}, audit_id, 80)
    b = load_bundle(tmp_path / name)
    assert b.sha == row["bundle"]["sha"]
    info = b.manifest.extra["poisoned"]
    assert info["target_name"] == "Bag" and len(info["poison_indices"]) == 80
    assert info["poisoned"]["t_map_triggered"] == row["t_map_triggered"]
    assert b.manifest.training["backdoor"]["source_bundle"] == "tiny"
    missing = httpx.get(f"{stack.url}/audit/{audit_id}/bundles/tiny-nope")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "bundle"

    html = httpx.get(f"{stack.url}/audit/{audit_id}/report?format=html", timeout=60).text
    assert "Backdoor audit" in html and name in html
    # trigger + 3 triggered queries + plot + 3 x (original, poisoned)
    check_renders_in_chromium(html, tmp_path, min_images=11)


def test_backdoor_chunk_lost_for_good_fails_the_audit(tiny_store, redis_db, tmp_path):
    """With no retries left, a backdoor chunk whose worker was killed fails the audit with a
    message naming the chunk; nothing stays 'running' forever."""
    with audit_stack(tiny_store, tmp_path, HASHAUDIT_CHUNK_RETRIES="0",
                     HASHAUDIT_ARTIFACT_DIR=str(tmp_path / "art")) as server:
        env = server.worker_env
        a = start_worker(env, tmp_path / "w-a.log", "w-lost-a")
        b = None
        try:
            audit_id = submit(server.url, {"type": "backdoor", "model": "tiny", "backdoor": {
                **BACKDOOR, "epochs": 400, "trigger_steps": 20}})
            _wait_training(server.url, audit_id)
            os.kill(a.pid, signal.SIGKILL)
            a.wait(10)
            b = start_worker(env, tmp_path / "w-b.log", "w-lost-b")
            st = wait(server.url, audit_id, timeout=120)
        finally:
            stop_process(a)
            stop_process(b)
    assert st["state"] == "failed", st
    assert "backdoor|p" in st["error"] and "after 0 retries" in st["error"], st["error"]


def test_backdoor_audit_cli_and_its_errors(tiny_store, tmp_path):
    """`hashaudit audit backdoor` runs the same task code in-process; bad input exits 2."""
    base = [sys.executable, "-m", "service.cli", "audit", "backdoor", "--bundle", "tiny",
            "--store", str(tiny_store), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HASHAUDIT_REDIS_URL", None)
    r = subprocess.run([*base, "--target", "Bag", "--poisons", "5", "--epochs", "1",
                        "--num-train", "300", "--trigger-steps", "20", "--artifacts",
                        str(tmp_path / "art"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "poisons     5" in r.stdout and (tmp_path / "out" / "report.html").exists()
    assert len(list((tmp_path / "art" / "audits").glob("*/tiny-backdoor-*-p5"))) == 1
    # a worker whose artifact folder cannot be made fails the audit before training, naming it
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    t0 = time.monotonic()
    r = subprocess.run([*base, "--target", "Bag", "--poisons", "5", "--epochs", "200",
                        "--num-train", "300", "--trigger-steps", "5", "--artifacts", str(blocker),
                        "--out", str(tmp_path / "out2")],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 2 and "cannot be created" in r.stderr, r.stderr[-2000:]
    assert str(blocker) in r.stderr and time.monotonic() - t0 < 60
    r = subprocess.run([*base, "--target", "Spaceship"], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2 and "backdoor.target" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([*base, "--target", "Bag", "--poisons", "5000"], capture_output=True,
                       text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2 and "backdoor.poisons" in r.stderr, r.stderr[-2000:]
