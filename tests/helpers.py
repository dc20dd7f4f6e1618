"""Test helpers importable from every test module (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

FMNIST_DIR = Path(os.environ.get("HASHAUDIT_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
REPO = Path(__file__).resolve().parent.parent

TINY_ARGS = [
    "hasher", "--name", "tiny", "--num-train", "1000", "--num-database", "1000",
    "--num-query", "100", "--epochs", "4", "--bits", "16", "--arch-kwargs", '{"width": 8}',
    "--batch-size", "64", "--lr", "3e-3", "--device", "cpu", "--no-progress",
]

TINY_PATTERN_ARGS = [
    "patterns", "--eps", "4/255", "8/255", "16/255", "0.1", "--steps", "20",
    "--per-class-batch", "8", "--device", "cpu", "--no-progress",
]

TINY_GENERATOR_ARGS = [
    "generator", "--epochs", "3", "--num-train", "1000", "--width", "8", "--batch-size", "50",
    "--proto-steps", "200",
    # No validation split (keep the last epoch): on 1,000 images, three tiny epochs differ
    # by noise; best-checkpoint selection is tested in tests/training/test_patterns.py.
    "--val-num", "0",
    "--lr", "1e-3", "--device", "cpu", "--no-progress",
]


def needs_fmnist() -> None:
    """Fail (not skip) without the data: the suite promises to run on real data."""
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {FMNIST_DIR}: run `make data` "
                    "(apt-get install -y dataset-fashion-mnist)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``hashaudit serve`` in a subprocess on a free port; waits until /health/ready is 200.

    Use as a context manager; ``url`` is the base URL, ``log`` the server's output file,
    ``args`` more ``serve`` options (``["--workers", "2"]``).
    """

    def __init__(self, store: Path, log: Path, default_bundle: str = "tiny",
                 env: dict[str, str] | None = None, ready_timeout: float = 120.0,
                 args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {**os.environ, "HASHAUDIT_MODEL_STORE": str(store),
                    "HASHAUDIT_DEFAULT_BUNDLE": default_bundle, "HASHAUDIT_DEVICE": "cpu",
                    "OMP_NUM_THREADS": "1", **(env or {})}
        self.ready_timeout = ready_timeout
        self.args = list(args or [])
        self.proc = None

    def __enter__(self) -> ServerProcess:
        import subprocess
        import sys
        import time

        import httpx

        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
             *self.args],
            stdout=self._out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError("server not ready in time:\n" + self.log.read_text()[-3000:])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()



def _test_redis_url() -> str:
    """The test Redis: ``HASHAUDIT_TEST_REDIS_URL``, else DB 13 on 127.0.0.1:6379, one DB per
    pytest-xdist worker (gw0 13, gw1 14, gw2 15): modules flush their DB, so two workers
    sharing one would wipe each other's queues."""
    if "HASHAUDIT_TEST_REDIS_URL" in os.environ:
        return os.environ["HASHAUDIT_TEST_REDIS_URL"]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    if index > 2:
        raise RuntimeError("at most 3 pytest-xdist workers share the test Redis (DBs 13-15); "
                           "set HASHAUDIT_TEST_REDIS_URL per worker for more")
    return f"redis://127.0.0.1:6379/{13 + index}"


REDIS_TEST_URL = _test_redis_url()


def start_worker(env: dict[str, str], log: Path, name: str):
    """``hashaudit worker`` in a subprocess (returns the Popen; caller kills it)."""
    import subprocess
    import sys

    out = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--name", name],
                            stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=REPO)


def stop_process(proc, timeout: float = 15) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait(5)


WORKER_ENV = {"HASHAUDIT_REDIS_URL": REDIS_TEST_URL, "HASHAUDIT_WORKER_HEARTBEAT_S": "0.5",
              "HASHAUDIT_WORKER_MAINTENANCE_S": "1", "HASHAUDIT_DEVICE": "cpu",
              "HASHAUDIT_REDIS_PREFIX": "hashaudit-test"}


@contextlib.contextmanager
def audit_stack(store: Path, logs: Path, **env: str):
    """An API server with Redis audits on ``store``'s ``tiny`` bundle; tests start and kill
    workers themselves with ``server.worker_env`` (``env`` adds settings)."""
    full = {**WORKER_ENV, "HASHAUDIT_MODEL_STORE": str(store),
            "HASHAUDIT_DEFAULT_BUNDLE": "tiny", **env}
    with ServerProcess(store, logs / "server.log", env=full) as server:
        server.worker_env = full
        server.logs = logs
        yield server


def submit(url: str, spec: dict, headers: dict[str, str] | None = None) -> str:
    r = httpx.post(f"{url}/audit", json=spec, timeout=30, headers=headers)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/audit/{r.json()['id']}"
    return r.json()["id"]


def wait(url: str, audit_id: str, timeout: float = 240, until=("done", "failed", "cancelled"),
         headers: dict[str, str] | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/audit/{audit_id}", timeout=30, headers=headers).json()
        if st["state"] in until:
            return st
        time.sleep(0.3)
    raise AssertionError(f"audit {audit_id} not finished: {st}")


def check_renders_in_chromium(page: str, tmp_path: Path, min_images: int = 9) -> None:
    """Headless Chromium loads the page; every image (plots, examples) decodes."""
    exe = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if
                Path(p).exists()), None)
    if exe is None:
        pytest.fail("chromium not installed: `make tools` (apt-get install chromium)")
    f = tmp_path / "report.html"
    f.write_text(page)
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=5000", "--dump-dom", f.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', r.stdout)
    assert m, r.stdout[:500] + r.stderr[-2000:]
    ok, total = int(m.group(1)), int(m.group(2))
    assert total >= min_images and ok == total, (ok, total)
