"""Backdoor benchmark: t-MAP of triggered queries vs the number of poisoned training images.

Runs the backdoor audit (the task code of ``POST /audit`` with ``"type": "backdoor"``) in this
process on the default bundle: one trigger optimised on the bundle's hasher, then for each
count (and 0, the clean baseline) a hasher trained from scratch with the bundle's recipe on
the poisoned training set (a seeded subset and fewer epochs unless told otherwise, to fit a
CPU).

    python benchmarks/backdoor.py [--poisons 10 20 40 80] [--num-train 3000 --epochs 8]

Prints a table and writes ``benchmarks/results/<name>.json`` (``--name``, default backdoor),
the audit's HTML report (``<name>.html``, with the plot) and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    add_device_arg,
    add_precision_arg,
    machine,
    pick_device,
    pick_precision,
    print_table,
    write_json,
)
from service.jobs.audit_types.backdoor import BACKDOOR_DEFAULT_POISONS, backdoor_plot  # noqa: E402
from service.jobs.queue import run_local_audit  # noqa: E402
from service.jobs.report import render_html  # noqa: E402
from service.jobs.spec import normalize_spec  # noqa: E402
from service.serving import BundleService  # noqa: E402
from service.store import ModelStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="fmnist-dpsh-32")
    p.add_argument("--target", default="Bag")
    p.add_argument("--poisons", type=int, nargs="+", default=list(BACKDOOR_DEFAULT_POISONS))
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--patch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="backdoor", help="results file stem (JSON, PNG, HTML)")
    add_device_arg(p)
    add_precision_arg(p)
    args = p.parse_args()
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    store = ModelStore(REPO / "model_store", device, precision)
    svc = BundleService(store.get(args.bundle))
    spec = normalize_spec(svc, {"type": "backdoor", "seed": args.seed, "backdoor": {
        "target": args.target, "poisons": args.poisons, "num_train": args.num_train,
        "epochs": args.epochs, "patch": args.patch, "save_bundles": False}})
    t0 = time.perf_counter()
    # save_bundles is off, so the audit writes no artifacts
    queue, audit_id = run_local_audit(store, spec,
                                      progress=lambda n: print(".", end="", flush=True))
    print()
    status = queue.status(audit_id)
    if status["state"] != "done":
        print(f"audit {status['state']}: {status['error']}")
        return 1
    r = status["result"]
    rows: list[dict[str, Any]] = [{
        "poisons": row["poisons"], "clean_map": row["clean_map"],
        "clean_map_change": row["clean_map_change"], "t_map_triggered": row["t_map_triggered"],
        "t_map_gain": row["t_map_gain"], "t_map_untriggered": row["t_map_untriggered"],
        "train_s": row["train_seconds"]} for row in r["rows"]]
    print(f"target {r['target_name']}, trigger {r['patch_side']} px, {r['train_images']} "
          f"training images ({r['target_train_images']} of the target), {r['epochs']} epochs; "
          f"surrogate t-MAP with trigger {r['surrogate']['t_map_triggered']:.4f}")
    table = print_table(rows, [
        ("poisons", "poisons", "d"), ("clean_map", "clean mAP@all", ".4f"),
        ("clean_map_change", "vs clean model", "+.4f"),
        ("t_map_triggered", "t-MAP triggered", ".4f"),
        ("t_map_gain", "gain vs clean model", "+.4f"),
        ("t_map_untriggered", "t-MAP no trigger", ".4f"), ("train_s", "train s", ".0f")])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.png").write_bytes(base64.b64decode(backdoor_plot(r)))
    (RESULTS / f"{args.name}.html").write_text(render_html(status))
    write_json(args.name, {
        "machine": machine(device, precision), "bundle": args.bundle, "target": r["target_name"],
        "patch": r["patch_side"], "num_train": r["train_images"], "epochs": r["epochs"],
        "surrogate": r["surrogate"], "seconds": time.perf_counter() - t0, "rows": rows,
        "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
