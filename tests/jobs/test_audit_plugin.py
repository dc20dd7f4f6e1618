"""A new audit type is one module plus its registration: ``audit_plugin.py`` (beside this
file) declares ``code_balance`` and registers it when imported. Loaded with
``HASHAUDIT_PLUGINS``, it runs through the real API, the real Redis queue and a real worker
process, and through ``hashaudit audit``, with no module of the package changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import REPO, audit_stack, start_worker, stop_process, submit, wait

HERE = Path(__file__).resolve().parent
PLUGIN_ENV = {"HASHAUDIT_PLUGINS": "audit_plugin",
              "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), str(REPO),
                                                        os.environ.get("PYTHONPATH")) if p)}


def _expected_map_all(bundle) -> float:
    """mAP@all of the query split, computed here without any audit code."""
    from service.evaluation import retrieval_figures
    from service.nets.hasher import encode_uint8

    q = bundle.queries
    codes = encode_uint8(bundle.hasher, q.images)
    return retrieval_figures(codes, q.labels, bundle.gallery.codes(bundle.manifest.bits),
                             bundle.gallery.labels, curves=False)["map_all"]


def _check_result(res: dict, bundle) -> None:
    assert res["type"] == "code_balance" and res["queries"] == len(bundle.queries)
    assert len(res["bit_balance"]) == res["bits"] == bundle.manifest.bits
    assert all(0.0 <= v <= 1.0 for v in res["bit_balance"])
    assert res["map_all"] == _expected_map_all(bundle)
    assert res["map_all"] == bundle.manifest.evaluation["figures"]["map_all"]


def test_plugin_type_runs_in_process(tiny_store, tiny_bundle):
    """Registered in this process: the spec check, the plan, the chunk function named by its
    dotted string, the reduce and the report all come from the plugin."""
    import audit_plugin  # noqa: F401 - registers code_balance

    from service.jobs.audit_types import AUDIT_TYPES
    from service.jobs.queue import run_local_audit
    from service.jobs.report import render_html
    from service.jobs.spec import normalize_spec
    from service.serving import BundleService
    from service.store import ModelStore

    assert "code_balance" in AUDIT_TYPES
    store = ModelStore(tiny_store, "cpu")
    svc = BundleService(store.get("tiny"))
    spec = normalize_spec(svc, {"type": "code_balance", "code_balance": {"parts": 3}})
    queue, audit_id = run_local_audit(store, spec)
    st = queue.status(audit_id)
    assert st["state"] == "done", st["error"]
    assert st["progress"] == {"done_parts": 3, "total_parts": 3, "done_chunks": 3,
                              "total_chunks": 3}
    _check_result(st["result"], tiny_bundle)
    assert st["result"]["pids"] == [os.getpid()] * 3
    page = render_html(st)
    assert "<h1>Code balance audit of <code>tiny</code></h1>" in page
    assert f"mAP@all {st['result']['map_all']:.4f}" in page

    from service.errors import BadInput

    with pytest.raises(BadInput) as err:
        normalize_spec(svc, {"type": "code_balance", "code_balance": {"parts": 9}})
    assert err.value.field == "code_balance.parts"


def test_plugin_type_through_the_api_and_a_worker(tiny_store, tiny_bundle, redis_db, tmp_path):
    """The API takes the plugin's type and fields (and lists them in its schema), a worker
    process runs every chunk, and the report is the plugin's. A worker started without the
    plugin fails such an audit with a message naming the type."""
    with audit_stack(tiny_store, tmp_path, **PLUGIN_ENV) as server:
        schema = httpx.get(f"{server.url}/openapi.json").json()
        req = schema["components"]["schemas"]["AuditRequest"]
        assert req["properties"]["type"]["enum"] == ["attack", "backdoor", "code_balance",
                                                      "harden"]
        assert {"code_balance", "backdoor", "methods"} <= set(req["properties"])

        for body, field in (({"type": "code_balance", "code_balance": {"parts": 99}},
                             "code_balance.parts"),
                            ({"type": "code_balance", "methods": ["pgd"]}, "methods"),
                            ({"methods": ["pgd"], "code_balance": {"parts": 2}},
                             "code_balance")):
            r = httpx.post(f"{server.url}/audit", json={"model": "tiny", **body})
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text

        worker = start_worker(server.worker_env, tmp_path / "w-plugin.log", "w-plugin")
        try:
            audit_id = submit(server.url, {"type": "code_balance", "model": "tiny",
                                           "code_balance": {"parts": 4}})
            st = wait(server.url, audit_id, timeout=120)
        finally:
            stop_process(worker)
        assert st["state"] == "done", st
        assert st["type"] == "code_balance" and st["progress"]["done_parts"] == 4
        _check_result(st["result"], tiny_bundle)
        assert st["result"]["pids"] == [worker.pid] * 4  # every chunk ran on the worker
        page = httpx.get(f"{server.url}/audit/{audit_id}/report?format=html").text
        assert "<h1>Code balance audit of <code>tiny</code></h1>" in page
        assert "id='json-link' href='?format=json'" in page

        env = {k: v for k, v in server.worker_env.items() if k != "HASHAUDIT_PLUGINS"}
        bare = start_worker(env, tmp_path / "w-bare.log", "w-bare")
        try:
            audit_id = submit(server.url, {"type": "code_balance", "model": "tiny"})
            st = wait(server.url, audit_id, timeout=120)
        finally:
            stop_process(bare)
        assert st["state"] == "failed", st
        assert "unknown audit type 'code_balance'" in st["error"], st["error"]


def test_plugin_type_in_the_cli(tiny_store, tiny_bundle, tmp_path):
    """`hashaudit audit` offers the plugin's action with its options, and runs it."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **PLUGIN_ENV}
    env.pop("HASHAUDIT_REDIS_URL", None)
    r = subprocess.run([sys.executable, "-m", "service.cli", "audit", "balance", "--bundle",
                        "tiny", "--store", str(tiny_store), "--device", "cpu", "--parts", "2",
                        "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "report.json").read_text())
    _check_result(res, tiny_bundle)
    assert len(set(res["pids"])) == 1 and np.isfinite(res["max_imbalance"])
    assert "largest bit imbalance" in r.stdout
    assert "Code balance audit of" in (out / "report.html").read_text()
