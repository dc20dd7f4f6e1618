"""``hashaudit serve --workers 2``: two real server processes on one port, over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from helpers import REDIS_TEST_URL, REPO, ServerProcess
from service.images import encode_png

STORE = REPO / "model_store"  # the shipped bundle: no training needed
BUNDLE = "fmnist-dpsh-32"


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8))


def _metric(text: str, name: str, **labels: str) -> dict[str, float]:
    """Samples of ``name`` whose labels include ``labels``: {label text: value}."""
    out = {}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            out[m.group(1)] = float(m.group(2))
    return out


def test_two_workers_serve_aggregate_and_ready(tmp_path: Path, redis_db) -> None:
    metrics_dir = tmp_path / "metrics"
    # leftovers of an earlier serve must not count: the folder is emptied at start
    (metrics_dir / "ready").mkdir(parents=True)
    (metrics_dir / "ready" / "999999").touch()
    (metrics_dir / "counter_999999.db").write_bytes(b"not a metrics file")
    env = {"HASHAUDIT_REDIS_URL": REDIS_TEST_URL, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with ServerProcess(STORE, tmp_path / "server.log", default_bundle=BUNDLE, env=env,
                       args=["--workers", "2", "--no-access-log"]) as server:
        url = server.url
        ready = httpx.get(f"{url}/health/ready", timeout=10).json()
        procs = ready["detail"]["processes"]
        assert procs["workers"] == 2 and procs["ready"] == 2, ready

        # new connections, several at once, until both processes have answered /encode
        sent = 0

        def encode(i: int) -> int:
            r = httpx.post(f"{url}/encode", files={"image": ("q.png", _png(i), "image/png")},
                           data={"top_k": "5"}, timeout=60)
            assert r.status_code == 200, r.text
            assert len(r.json()["hits"]) == 5
            return 1

        pids: dict[str, float] = {}
        with ThreadPoolExecutor(8) as pool:
            while sent < 400:
                sent += sum(pool.map(encode, range(sent, sent + 16)))
                text = httpx.get(f"{url}/metrics", timeout=10).text
                pids = _metric(text, "hashaudit_process_requests", route="/encode")
                if len(pids) == 2:
                    break
        assert len(pids) == 2, f"one process served all {sent} requests: {pids}"
        assert all(v > 0 for v in pids.values()) and sum(pids.values()) == sent
        # the request counter is the sum over both processes
        total = _metric(text, "hashaudit_requests_total", method="POST", route="/encode",
                        status="200")
        assert list(total.values()) == [float(sent)], total
        assert "hashaudit_ready 1.0" in text and "hashaudit_models_loaded 1.0" in text

        r = httpx.post(f"{url}/attack", files={"image": ("q.png", _png(1), "image/png")},
                       data={"labels": "Coat", "method": "untargeted_gan", "eps": "8/255"},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["method"] == "untargeted_gan" and r.json()["adversarial_png"]

        # readiness covers every process: one not serving -> 503 whichever one answers
        ready_files = sorted((metrics_dir / "ready").iterdir())
        assert len(ready_files) == 2
        ready_files[0].unlink()
        for _ in range(4):
            r = httpx.get(f"{url}/health/ready", timeout=10)
            assert r.status_code == 503 and r.json()["status"] == "1 of 2 server processes ready"
        ready_files[0].touch()
        assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200
        proc = server.proc
    # SIGTERM (the context manager's exit): both processes drain and finish, the supervisor
    # exits 0 and removes the readiness files of the folder it was given
    assert proc.returncode == 0
    assert not (metrics_dir / "ready").exists()
    log = (tmp_path / "server.log").read_text()
    assert log.count("Finished server process") == 2, log[-3000:]


def test_workers_refuse_in_process_audits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HASHAUDIT_REDIS_URL"}
    env.update(HASHAUDIT_MODEL_STORE=str(STORE), HASHAUDIT_DEFAULT_BUNDLE=BUNDLE,
               HASHAUDIT_REDIS_URL="")
    r = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--workers", "2",
                        "--port", "1"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--workers 2: audits need Redis" in r.stderr
    assert "HASHAUDIT_REDIS_URL" in r.stderr
