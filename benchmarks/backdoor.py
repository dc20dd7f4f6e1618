"""Backdoor benchmark: t-MAP of triggered queries vs the number of poisoned training images.

For one target class: a trigger is optimised on the default bundle's hasher, ``N`` target-class
training images get confusing perturbations plus the trigger (labels unchanged), a hasher is
trained from scratch with the bundle's recipe (on a subset of its train split and fewer epochs
unless told otherwise, to fit a CPU), and compared with a clean model trained the same way.

    python benchmarks/backdoor.py [--poisons 10 20 40 80] [--num-train 5000 --epochs 8]

Prints a table and writes ``benchmarks/results/backdoor.json`` and a plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine, print_table, write_json  # noqa: E402
from service.parsing import label_vector  # noqa: E402
from service.store import ModelStore  # noqa: E402
from service.training.backdoor import BackdoorConfig, run_backdoor  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="fmnist-dpsh-32")
    p.add_argument("--target", default="Bag")
    p.add_argument("--poisons", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--num-train", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--patch", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    bundle = ModelStore(REPO / "model_store", "cpu").get(args.bundle)
    target = int(label_vector(args.target, bundle.manifest.class_names, "target").argmax())
    rows: list[dict[str, Any]] = []
    clean_hasher = None
    for n in args.poisons:
        res = run_backdoor(bundle, BackdoorConfig(
            target=target, poisons=n, num_train=args.num_train, epochs=args.epochs,
            patch=args.patch), clean_baseline=clean_hasher)
        clean_hasher = res["clean_hasher"]  # one clean baseline for every row
        rows.append({"poisons": n, "patch": res["patch_side"],
                     "clean_map_poisoned": res["poisoned"]["clean_map"],
                     "clean_map_clean": res["clean"]["clean_map"],
                     "t_map_trigger_poisoned": res["poisoned"]["t_map_triggered"],
                     "t_map_trigger_clean": res["clean"]["t_map_triggered"],
                     "t_map_no_trigger_poisoned": res["poisoned"]["t_map_untriggered"]})
        print(rows[-1], flush=True)
    table = print_table(rows, [
        ("poisons", "poisons", "d"), ("patch", "patch px", "d"),
        ("clean_map_poisoned", "clean mAP (poisoned model)", ".4f"),
        ("clean_map_clean", "clean mAP (clean model)", ".4f"),
        ("t_map_trigger_poisoned", "t-MAP triggered (poisoned)", ".4f"),
        ("t_map_trigger_clean", "t-MAP triggered (clean)", ".4f"),
        ("t_map_no_trigger_poisoned", "t-MAP no trigger (poisoned)", ".4f")])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [r["poisons"] for r in rows]
    ax.plot(xs, [r["t_map_trigger_poisoned"] for r in rows], "o-", label="poisoned model")
    ax.plot(xs, [r["t_map_trigger_clean"] for r in rows], "k--", label="clean model")
    ax.set(xlabel="poisoned training images", ylabel="t-MAP (triggered queries)",
           title=f"backdoor, target {args.target}")
    ax.grid(alpha=0.3)
    ax.legend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "backdoor.png", dpi=110, bbox_inches="tight")
    write_json("backdoor", {"machine": machine(), "bundle": args.bundle, "target": args.target,
                            "num_train": args.num_train, "epochs": args.epochs, "rows": rows,
                            "table": table}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
