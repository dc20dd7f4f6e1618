"""``hashaudit serve --workers N``: N server processes on one listening socket.

A small supervisor rather than uvicorn's own ``workers=``: uvicorn's worker processes run a
plain ``uvicorn.Server``, and HashAudit's graceful shutdown needs its own
:class:`~service.api.shutdown.DrainingServer` in every process (readiness turns 503 and the
micro-batcher drains before uvicorn's limit). So the supervisor binds the socket once,
starts N processes (``spawn``: no CUDA or thread state is inherited), and each builds its own
app (:func:`service.api.create_app`: its own bundles and micro-batcher) and serves the shared
socket with ``DrainingServer``; the kernel hands each new connection to one of them.

* SIGTERM/SIGINT to the supervisor is passed on as SIGTERM to every process; each drains as
  with one process (``HASHAUDIT_SHUTDOWN_DRAIN_S``), and one still running a few seconds
  past that is killed.
* A process that exits on its own (a crash, a failed start) stops the others, and the
  supervisor exits 1: the orchestrator (compose ``restart: unless-stopped``) restarts the
  server whole, rather than a server running with fewer processes than it was told to.
* Metrics: ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder per serve unless set,
  emptied at start either way) lets every process's ``/metrics`` aggregate all of them
  (``service.api.prometheus``).
* Readiness: each process keeps a file ``ready/<pid>`` in that folder while it is serving
  (bundles loaded and warm, not draining); ``/health/ready`` answers 200 only when the
  answering process is ready *and* all N files are there, so whichever process a probe
  reaches, 200 means every process serves.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from service.config import Settings
from service.errors import ConfigError

log = logging.getLogger("service.api")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KILL_AFTER_S = 5.0  # past the drain time, a process still running is killed


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse settings that cannot work with several processes (clear message, at start)."""
    if workers < 1 or workers > 64:
        raise ConfigError(f"workers: between 1 and 64, got {workers}", field="workers")
    if workers == 1:
        return
    if not settings.redis_url:
        raise ConfigError(
            f"--workers {workers}: audits need Redis with several server processes (the "
            "in-process audit runner would run each audit in one process only, and the "
            "others could not see it). Set HASHAUDIT_REDIS_URL and start `hashaudit worker`, "
            "or serve with --workers 1", field="workers")
    if settings.model_uploads:
        raise ConfigError(
            f"--workers {workers}: HASHAUDIT_MODEL_UPLOADS imports a bundle into the process "
            "that answered POST /models only; serve with --workers 1 to accept uploads",
            field="workers")


def torch_threads(settings: Settings, workers: int) -> int:
    """CPU threads for torch in one server process: ``HASHAUDIT_TORCH_THREADS``; if 0 (auto),
    ``OMP_NUM_THREADS`` when set, else ``(cores - 1) // workers``, at least 1."""
    if settings.torch_threads:
        return settings.torch_threads
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(1, (cores - 1) // workers)


def set_torch_threads(settings: Settings, workers: int) -> int:
    """Apply :func:`torch_threads` to this process (call before the bundles load)."""
    import torch

    n = torch_threads(settings, workers)
    torch.set_num_threads(n)
    return n


def multiproc_dir() -> Path | None:
    """The shared metrics folder when serving with several processes, else None."""
    d = os.environ.get(MULTIPROC_ENV)
    return Path(d) if d else None


def _ready_file() -> Path | None:
    d = multiproc_dir()
    return None if d is None else d / "ready" / str(os.getpid())


def mark_ready(ready: bool) -> None:
    """Record whether this process serves (no-op with one process)."""
    f = _ready_file()
    if f is None:
        return
    if ready:
        f.parent.mkdir(exist_ok=True)
        f.touch()
    else:
        f.unlink(missing_ok=True)


def ready_count() -> int | None:
    """Processes that serve now, or None with one process."""
    d = multiproc_dir()
    if d is None:
        return None
    try:
        return sum(1 for _ in (d / "ready").iterdir())
    except FileNotFoundError:
        return 0


def _fresh_dir() -> tuple[Path, bool]:
    """The metrics folder (given, or a new temporary one) emptied; and whether we own it."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        d = Path(given)
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.db"):
            f.unlink()
        shutil.rmtree(d / "ready", ignore_errors=True)
        return d, False
    return Path(tempfile.mkdtemp(prefix="hashaudit-metrics-")), True


def _child(sock: socket.socket, host: str, port: int, drain_s: float, log_level: str,
           access_log: bool) -> None:
    """One server process: its own app (bundles, micro-batcher) on the shared socket."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    from service.api import create_app
    from service.api.shutdown import serve
    from service.config import get_settings

    settings = get_settings()
    log.info("server process %d: torch uses %d CPU thread(s)", os.getpid(),
             set_torch_threads(settings, settings.workers))
    serve(create_app(settings), host, port, drain_s, log_level=log_level,
          access_log=access_log, sockets=[sock])


def serve_workers(settings: Settings, workers: int, host: str, port: int, log_level: str,
                  access_log: bool) -> int:
    """Run ``workers`` server processes on ``host:port`` until SIGTERM/SIGINT; returns the
    exit code (0 after a requested shutdown, 1 when a process exited on its own)."""
    import uvicorn

    check_workers(settings, workers)
    mdir, owned = _fresh_dir()
    os.environ[MULTIPROC_ENV] = str(mdir)
    os.environ["HASHAUDIT_WORKERS"] = str(workers)
    sock = uvicorn.Config("service.api:create_app", host=host, port=port).bind_socket()
    ctx = multiprocessing.get_context("spawn")
    drain_s = settings.shutdown_drain_s
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    procs: list[multiprocessing.process.BaseProcess] = []
    code = 0
    try:
        for i in range(workers):
            p = ctx.Process(target=_child, name=f"hashaudit-serve-{i}",
                            args=(sock, host, port, drain_s, log_level, access_log))
            p.start()
            procs.append(p)
        log.info("supervisor %d: %d server processes %s on %s:%d (metrics in %s)",
                 os.getpid(), workers, [p.pid for p in procs], host, port, mdir)
        while not stop.is_set():
            done = multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5)
            if done and not stop.is_set():
                dead = [p for p in procs if not p.is_alive()]
                log.error("server process %s exited with %s; stopping the others",
                          [p.pid for p in dead], [p.exitcode for p in dead])
                code = 1
                break
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + drain_s + KILL_AFTER_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("server process %d still running after %.0f s: killed", p.pid,
                          drain_s + KILL_AFTER_S)
                p.kill()
                p.join(5)
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()
        if owned:
            shutil.rmtree(mdir, ignore_errors=True)
        else:
            shutil.rmtree(mdir / "ready", ignore_errors=True)
    return code
