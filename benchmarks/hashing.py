"""Hashing benchmark: DPSH and HashNet at 32 and 64 bits on Fashion-MNIST.

Uses the default bundle's protocol (configs/default_bundle.toml: query / database / train
splits and the training recipe) and reports, per run: mAP@all, mAP@1000, P@r<=2, training
seconds per epoch and codes per second when encoding (batch 512, models loaded).

    python benchmarks/hashing.py [--epochs N] [--bits 32 64] [--losses dpsh hashnet]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, print_table, write_json  # noqa: E402
from service.data.sources import load_source, materialize  # noqa: E402
from service.data.splits import SplitSpec, make_splits  # noqa: E402
from service.evaluation import protocol_record, retrieval_figures  # noqa: E402
from service.training.bundle_builder import read_config  # noqa: E402
from service.training.hasher import HasherConfig, encode, train_hasher  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def codes_per_second(hasher, images: np.ndarray, batch: int = 512) -> float:
    encode(hasher, images[:batch])  # warm-up
    t = time.perf_counter()
    encode(hasher, images, batch_size=batch)
    return len(images) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "default_bundle.toml")
    p.add_argument("--epochs", type=int, default=None, help="default: the config's")
    p.add_argument("--bits", type=int, nargs="+", default=[32, 64])
    p.add_argument("--losses", nargs="+", default=["dpsh", "hashnet"])
    p.add_argument("--num-train", type=int, default=None, help="override the config's")
    p.add_argument("--num-database", type=int, default=None, help="override the config's")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cfg = read_config(args.config)
    data = cfg["data"]
    for key in ("num_train", "num_database"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    db_pool, q_pool = load_source(data)
    splits = make_splits(len(db_pool), len(q_pool), SplitSpec(
        num_query=data["num_query"], num_database=data["num_database"],
        num_train=data["num_train"], seed=data.get("seed", 0)))
    train = materialize(db_pool.subset(splits.train))
    db = materialize(db_pool.subset(splits.database))
    q = materialize(q_pool.subset(splits.query))

    rows = []
    for loss in args.losses:
        for bits in args.bits:
            hc = dict(cfg["hasher"], loss=loss, bits=bits)
            if loss != cfg["hasher"]["loss"]:
                hc["loss_kwargs"] = {}
            if args.epochs:
                hc["epochs"] = args.epochs
            hcfg = HasherConfig.from_dict(hc)
            print(f"training {loss} {bits} bits, {hcfg.epochs} epochs ...", flush=True)
            hasher, hist = train_hasher(hcfg, train, device="cpu", progress=False)
            fig = retrieval_figures(encode(hasher, q.images), q.labels,
                                    encode(hasher, db.images), db.labels, curves=False)
            row = {
                "loss": loss, "bits": bits, "epochs": hcfg.epochs,
                "map_all": fig["map_all"], "map_1000": fig["map_1000"], "p_r2": fig["p_r2"],
                "s_per_epoch": float(np.mean([h["seconds"] for h in hist])),
                "codes_per_s": codes_per_second(hasher, db.images),
            }
            rows.append(row)
            print(row, flush=True)
    print()
    print_table(rows, [("loss", "loss", ""), ("bits", "bits", "d"), ("epochs", "epochs", "d"),
                       ("map_all", "mAP@all", ".4f"), ("map_1000", "mAP@1000", ".4f"),
                       ("p_r2", "P@r<=2", ".4f"), ("s_per_epoch", "train s/epoch", ".1f"),
                       ("codes_per_s", "codes/s (batch 512)", ".0f")])
    write_json("hashing", {
        "machine": machine(), "protocol": protocol_record(), "splits": splits.to_record(),
        "config": cfg, "train_images": len(train), "database": len(db), "queries": len(q),
        "threads": torch.get_num_threads(), "rows": rows,
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
