"""The generator bar of issue 20: every untargeted generator of a bundle against its universal
patterns, on all of the bundle's queries.

Each untargeted label-conditioned generator must be at least as strong (lower or equal
mAP@all, uint8-rounded) as the per-class ``class_universal`` pattern, and the label-free one
(``uaa_gan``) at least as strong as the single ``universal`` pattern, at every eps asked
(default 8/255 and 16/255), at no more than ``--max-ms`` ms/image on this machine (batch
100, models loaded, one warm-up batch first). Prints the table, writes JSON, exits 1 when the
bar is missed.

    python benchmarks/generator_bar.py [--bundle fmnist-dpsh-32] [--eps 8/255 16/255]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_device_arg, machine, pick_device, print_table, write_json  # noqa: E402, E501
from service.attacks import ATTACKS  # noqa: E402
from service.attacks.generator_attack import GeneratorAttack  # noqa: E402
from service.attacks.runner import attack_batch  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.evaluation import retrieval_figures  # noqa: E402
from service.parsing import parse_eps  # noqa: E402
from service.store import ModelStore  # noqa: E402


def bar_rows(bundle, eps_list: list[float], batch_size: int = 100,
             num_queries: int | None = None) -> list[dict]:
    """One row per (eps, method): the bundle's untargeted generators and its two patterns."""
    q = bundle.queries
    n = num_queries or len(q)
    images, labels = q.images[:n], q.labels[:n]
    db = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
    m = bundle.manifest
    gens = sorted({g["attack"] for g in m.generators
                   if not ATTACKS.get(g["attack"]).targeted})
    methods = [*gens, "class_universal", "universal"]
    rows = []
    for eps in eps_list:
        for method in methods:
            attack_batch(bundle, method, eps, images[:batch_size], labels[:batch_size])  # warm
            res = attack_batch(bundle, method, eps, images, labels, batch_size=batch_size)
            cls = ATTACKS.get(method)
            if issubclass(cls, GeneratorAttack):
                ref = "class_universal" if cls.needs_labels else "universal"
            else:
                ref = None
            entry = next((g for g in m.generators if g["attack"] == method), {})
            val = entry.get("training", {}).get("validation") or {}
            rows.append({
                "eps": eps, "eps_255": round(eps * 255, 1), "method": method,
                "kind": "generator" if ref else "pattern", "reference": ref,
                "base": entry.get("base"), "best_epoch": val.get("best_epoch"),
                "map_all": retrieval_figures(res.adv_codes, labels, *db,
                                             curves=False)["map_all"],
                "ms_per_image": 1000 * res.seconds / n, "linf": float(res.linf.max()),
            })
            print(f"eps {eps * 255:4.1f}/255 {method:<20} mAP@all {rows[-1]['map_all']:.4f} "
                  f"{rows[-1]['ms_per_image']:.3f} ms/img", flush=True)
    return rows


def check_bar(rows: list[dict], max_ms: float) -> list[str]:
    """The rows that miss the bar, as sentences (empty: the bar is met)."""
    fails = []
    by = {(r["eps"], r["method"]): r for r in rows}
    for r in rows:
        if r["reference"] is None:
            continue
        ref = by[(r["eps"], r["reference"])]
        r["margin"] = ref["map_all"] - r["map_all"]
        if r["map_all"] > ref["map_all"]:
            fails.append(f"{r['method']} at {r['eps_255']}/255: {r['map_all']:.4f} > "
                         f"{r['reference']} {ref['map_all']:.4f}")
        if r["ms_per_image"] > max_ms:
            fails.append(f"{r['method']} at {r['eps_255']}/255: {r['ms_per_image']:.3f} "
                         f"ms/image > {max_ms}")
    return fails


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--eps", type=parse_eps, nargs="+", default=[8 / 255, 16 / 255])
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--max-ms", type=float, default=1.0, help="ms/image limit of a generator")
    p.add_argument("--out", type=Path, default=None)
    add_device_arg(p)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    s = get_settings()
    bundle = ModelStore(s.model_store, device).get(args.bundle or s.default_bundle)
    rows = bar_rows(bundle, args.eps, args.batch_size)
    fails = check_bar(rows, args.max_ms)
    table = print_table(rows, [
        ("eps_255", "eps (x/255)", ".0f"), ("method", "method", ""), ("kind", "kind", ""),
        ("base", "base", ""), ("best_epoch", "best val epoch", ""),
        ("map_all", "mAP@all", ".4f"), ("margin", "below its pattern", ".4f"),
        ("ms_per_image", "ms/image", ".3f")])
    print("bar met" if not fails else "bar MISSED:\n  " + "\n  ".join(fails))
    write_json("generator_bar", {
        "machine": machine(device), "bundle": bundle.name, "sha": bundle.sha,
        "queries": len(bundle.queries), "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(), "uint8_rounded": True, "rows": rows,
        "table": table, "bar_met": not fails, "fails": fails,
        "when": time.strftime("%Y-%m-%d %H:%M:%S")}, args.out)
    return 0 if not fails else 1


if __name__ == "__main__":
    raise SystemExit(main())
