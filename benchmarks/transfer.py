"""Transfer matrix: adversarial queries made against a surrogate hasher, evaluated on other
hashers (black-box transfer). Rows: surrogate x attack x eps; columns: target hashers; cells:
mAP@all of the target on the adversarial queries (clean row first). Lower off-diagonal =
better transfer.

    python benchmarks/transfer.py --prepare     # trains what is missing into benchmarks/.store

``--prepare`` copies the default bundle into ``benchmarks/.store``, trains ``saliency_gan``
(UntargetedGAN+ networks with the Grad-CAM difference term) into the copy, and trains two more
hashers (HashNet 32 bits, DPSH 64 bits with a narrower CNN) on the same data. The copy's
``untargeted_gan_plus`` is the same generator without the saliency term: the comparison the
saliency paper makes. Prints a table and writes ``benchmarks/results/transfer.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_device_arg, machine, pick_device, print_table, write_json  # noqa: E402, E501
from service.attacks.runner import attack_batch  # noqa: E402
from service.nets.hasher import encode_uint8  # noqa: E402
from service.parsing import parse_eps  # noqa: E402
from service.retrieval.metrics import map_at_k  # noqa: E402
from service.store import ModelStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STORE = Path(__file__).resolve().parent / ".store"
TARGETS = {
    "fmnist-hashnet-32": ["--loss", "hashnet", "--bits", "32"],
    "fmnist-dpsh-64-w16": ["--loss", "dpsh", "--bits", "64", "--arch-kwargs", '{"width": 16}'],
}


def prepare(store: Path, surrogate: str) -> None:
    """Train whatever the benchmark needs and is missing (minutes on a CPU)."""
    from service.training.train_cli import main as train

    store.mkdir(parents=True, exist_ok=True)
    if not (store / surrogate).is_dir():
        shutil.copytree(REPO / "model_store" / surrogate, store / surrogate)
    names = {g["attack"] for g in ModelStore(store).get(surrogate).manifest.generators}
    if "saliency_gan" not in names:
        assert train(["generator", "--bundle", str(store / surrogate), "--attack",
                      "saliency_gan", "--epochs", "8", "--no-progress"]) == 0
    for name, args in TARGETS.items():
        if not (store / name).is_dir():
            assert train(["hasher", "--name", name, *args, "--num-train", "10000",
                          "--num-database", "10000", "--num-query", "1000", "--epochs", "10",
                          "--no-progress", "--store", str(store)]) == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=STORE)
    p.add_argument("--surrogate", default="fmnist-dpsh-32")
    p.add_argument("--targets", nargs="+", default=None, help="default: every bundle in store")
    p.add_argument("--methods", nargs="+", default=["pgd", "untargeted_gan_plus",
                                                    "saliency_gan"])
    p.add_argument("--eps", type=parse_eps, nargs="+", default=[8 / 255, 16 / 255])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--prepare", action="store_true", help="train what is missing first")
    p.add_argument("--out", type=Path, default=None)
    add_device_arg(p)
    args = p.parse_args()
    if args.prepare:
        prepare(args.store, args.surrogate)
    dev = pick_device(args.device)
    models = ModelStore(args.store, dev)
    sur = models.get(args.surrogate)
    names = args.targets or models.names()
    targets = {n: models.get(n) for n in names}
    q = sur.queries
    images, labels = q.images[:args.count], q.labels[:args.count]

    def target_map(bundle: Any, imgs: Any) -> float:
        codes = encode_uint8(bundle.hasher, imgs)
        return map_at_k(codes, bundle.gallery.codes(bundle.manifest.bits), labels,
                        bundle.gallery.labels, None)

    rows = [{"row": "clean", **{n: target_map(b, images) for n, b in targets.items()}}]
    for method in args.methods:
        for eps in args.eps:
            t0 = time.perf_counter()
            res = attack_batch(sur, method, eps, images, labels, batch_size=100)
            row = {"row": f"{args.surrogate} / {method} / {round(eps * 255)}/255",
                   "method": method, "eps": eps, "attack_s": time.perf_counter() - t0}
            row.update({n: target_map(b, res.adversarial) for n, b in targets.items()})
            rows.append(row)
            print(row, flush=True)
    cols = [("row", "surrogate / attack / eps", "")] + [(n, n, ".4f") for n in targets]
    table = print_table(rows, cols)
    write_json("transfer", {"machine": machine(dev), "surrogate": args.surrogate,
                            "targets": {n: {"bits": b.manifest.bits, "loss": b.manifest.hasher[
                                "family"], "arch": b.manifest.hasher["arch"],
                                "kwargs": b.manifest.hasher.get("arch_kwargs")}
                                for n, b in targets.items()},
                            "queries": len(images), "rows": rows, "table": table}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
