"""Generator ablation: train UntargetedGAN variants on copies of a bundle and compare.

Each run copies the bundle (reusing its PrototypeNet), trains one generator with the given
GeneratorConfig overrides, and measures mAP@all and mean Hamming moved on the first N
queries at eps 8/255 and 16/255 (when inside the generator's range). The shipped bundle is
never modified.

    python benchmarks/generator_ablation.py --epochs 4 --num-train 5000 \\
        --run range '{}' --run fixed8 '{"eps_min": 0.0313725, "eps_max": 0.0313725}' \\
        --run own '{"anchor": "own"}' --run nod '{"weight_d": 0}' --run w32 '{"width": 32}'
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, print_table, write_json  # noqa: E402
from service.attacks.runner import attack_batch  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.evaluation import retrieval_figures  # noqa: E402
from service.store import load_bundle  # noqa: E402
from service.training.generator_trainer import GeneratorConfig, train_generator  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None)
    p.add_argument("--run", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    p.add_argument("--attack", default="untargeted_gan_plus")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-train", type=int, default=5000)
    p.add_argument("--num-queries", type=int, default=500)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    s = get_settings()
    src = s.model_store / (args.bundle or s.default_bundle)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in args.run:
            dst = Path(tmp) / name
            shutil.copytree(src, dst)
            kw = {"attack": args.attack, "epochs": args.epochs, "num_train": args.num_train,
                  **json.loads(overrides)}
            cfg = GeneratorConfig(**kw)
            t0 = time.perf_counter()
            train_generator(dst, cfg, device="cpu", progress=False)
            row = {"run": name, "config": kw, "train_s": time.perf_counter() - t0}
            b = load_bundle(dst)
            q, n = b.queries, args.num_queries
            db = b.gallery.codes(b.manifest.bits), b.gallery.labels
            for eps, tag in ((8 / 255, "8"), (16 / 255, "16")):
                if eps > cfg.eps_max + 1e-9:
                    continue
                r = attack_batch(b, cfg.attack, eps, q.images[:n], q.labels[:n])
                f = retrieval_figures(r.adv_codes, q.labels[:n], *db, curves=False)
                row[f"map_{tag}"], row[f"ham_{tag}"] = f["map_all"], float(r.hamming.mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, [("run", "run", ""), ("train_s", "train s", ".0f"),
                       ("map_8", "mAP@all 8/255", ".4f"), ("ham_8", "Hamming 8/255", ".2f"),
                       ("map_16", "mAP@all 16/255", ".4f"), ("ham_16", "Hamming 16/255", ".2f")])
    write_json("generator_ablation", {"machine": machine(), "bundle": src.name,
                                      "queries": args.num_queries, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
