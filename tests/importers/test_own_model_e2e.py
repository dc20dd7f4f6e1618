"""A DeepHash-pytorch user's model, end to end: ``hashaudit import deephash`` ->
``hashaudit index`` (64 px synthetic scenes in the DeepHash list layout) -> served by a real
``hashaudit serve`` -> ``/attack`` -> ``/audit`` with PGD through Redis and a real worker ->
the report. The same server takes the same model over HTTP (``POST /models``, API key, same
archive checks as audit uploads) and serves it too; a generator is trained for the imported
bundle with ``hashaudit train generator``."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from own_model import BITS, SIDE, import_args, index_args
from test_import_safety import Payload

from helpers import WORKER_ENV, ServerProcess, start_worker, stop_process, submit, wait
from service.cli import main
from service.config import Settings
from service.errors import ConfigError, Forbidden

KEY = {"X-API-Key": "e2e-key"}


@pytest.fixture(scope="module")
def own_store(own_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("own_store")
    assert main(import_args(own_data, store, "own")) == 0
    assert main(index_args(own_data, store, "own")) == 0
    return store


def test_import_index_attack_audit_report(own_store: Path, own_data: dict, redis_db,
                                          tmp_path: Path) -> None:
    env = {**WORKER_ENV, "HASHAUDIT_MODEL_STORE": str(own_store),
           "HASHAUDIT_DEFAULT_BUNDLE": "own", "HASHAUDIT_API_KEYS": KEY["X-API-Key"],
           "HASHAUDIT_MODEL_UPLOADS": "true",
           "HASHAUDIT_ARTIFACT_DIR": str(tmp_path / "artifacts")}
    worker = start_worker(env, tmp_path / "worker.log", "w-own")  # starts while the server does
    try:
        with ServerProcess(own_store, tmp_path / "server.log", default_bundle="own",
                           env=env) as server:
            listed = httpx.get(f"{server.url}/models", timeout=30, headers=KEY).json()
            assert listed["failed"] == {} and [m["name"] for m in listed["models"]] == ["own"]
            own = listed["models"][0]
            assert own["bits"] == BITS and own["query_size"] == 20
            assert own["provenance"]["layout"] == "DeepHash-pytorch/ResNet"
            assert own["provenance"]["upstream"]["repository"] == "swuxyj/DeepHash-pytorch"
            sha = hashlib.sha256(own_data["checkpoint"].read_bytes()).hexdigest()
            assert own["provenance"]["checkpoint"]["sha256"] == sha
            assert {"pgd", "dhta", "hag"} <= {a["name"] for a in own["attacks"]}

            query = own_data["query"].read_text().splitlines()[0].split()[0]
            png = (own_data["root"] / query).read_bytes()
            r = httpx.post(f"{server.url}/attack", timeout=120, headers=KEY,
                           files={"image": ("q.png", png, "image/png")},
                           data={"method": "pgd", "eps": "8/255", "top_k": "5"})
            assert r.status_code == 200, r.text
            ans = r.json()
            assert ans["bits"] == BITS and len(ans["hits"]["clean"]) == 5
            assert ans["perturbation"]["linf"] <= 8 / 255 + 1e-9

            audit_id = submit(server.url, {
                "model": "own", "methods": ["pgd"], "eps": ["8/255"],
                "queries": {"count": 8}, "seed": 1, "chunk_size": 4, "batch_size": 4},
                headers=KEY)
            st = wait(server.url, audit_id, timeout=240, headers=KEY)
            assert st["state"] == "done", st
            res = st["result"]
            assert [a["method"] for a in res["attacks"]] == ["pgd"]
            assert res["attacks"][0]["flipped_any_pct"] > 0
            html = httpx.get(f"{server.url}/audit/{audit_id}/report?format=html",
                             timeout=60, headers=KEY)
            assert html.status_code == 200 and "text/html" in html.headers["content-type"]
            assert "own" in html.text and "pgd" in html.text

            upload_model(server.url, own_data, tmp_path)
    finally:  # killed: a warm shutdown of an idle worker takes 15 s here
        worker.kill()
        stop_process(worker)


def _archive(data: dict, drop: str | None = None) -> bytes:
    """A zip of the scenes as a user would send them: the two lists and the images."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for lst in (data["database"], data["query"]):
            z.write(lst, lst.name)
            for line in lst.read_text().splitlines():
                path = line.split()[0]
                if path != drop:
                    z.write(data["root"] / path, path)
    return buf.getvalue()


def upload_model(url: str, data: dict, tmp_path: Path) -> None:
    """POST /models: refused without a key, a code-running pickle and an archive missing a
    listed image refused at once (422), then the real thing indexed, loaded and attacked."""
    ckpt = data["checkpoint"].read_bytes()
    form = {"name": "up", "arch": "ResNet18", "resize": str(SIDE), "crop": str(SIDE),
            "class_names": ",".join(data["class_names"])}
    archive = _archive(data)

    def post(checkpoint: bytes, zipped: bytes, headers: dict | None = KEY) -> httpx.Response:
        return httpx.post(f"{url}/models", headers=headers, timeout=120, data=form, files={
            "checkpoint": ("model.pt", checkpoint), "archive": ("data.zip", zipped)})

    assert post(ckpt, archive, headers=None).status_code == 401
    marker = tmp_path / "marker"
    evil = io.BytesIO()
    torch.save({"state_dict": data["net"].state_dict(), "x": Payload(str(marker))}, evil)
    r = post(evil.getvalue(), archive)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsafe_checkpoint", r.text
    assert not marker.exists()
    first = data["database"].read_text().split()[0]
    r = post(ckpt, _archive(data, drop=first))
    assert r.status_code == 422 and r.json()["error"]["field"] == "archive", r.text
    assert "1 listed image file(s) not in the archive" in r.json()["error"]["message"]
    form["class_names"] = "a,b"
    r = post(ckpt, archive)
    assert r.status_code == 422 and r.json()["error"]["field"] == "class_names", r.text
    form["class_names"] = ",".join(data["class_names"])

    r = post(ckpt, archive)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == "/models/imports/up"
    deadline = time.monotonic() + 120
    while (st := httpx.get(f"{url}/models/imports/up", headers=KEY, timeout=30).json())[
            "state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert st["state"] == "done", st
    assert st["progress"] == {"done": 80, "total": 80}
    assert st["model"]["gallery_size"] == 60 and st["model"]["query_size"] == 20
    assert st["model"]["provenance"]["checkpoint"] == {
        "file": "model.pt", "sha256": hashlib.sha256(ckpt).hexdigest()}
    names = [m["name"] for m in httpx.get(f"{url}/models", headers=KEY).json()["models"]]
    assert names == ["own", "up"]
    assert post(ckpt, archive).json()["error"]["field"] == "name"  # taken now
    png = (data["root"] / first).read_bytes()
    r = httpx.post(f"{url}/attack", headers=KEY, timeout=120, data={"model": "up",
                   "method": "pgd", "top_k": "3"}, files={"image": ("d.png", png)})
    assert r.status_code == 200, r.text
    top = r.json()["hits"]["clean"][0]
    assert top["hamming"] == 0  # the database image itself (or one with its very code)
    thumb = httpx.get(f"{url}{top['thumbnail_url']}", headers=KEY, timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"


def test_model_uploads_are_off_by_default_and_need_api_keys(tmp_path: Path) -> None:
    from service.api import create_app
    from service.api.errors import status_for
    from service.importers.importer import ImportSpec

    app = create_app(Settings(model_store=tmp_path, device="cpu"))
    with pytest.raises(Forbidden, match="HASHAUDIT_MODEL_UPLOADS") as info:
        app.state.hashaudit.imports.start(ImportSpec("deephash", "ResNet18", "x"),
                                          io.BytesIO(b"x"), "m.pt", io.BytesIO(b"y"), None,
                                          None)
    assert status_for(info.value) == 403
    with pytest.raises(ConfigError, match="HASHAUDIT_API_KEYS"):
        create_app(Settings(model_store=tmp_path, device="cpu", model_uploads=True))


def test_generators_train_for_an_imported_bundle(own_store: Path, tmp_path: Path) -> None:
    from service.serving import BundleService
    from service.store import load_bundle
    from service.training.train_cli import main as train

    store = tmp_path / "store"
    shutil.copytree(own_store / "own", store / "own")
    assert train(["generator", "--bundle", "own", "--attack", "uaa_gan", "--epochs", "1",
                  "--num-train", "60", "--width", "8", "--batch-size", "20", "--device", "cpu",
                  "--no-progress", "--store", str(store)]) == 0
    svc = BundleService(load_bundle(store / "own"))
    assert "uaa_gan" in {a["name"] for a in svc.summary()["attacks"]}
