"""Harden benchmark: adversarial fine-tuning of the default bundle, both models re-audited.

Runs the harden audit (the task code of ``POST /audit`` with ``"type": "harden"``) in this
process, twice: the CgAT-style variant (``pgd_center``, a few PGD steps per batch) and the
generator-based fast variant (one of the bundle's generators makes the adversarial batches).
Each job fine-tunes from the bundle's hasher, freezes the hardened bundle under
``--artifacts``, re-trains its untargeted generators, and re-audits both models (every
untargeted method the bundle serves, PGD-100 x 5 restarts on a subset, the transfer row).

    python benchmarks/harden.py [--epochs 3 --steps 5] [--fast-attack untargeted_gan_plus]

To fit the 45 min budget on 2 CPU cores (estimated from the per-image cost of a
forward+backward pass, about 3 ms on one core): PGD-100 x 5 runs on the first 100 queries
(``--robust-queries``), and the fast variant is re-audited at 8/255 only (``--fast-eps``)
without re-training its generators (``--fast-retrain-generators``; its generator rows then
say they use the original's generators); its figures are the ones the bar names (clean and
PGD-20 mAP@all at 8/255, the PGD-100 x 5 check, the transfer row). Prints both tables and writes
``benchmarks/results/<name>.json`` (``--name``, default harden), the HTML reports
(``<name>.html``, ``<name>_fast.html``) and the robustness plot ``<name>.png``.
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
    machine,
    pick_device,
    print_table,
    write_json,
)
from service.jobs.audit_types.harden import robustness_plot  # noqa: E402
from service.jobs.queue import run_local_audit  # noqa: E402
from service.jobs.report import render_html  # noqa: E402
from service.jobs.spec import normalize_spec  # noqa: E402
from service.serving import BundleService  # noqa: E402
from service.store import ModelStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run(store: Any, svc: Any, request: dict[str, Any], artifacts: Path) -> tuple[dict, float]:
    spec = normalize_spec(svc, request)
    t0 = time.perf_counter()
    queue, audit_id = run_local_audit(store, spec, artifact_dir=artifacts,
                                      progress=lambda n: print(".", end="", flush=True))
    print()
    status = queue.status(audit_id)
    if status["state"] != "done":
        raise SystemExit(f"audit {status['state']}: {status['error']}")
    return status, time.perf_counter() - t0


def summarise(name: str, status: dict[str, Any], seconds: float) -> dict[str, Any]:
    r = status["result"]
    print(f"\n== {name}: {r['verdict']}")
    print(f"   wall {seconds / 60:.1f} min (training {r['timings']['train_s']:.0f} s, "
          f"generators {r['timings']['generators_s']:.0f} s, re-audits "
          f"{r['timings']['audit_original_s']:.0f} + {r['timings']['audit_hardened_s']:.0f} s)")
    rows = [{"model": x["model"], "attack": x["label"], "eps": f"{x['eps'] * 255:.0f}/255",
             "map_all": x["map_all"], "map_1000": x["map_1000"], "p_r2": x["p_r2"],
             "queries": x["queries"], "seconds": x["seconds"]} for x in r["rows"]]
    for model in ("original", "hardened"):
        c = r["clean"][model]
        rows.insert(0 if model == "original" else 1, {
            "model": model, "attack": "clean", "eps": "-", "map_all": c["map_all"],
            "map_1000": c["map_1000"], "p_r2": c["p_r2"], "queries": c["num_queries"],
            "seconds": 0.0})
    table = print_table(rows, [
        ("model", "model", "s"), ("attack", "attack", "s"), ("eps", "eps", "s"),
        ("map_all", "mAP@all", ".4f"), ("map_1000", "mAP@1000", ".4f"), ("p_r2", "P@r<=2", ".4f"),
        ("queries", "queries", "d"), ("seconds", "attack s", ".0f")])
    for c in r["checks"]:
        print(("   ok   " if c["ok"] else "   FAIL ") + c["text"])
    return {"verdict": r["verdict"], "summary": r["summary"], "settings": r["settings"],
            "timings": r["timings"], "wall_seconds": seconds, "checks": r["checks"],
            "generators": r["generators"], "bundle": r["bundle"], "history": r["history"],
            "rows": rows, "table": table}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="fmnist-dpsh-32")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--attack", default="pgd_center")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--epochs", type=int, default=None, help="default: the harden type's")
    p.add_argument("--adv-fraction", type=float, default=None, help="default: the type's")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's / 20")
    p.add_argument("--center-weight", type=float, default=None, help="default: the type's")
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--queries", type=int, default=None, help="default: all 1000")
    p.add_argument("--robust-queries", type=int, default=100)
    p.add_argument("--generator-epochs", type=int, default=2)
    p.add_argument("--generator-num-train", type=int, default=5000)
    p.add_argument("--fast-attack", default="untargeted_gan_plus",
                   help="training generator of the fast variant; 'none' skips it")
    p.add_argument("--fast-epochs", type=int, default=3)
    p.add_argument("--fast-eps", nargs="+", default=["8/255"],
                   help="re-audit eps of the fast variant")
    p.add_argument("--fast-retrain-generators", action="store_true",
                   help="re-train the fast variant's generators too (default: not, to fit "
                        "the budget; its generator rows then say 'original's generator')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts" / "benchmarks")
    p.add_argument("--name", default="harden", help="results file stem (JSON, PNG, HTML)")
    add_device_arg(p)
    args = p.parse_args()
    device = pick_device(args.device)
    store = ModelStore(args.store, device, "fp32")
    svc = BundleService(store.get(args.bundle))
    common = {"eps": args.eps, "num_train": args.num_train, "lr": args.lr,
              "queries": args.queries, "robust_queries": args.robust_queries,
              "generator_epochs": args.generator_epochs,
              "generator_num_train": args.generator_num_train}
    common.update({k: v for k, v in (("adv_fraction", args.adv_fraction),
                                     ("center_weight", args.center_weight)) if v is not None})
    t_all = time.perf_counter()
    out: dict[str, Any] = {"machine": machine(device, "fp32"), "bundle": args.bundle}
    status, secs = run(store, svc, {"type": "harden", "seed": args.seed, "harden": {
        **common, "attack": args.attack, "steps": args.steps, "epochs": args.epochs}},
        args.artifacts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.html").write_text(render_html(status))
    (RESULTS / f"{args.name}.png").write_bytes(base64.b64decode(robustness_plot(
        status["result"])))
    out["pgd"] = summarise(f"{args.attack}-{args.steps}", status, secs)
    if args.fast_attack != "none":
        status, secs = run(store, svc, {"type": "harden", "seed": args.seed, "harden": {
            **common, "attack": args.fast_attack, "epochs": args.fast_epochs,
            "audit_eps": args.fast_eps, "robust_eps": args.fast_eps[:1],
            "retrain_generators": args.fast_retrain_generators}}, args.artifacts)
        (RESULTS / f"{args.name}_fast.html").write_text(render_html(status))
        out["fast"] = summarise(f"fast ({args.fast_attack})", status, secs)
    out["seconds"] = time.perf_counter() - t_all
    print(f"\ntotal {out['seconds'] / 60:.1f} min")
    write_json(args.name, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
