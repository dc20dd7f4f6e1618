"""Paper-scale run, end to end: synthetic RGB multi-label scenes -> hasher bundle (stored by
reference) -> UntargetedGAN generators -> attack table (generator vs PGD-20 / DHTA).

One command does what a user auditing a 224 px retrieval system would do, with the project's
own code paths (the scene writer, the DeepHash list loader through the ``scenes`` source,
``build_bundle``, ``train_generator``, ``attack_batch``):

1. write the scene data set (JPEG, DeepHash lists) -- ``--size``, ``--database``, ``--query``;
2. train a hasher (``--arch``, ``--bits``, ``--loss``) and freeze a bundle that references the
   scenes instead of copying them; report the bundle's bytes per database image;
3. train the UntargetedGAN generator (PrototypeNet, decoder, generator, discriminator; at
   224 px with ``--gen-width 64`` these are the paper's shapes);
4. attack the queries with the generator, PGD-20 and DHTA-20 at each ``--eps`` and each
   ``--precision`` (fp32, bf16), scoring uint8-rounded images: mAP@all, mAP@1000, ms/image;
   and the share of equal bits between fp32 and bf16 codes of the clean queries.

Prints one table and writes JSON (``--out``). Every stage's time is recorded; a stage that
fails is recorded with its error and the later stages that do not depend on it still run.

    python benchmarks/paper_scale.py --device cuda --size 224 --database 20000 --query 1000 \
        --train 10000 --arch resnet50 --bits 64 --loss hashnet --gen-width 64
    python benchmarks/paper_scale.py --device cpu --size 64 --database 10000 --arch resnet18
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_device_arg, machine, pick_device, print_table  # noqa: E402
from service.parsing import parse_eps  # noqa: E402

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
METHODS = ("untargeted_gan", "pgd", "dhta")


def item_pools(log: dict[str, Any]) -> tuple[Any, Any]:
    """Fashion-MNIST train/test items for the scenes: the IDX files when installed, else the
    shipped default bundle's database (train items) and queries (test items)."""
    from service.data.base import ArrayImageSet
    from service.data.fashion_mnist import load_fashion_mnist
    from service.errors import DataNotFound

    try:
        pools = load_fashion_mnist(None, "train"), load_fashion_mnist(None, "test")
        log["item_source"] = "fashion-mnist IDX files"
        return pools
    except DataNotFound:
        from service.store.bundle import load_bundle

        repo = Path(__file__).resolve().parent.parent
        b = load_bundle(repo / "model_store" / "fmnist-dpsh-32", "cpu")
        names = b.manifest.class_names
        log["item_source"] = ("shipped bundle fmnist-dpsh-32: its 20,000 database images "
                              "(Fashion-MNIST train) and 1,000 queries (test)")
        return (ArrayImageSet(b.gallery.thumbnails, b.gallery.labels, names, "fmnist-train"),
                ArrayImageSet(b.queries.images, b.queries.labels, names, "fmnist-test"))


def save(report: dict[str, Any]) -> None:
    """Write the report so far (a run cut short keeps what it measured)."""
    path = Path(report["json"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


@contextlib.contextmanager
def stage(report: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Time a stage; record its error instead of raising (later stages decide)."""
    rec: dict[str, Any] = {}
    report["stages"][name] = rec
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        yield rec
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - a benchmark records the failure and goes on
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"   {name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']} s", flush=True)
    save(report)


def folder_bytes(folder: Path) -> dict[str, int]:
    """Sizes of a bundle's files, and what grows with the database: the gallery (packed
    codes, labels, ids) and its thumbnail atlas."""
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    per_db = sizes.get("gallery.safetensors", 0) + sizes.get("thumbnails.png", 0)
    return {"total": sum(sizes.values()), "database_part": per_db, "files": sizes}


@contextlib.contextmanager
def precision_scope(bundle: Any, name: str) -> Iterator[None]:
    """Run the attacks at ``name`` precision: attacks compute in their victim's precision."""
    bundle.hasher.set_precision(name)
    try:
        yield
    finally:
        bundle.hasher.set_precision("fp32")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from service.data.scenes import SceneParams, write_scene_dataset
    from service.store.bundle import load_bundle
    from service.training.bundle_builder import build_bundle

    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(device), "args": vars(args).copy(),
                              "stages": {}, "rows": [],
                              "json": str(args.json or out / "paper_scale.json")}
    report["args"]["out"] = str(out)
    scenes = out / "scenes"
    store = out / "store"
    name = f"scenes{args.size}-{args.arch}-{args.loss}-{args.bits}"

    with stage(report, "scenes") as rec:
        db_pool, q_pool = item_pools(rec)
        if not (scenes / "dataset.json").is_file():
            record = write_scene_dataset(
                scenes, db_pool, q_pool, database=args.database, train=args.train,
                query=args.query, seed=0, fmt="jpeg", params=SceneParams(size=args.size),
                workers=args.workers)
            rec["counts"] = record["counts"]
        rec["bytes_on_disk"] = sum(p.stat().st_size for p in scenes.rglob("*") if p.is_file())

    cfg = {
        "name": name,
        "data": {"kind": "scenes", "root": str(scenes.resolve()), "num_database": args.database,
                 "num_query": args.query, "num_train": args.train, "seed": 0},
        "hasher": {"arch": args.arch, "bits": args.bits, "loss": args.loss,
                   "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "cls_weight": args.cls_weight,
                   "precision": args.train_precision, **({"arch_kwargs": args.arch_kwargs}
                                                          if args.arch_kwargs else {})},
    }
    with stage(report, "hasher_bundle") as rec:
        manifest = build_bundle(cfg, store, device=device, progress=args.progress,
                                command="benchmarks/paper_scale.py")
        fig = manifest.evaluation["figures"]
        rec.update(clean_map_all=fig["map_all"], clean_map_1000=fig["map_1000"],
                   train_seconds=manifest.training["train_seconds"])
        sizes = folder_bytes(store / name)
        rec["bundle_bytes"] = sizes
        rec["bytes_per_database_image"] = round(sizes["database_part"] / args.database, 1)
        print(f"   clean mAP@all {fig['map_all']:.4f}, bundle {sizes['total']} bytes, of which "
              f"gallery + thumbnails {rec['bytes_per_database_image']} per database image",
              flush=True)

    with stage(report, "generator") as rec:
        from service.training.generator_trainer import (
            GeneratorConfig,
            PrototypeConfig,
            train_generator,
        )

        gcfg = GeneratorConfig(attack="untargeted_gan", epochs=args.gen_epochs,
                               batch_size=args.gen_batch_size, width=args.gen_width,
                               num_train=args.train, precision=args.train_precision,
                               prototype=PrototypeConfig(steps=args.proto_steps))
        entry = train_generator(store / name, gcfg, device=device, progress=args.progress)
        rec["entry"] = {k: v for k, v in entry.items() if k in ("file", "eps", "arch", "params")}

    with stage(report, "attacks") as rec:
        from service.attacks import ATTACKS
        from service.attacks.runner import attack_batch
        from service.evaluation import retrieval_figures
        from service.nets.hasher import encode_uint8, precision_agreement

        bundle = load_bundle(store / name, device)
        q = bundle.queries
        images, labels = q.images, q.labels
        db_codes, db_labels = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
        clean = retrieval_figures(encode_uint8(bundle.hasher, images), labels, db_codes,
                                  db_labels, curves=False)
        rec["clean"] = {"map_all": clean["map_all"], "map_1000": clean["map_1000"]}
        rec["fp32_bf16_agreement"] = precision_agreement(bundle.hasher, images)
        for precision in args.precision:
            for eps in args.eps:
                for method in METHODS:
                    cls = ATTACKS.get(method)
                    opts = {"steps": args.steps} if cls.iterative else {}
                    row: dict[str, Any] = {
                        "precision": precision, "eps_255": round(eps * 255, 2),
                        "method": method + (f"-{args.steps}" if cls.iterative else "")}
                    try:
                        with precision_scope(bundle, precision):
                            # warm-up on one batch (kernel selection, caches), not timed
                            warm = {"steps": min(2, args.steps)} if cls.iterative else {}
                            attack_batch(bundle, method, eps, images[:args.attack_batch],
                                         labels[:args.attack_batch], seed=0,
                                         batch_size=args.attack_batch, **warm)
                            res = attack_batch(bundle, method, eps, images, labels, seed=0,
                                               batch_size=args.attack_batch, **opts)
                        f = retrieval_figures(res.adv_codes, labels, db_codes, db_labels,
                                              curves=False)
                        linf = int(np.abs(res.adversarial.astype(int)
                                          - images.astype(int)).max())
                        row.update(map_all=f["map_all"], map_1000=f["map_1000"],
                                   ms_per_image=1000 * res.seconds / len(images),
                                   hamming=float(res.hamming.mean()), linf_255=linf,
                                   within_eps=linf <= round(eps * 255))
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {exc}"
                        traceback.print_exc()
                    report["rows"].append(row)
                    save(report)
                    print(f"   {precision} eps {row['eps_255']}/255 {row['method']:<16} "
                          f"mAP@all {row.get('map_all', float('nan')):.4f} "
                          f"{row.get('ms_per_image', float('nan')):.3f} ms/img", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="scene side in pixels")
    p.add_argument("--database", type=int, default=10000, help="database scenes")
    p.add_argument("--train", type=int, default=5000, help="hasher training scenes (subset)")
    p.add_argument("--query", type=int, default=1000, help="query scenes")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--arch-kwargs", type=json.loads, default=None)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--loss", default="hashnet")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cls-weight", type=float, default=1.0,
                   help="weight of the multi-label classification head's loss (0: pure "
                        "hashing loss)")
    p.add_argument("--gen-epochs", type=int, default=5)
    p.add_argument("--gen-batch-size", type=int, default=64)
    p.add_argument("--proto-steps", type=int, default=600, help="PrototypeNet steps")
    p.add_argument("--gen-width", type=int, default=16,
                   help="generator width (64 at 224 px: the paper's shapes)")
    p.add_argument("--eps", type=parse_eps, nargs="+", default=[8 / 255, 16 / 255])
    p.add_argument("--steps", type=int, default=20, help="PGD / DHTA iterations")
    p.add_argument("--attack-batch", type=int, default=128)
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="attack precisions to measure")
    p.add_argument("--train-precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="precision of hasher and generator training")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes writing scenes")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/paper_scale"))
    p.add_argument("--json", type=Path, default=None, help="default: OUT/paper_scale.json")
    p.add_argument("--progress", action="store_true")
    add_device_arg(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    report = run(args)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    st = report["stages"]
    bundle = st.get("hasher_bundle", {})
    print(f"\n{args.size} px RGB multi-label scenes, {args.database} database / {args.query} "
          f"queries, {args.arch} {args.loss} {args.bits} bits on {report['machine']['device']} "
          f"({report['machine']['device_name']}); clean mAP@all "
          f"{bundle.get('clean_map_all', float('nan')):.4f}; "
          f"{bundle.get('bytes_per_database_image', '-')} bundle bytes per database image "
          f"(gallery + thumbnails; {bundle.get('bundle_bytes', {}).get('total', '-')} bytes in "
          "all, with the hasher weights)")
    agree = st.get("attacks", {}).get("fp32_bf16_agreement")
    if agree:
        print(f"fp32 vs bf16 clean query codes: {100 * agree['bits']:.2f} % of bits equal, "
              f"{100 * agree['codes']:.1f} % of codes identical")
    report["table"] = print_table([r for r in report["rows"] if "error" not in r], [
        ("precision", "precision", ""), ("eps_255", "eps (x/255)", ".0f"),
        ("method", "method", ""), ("map_all", "mAP@all", ".4f"),
        ("map_1000", "mAP@1000", ".4f"), ("hamming", "mean Hamming", ".2f"),
        ("linf_255", "L-inf (x/255)", "d"), ("ms_per_image", "ms/image", ".3f")])
    print("stages: " + ", ".join(f"{k} {v['seconds']} s{'' if v['ok'] else ' FAILED'}"
                                 for k, v in st.items()) + f"; total {report['seconds']} s")
    save(report)
    print(f"wrote {report['json']}")
    failed = [k for k, v in st.items() if not v["ok"]] + \
        [r["method"] for r in report["rows"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    raise SystemExit(main())
