"""Audit benchmark: a full audit of a bundle through the API + one Redis worker, and the
same audit in-process (the same task code, no queue), on one machine.

    python benchmarks/audit.py            # default bundle, its generators + pgd, 8 and 16/255

Starts Redis-backed ``hashaudit serve`` and one ``hashaudit worker`` itself (Redis DB 14 on
127.0.0.1 unless --redis-url). Reports wall time, images per second per method and the
queue's overhead versus in-process. Prints a table and writes
``benchmarks/results/audit.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402  # noqa: E402
    add_device_arg,
    add_precision_arg,
    machine,
    pick_device,
    pick_precision,
    print_table,
    wait_ready,
    write_json,
)
from service.jobs.queue import run_local_audit  # noqa: E402
from service.jobs.spec import normalize_spec  # noqa: E402
from service.serving import BundleService  # noqa: E402
from service.store import ModelStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dpsh-32")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--methods", nargs="+", default=None,
                   help="default: the bundle's generators + pgd")
    p.add_argument("--eps", nargs="+", default=["8/255", "16/255"])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    p.add_argument("--port", type=int, default=8795)
    add_device_arg(p)
    add_precision_arg(p)
    p.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    models = ModelStore(args.store, device, precision)
    svc = BundleService(models.get(args.model))
    methods = args.methods or [*svc.generators, "pgd"]
    raw = {"model": args.model, "methods": methods, "eps": args.eps,
           "queries": {"count": args.count, "seed": 0}, "seed": 0,
           "chunk_size": args.chunk_size, "batch_size": args.batch_size}
    spec = normalize_spec(svc, raw, max_queries=100_000)
    n_images = args.count * len(methods) * len(spec["eps"])

    # --- through the API and one worker
    import redis

    r = redis.Redis.from_url(args.redis_url)
    r.flushdb()
    env = {**os.environ, "HASHAUDIT_MODEL_STORE": str(args.store),
           "HASHAUDIT_DEFAULT_BUNDLE": args.model, "HASHAUDIT_REDIS_URL": args.redis_url,
           "HASHAUDIT_DEVICE": device, "HASHAUDIT_PRECISION": precision}
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port",
                               str(args.port), "--no-access-log", "--log-level", "warning"],
                              env=env, cwd=REPO)
    worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--name",
                               "bench"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, server)
        time.sleep(5)  # let the worker finish loading bundles
        t0 = time.perf_counter()
        resp = httpx.post(f"{url}/audit", json=raw, timeout=60)
        resp.raise_for_status()
        audit_id = resp.json()["id"]
        while True:
            st = httpx.get(f"{url}/audit/{audit_id}", timeout=60).json()
            if st["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(args.poll)
        t_client = time.perf_counter() - t0
        # submit -> done as the server recorded it (not rounded up to the poll interval)
        t_queue = st["timings"]["finished_at"] - st["timings"]["created_at"]
        if st["state"] != "done":
            raise SystemExit(f"audit {st['state']}: {st['error']}")
        via_queue = st["result"]
    finally:
        worker.terminate()
        server.terminate()
        worker.wait(30)
        server.wait(30)
    r.flushdb()

    # --- in-process, same task code, no queue
    t0 = time.perf_counter()
    queue, local_id = run_local_audit(models, spec)
    t_local = time.perf_counter() - t0
    local = queue.store.record(local_id)["result"]

    rows: list[dict[str, Any]] = []
    for a, b in zip(via_queue["attacks"], local["attacks"], strict=True):
        rows.append({
            "method": a["method"], "eps": f"{a['eps_levels']}/255", "map": a["map_k"],
            "drop_pct": a["drop_pct"], "queue_ms": a["ms_per_image"],
            "local_ms": b["ms_per_image"], "queue_img_s": 1e3 / a["ms_per_image"],
            "same_result": abs(a["map_k"] - b["map_k"]) < 1e-12,
        })
    overhead = 100.0 * (t_queue - t_local) / t_local
    table = print_table(rows, [
        ("method", "method", ""), ("eps", "eps", ""), ("map", "mAP@all attacked", ".4f"),
        ("drop_pct", "drop %", ".1f"), ("queue_ms", "worker attack ms/img", ".2f"),
        ("local_ms", "in-process attack ms/img", ".2f"), ("queue_img_s", "worker img/s", ".0f"),
        ("same_result", "same mAP both ways", ""),
    ])
    print(f"\nclean mAP@all {via_queue['clean']['map_k']:.4f}; {n_images} attacked images")
    print(f"wall time through API + 1 worker: {t_queue:.1f} s submit->done as recorded by the "
          f"server ({t_client:.1f} s seen by a client polling every {args.poll:g} s), "
          f"{n_images / t_queue:.0f} img/s; "
          f"in-process: {t_local:.1f} s ({n_images / t_local:.0f} img/s); "
          f"queue overhead {overhead:+.1f}%")
    write_json("audit", {
        "machine": machine(device, precision), "model": args.model, "spec": spec,
        "images": n_images,
        "wall_queue_s": t_queue, "wall_queue_client_s": t_client,
        "wall_in_process_s": t_local, "overhead_pct": overhead,
        "clean_map": via_queue["clean"]["map_k"], "rows": rows, "table": table,
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
