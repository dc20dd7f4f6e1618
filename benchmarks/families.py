"""Attack families on a bundle, through the audit task code (in-process):

1. label-free (``uaa_gan``) vs label-conditioned generators: mAP@all and drop at each eps;
2. targeted methods: t-MAP before and after, with the ceiling (t-MAP of the target's anchor
   code, the majority vote of its database codes, and of its PrototypeNet code).

    python benchmarks/families.py [--bundle fmnist-dpsh-32] [--count 1000]

Prints two tables and writes ``benchmarks/results/families.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_device_arg,
    add_precision_arg,
    machine,
    pick_device,
    pick_precision,
    print_table,
    write_json,
)
from service.jobs.queue import run_local_audit  # noqa: E402
from service.jobs.spec import normalize_spec  # noqa: E402
from service.serving import BundleService  # noqa: E402
from service.store import ModelStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UNTARGETED = ["untargeted_gan", "untargeted_gan_plus", "uaa_gan"]
TARGETED = ["dhta_targeted", "tha_targeted", "targeted_gan"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="fmnist-dpsh-32")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--eps", nargs="+", default=["8/255", "16/255"])
    p.add_argument("--out", type=Path, default=None)
    add_device_arg(p)
    add_precision_arg(p)
    args = p.parse_args()
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    models = ModelStore(args.store, device, precision)
    svc = BundleService(models.get(args.bundle))
    methods = [m for m in UNTARGETED + TARGETED if m in svc.methods()]
    spec = normalize_spec(svc, {"methods": methods, "eps": args.eps,
                                "queries": {"count": args.count}, "seed": 0,
                                "chunk_size": 250, "batch_size": 100}, max_queries=100_000)
    t0 = time.perf_counter()
    queue, audit_id = run_local_audit(models, spec)
    seconds = time.perf_counter() - t0
    res = queue.store.record(audit_id)["result"]
    clean = res["clean"]["map_k"]
    rows_u = [{"method": a["method"], "labels": "no" if a["method"] == "uaa_gan" else "yes",
               "eps": f"{a['eps_levels']}/255", "map": a["map_k"], "drop": a["drop_pct"],
               "ham": a["mean_hamming"], "ms": a["ms_per_image"]}
              for a in res["attacks"] if a["method"] in UNTARGETED]
    rows_t = [{"method": a["method"], "eps": f"{a['eps_levels']}/255",
               "before": a["t_map_clean"], "after": a["t_map"],
               "anchor": a["t_map_ceiling_anchor"],
               "proto": a.get("t_map_ceiling_prototype"), "map": a["map_k"],
               "ms": a["ms_per_image"]}
              for a in res["attacks"] if a["method"] in TARGETED]
    print(f"clean mAP@all {clean:.4f}, {res['queries']['audited']} queries, {seconds:.0f} s")
    t1 = print_table(rows_u, [
        ("method", "method", ""), ("labels", "needs labels", ""), ("eps", "eps", ""),
        ("map", "mAP@all attacked", ".4f"), ("drop", "drop %", ".1f"),
        ("ham", "mean Hamming moved", ".2f"), ("ms", "ms/img", ".2f")])
    print()
    t2 = print_table(rows_t, [
        ("method", "method", ""), ("eps", "eps", ""), ("before", "t-MAP clean", ".4f"),
        ("after", "t-MAP attacked", ".4f"), ("anchor", "ceiling: anchor code", ".4f"),
        ("proto", "ceiling: prototype code", ".4f"), ("map", "mAP@all (true labels)", ".4f"),
        ("ms", "ms/img", ".2f")])
    write_json("families", {"machine": machine(device, precision), "bundle": args.bundle,
                            "clean_map": clean,
                            "untargeted": rows_u, "targeted": rows_t, "seconds": seconds,
                            "tables": [t1, t2]}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
