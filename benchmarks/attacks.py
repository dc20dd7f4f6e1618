"""Attack benchmark on a bundle: every registered untargeted method at several eps.

For each (method, eps): mAP@all and mAP@1000 after attack (images rounded to uint8 as a user
receives them), drop in %, mean Hamming distance moved from the clean code, RMSE (the
UntargetedGAN paper's perceptibility, eq. 7), true L-inf, PSNR, and time per image (same
batch size, same threads, same run). Prints a table in the style of the paper's Tables 5 and
7, writes JSON, a PNG with top-N precision and PR curves, and the strength-vs-time frontier
(attacked mAP@all against ms/image on a log scale, every method, with PGD-k for k in
``--frontier-steps`` as the reference curve; :func:`service.jobs.audit_types.html.frontier_plot`).

    python benchmarks/attacks.py [--bundle fmnist-dpsh-32] [--eps 4/255 8/255 16/255 0.1]
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

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
from service.attacks import ATTACKS  # noqa: E402
from service.attacks.runner import attack_batch  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.errors import AttackInputError  # noqa: E402
from service.evaluation import protocol_record, retrieval_figures  # noqa: E402
from service.jobs.audit_types.html import frontier_plot, frontier_points  # noqa: E402
from service.nets.hasher import encode_uint8  # noqa: E402
from service.parsing import parse_eps  # noqa: E402
from service.store import ModelStore  # noqa: E402


def perceptibility(adv: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    d = (adv.astype(np.float64) - clean.astype(np.float64)) / 255.0
    mse = (d ** 2).reshape(len(d), -1).mean(1)
    rmse = np.sqrt(mse)
    psnr = np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-12)), np.inf)
    return {"rmse": float(rmse.mean()), "linf": float(np.abs(d).max()),
            "psnr": float(np.mean(psnr[np.isfinite(psnr)])) if np.isfinite(psnr).any()
            else float("inf")}


def plot_curves(clean: dict, results: list[dict], eps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(clean["top_n"]["n"], clean["top_n"]["precision"], "k-o", label="clean")
    a2.plot(clean["pr_curve"]["recall"], clean["pr_curve"]["precision"], "k-", label="clean")
    for r in results:
        if abs(r["eps"] - eps) > 1e-9 or "curves" not in r:
            continue
        c = r["curves"]
        a1.plot(c["top_n"]["n"], c["top_n"]["precision"], "-o", ms=3, label=r["method"])
        a2.plot(c["pr_curve"]["recall"], c["pr_curve"]["precision"], "-", label=r["method"])
    a1.set(xscale="log", xlabel="N", ylabel="precision@N", title=f"top-N, eps={eps * 255:.0f}/255")
    a2.set(xlabel="recall", ylabel="precision", title="PR over Hamming radius")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--eps", type=parse_eps, nargs="+",
                   default=[4 / 255, 8 / 255, 16 / 255, 0.1])
    p.add_argument("--methods", nargs="+", default=None, help="default: all untargeted")
    p.add_argument("--num-queries", type=int, default=None, help="default: all of the bundle's")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="iterations of iterative methods")
    p.add_argument("--frontier-steps", type=int, nargs="*", default=[1, 2, 5, 10, 20, 50],
                   help="PGD step counts of the reference curve (empty: none)")
    p.add_argument("--out", type=Path, default=None)
    add_device_arg(p)
    add_precision_arg(p)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    logging.basicConfig(level=logging.WARNING)
    settings = get_settings()
    bundle = ModelStore(settings.model_store, device, precision).get(
        args.bundle or settings.default_bundle)
    q = bundle.queries
    n = args.num_queries or len(q)
    images, labels = q.images[:n], q.labels[:n]
    db_codes, db_labels = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
    methods = args.methods or [m for m in ATTACKS.names() if not ATTACKS.get(m).targeted]
    clean_codes = encode_uint8(bundle.hasher, images)
    clean = retrieval_figures(clean_codes, labels, db_codes, db_labels)
    print(f"bundle {bundle.name} ({bundle.sha[:12]}), {n} queries, {len(db_labels)} database, "
          f"{bundle.manifest.bits} bits, clean mAP@all {clean['map_all']:.4f}, "
          f"{device} {precision}, torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    runs = [(m, args.steps if ATTACKS.get(m).iterative else None, False) for m in methods]
    runs += [("pgd", k, True) for k in args.frontier_steps
             if not (k == args.steps and "pgd" in methods)]
    for eps in args.eps:
        for method, steps, reference in runs:
            opts = {"steps": steps} if steps is not None else {}
            try:
                res = attack_batch(bundle, method, eps, images, labels, seed=0,
                                   batch_size=args.batch_size, **opts)
            except AttackInputError as exc:
                print(f"skip {method} at eps {eps:.4f}: {exc.message}", flush=True)
                rows.append({"method": method, "eps": eps, "skipped": exc.message})
                continue
            fig = retrieval_figures(res.adv_codes, labels, db_codes, db_labels)
            row = {
                "method": method + (f"-{steps}" if steps is not None and method != "worst_case"
                                    else ""), "eps": eps,
                "base_method": method, "steps": steps, "reference_only": reference,
                "eps_255": eps * 255, "map_all": fig["map_all"], "map_1000": fig["map_1000"],
                "drop_pct": 100 * (1 - fig["map_all"] / clean["map_all"]),
                "hamming": float(res.hamming.mean()), **perceptibility(res.adversarial, images),
                "ms_per_image": 1000 * res.seconds / n, "batch_size": args.batch_size,
                "curves": {"top_n": fig["top_n"], "pr_curve": fig["pr_curve"]},
            }
            assert row["linf"] <= eps + 1e-9, (method, row["linf"], eps)
            if method == "worst_case":
                row["used"] = res.extra.get("used", [])
            rows.append(row)
            print(f"eps {eps * 255:5.1f}/255 {row['method']:<22} mAP@all {row['map_all']:.4f} "
                  f"ham {row['hamming']:5.2f} {row['ms_per_image']:8.3f} ms/img", flush=True)
    print()
    ok = [r for r in rows if "skipped" not in r]
    table = print_table(ok, [
        ("eps_255", "eps (x/255)", ".1f"), ("method", "method", ""),
        ("map_all", "mAP@all", ".4f"), ("map_1000", "mAP@1000", ".4f"),
        ("drop_pct", "drop %", ".1f"), ("hamming", "mean Hamming", ".2f"),
        ("rmse", "RMSE", ".4f"), ("linf", "L-inf", ".4f"), ("psnr", "PSNR dB", ".1f"),
        ("ms_per_image", "ms/image", ".3f")])
    plots = []
    for eps in args.eps:
        path = (RESULTS if args.out is None else args.out.parent) / \
            f"attacks_curves_eps{eps * 255:.0f}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_curves(clean, [r for r in ok if not r["reference_only"]], eps, path)
        plots.append(str(path))
    frontier = (RESULTS / "attacks_frontier.png" if args.out is None
                else args.out.with_name(args.out.stem + "_frontier.png"))
    frontier.write_bytes(base64.b64decode(frontier_plot(
        frontier_points(ok), clean["map_all"], f"{bundle.name}, {n} queries, {device}")))
    plots.append(str(frontier))
    write_json("attacks", {
        "machine": machine(device, precision), "bundle": bundle.name, "sha": bundle.sha,
        "protocol": protocol_record(), "queries": n, "clean": clean, "rows": rows,
        "table": table, "plots": plots, "uint8_rounded": True,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
