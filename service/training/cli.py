"""``hashaudit train ...``: train hashers into frozen bundles.

Subcommands:
    hasher   train a hasher from command-line options and freeze it into a bundle
    bundle   build a bundle from a TOML config file (see configs/default_bundle.toml)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from service.config import get_settings
from service.errors import HashAuditError
from service.training.bundle import build_bundle, read_config
from service.training.hasher import HasherConfig

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None,
                   help="model store folder (default: $HASHAUDIT_MODEL_STORE or ./model_store)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save a checkpoint every epoch here and resume from it if present")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hashaudit train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bundle", help="build a bundle from a TOML config")
    b.add_argument("--config", type=Path, required=True)
    b.add_argument("--name", default=None, help="override the bundle name")
    b.add_argument("--epochs", type=int, default=None, help="override hasher epochs")
    _common(b)

    h = sub.add_parser("hasher", help="train a hasher from options into a bundle")
    h.add_argument("--name", required=True, help="bundle name to write")
    h.add_argument("--data-kind", default="fashion_mnist",
                   help="fashion_mnist, fashion_mnist_mosaic, deephash_list or image_folder")
    h.add_argument("--data-option", action="append", default=[], metavar="KEY=JSON",
                   help="extra [data] option, e.g. root=\"/data/fmnist\" (repeatable)")
    h.add_argument("--num-query", type=int, default=1000)
    h.add_argument("--num-database", type=int, default=10000)
    h.add_argument("--num-train", type=int, default=5000)
    h.add_argument("--seed", type=int, default=0)
    defaults = HasherConfig()
    h.add_argument("--arch", default=defaults.arch)
    h.add_argument("--arch-kwargs", type=json.loads, default={}, help="JSON object")
    h.add_argument("--bits", type=int, default=defaults.bits)
    h.add_argument("--loss", default=defaults.loss, help="dpsh or hashnet")
    h.add_argument("--loss-kwargs", type=json.loads, default={}, help="JSON object")
    h.add_argument("--cls-weight", type=float, default=defaults.cls_weight)
    h.add_argument("--epochs", type=int, default=defaults.epochs)
    h.add_argument("--batch-size", type=int, default=defaults.batch_size)
    h.add_argument("--lr", type=float, default=defaults.lr)
    h.add_argument("--no-augment", action="store_true")
    _common(h)
    return parser


def _config_from_args(args: argparse.Namespace) -> dict:
    data = {"kind": args.data_kind, "num_query": args.num_query,
            "num_database": args.num_database, "num_train": args.num_train, "seed": args.seed}
    for item in args.data_option:
        key, _, value = item.partition("=")
        data[key] = json.loads(value)
    hasher = HasherConfig(
        arch=args.arch, arch_kwargs=args.arch_kwargs, bits=args.bits, loss=args.loss,
        loss_kwargs=args.loss_kwargs, cls_weight=args.cls_weight, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, augment=not args.no_augment, seed=args.seed,
    )
    return {"name": args.name, "version": "1", "data": data, "hasher": hasher.to_dict()}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    args = build_parser().parse_args(argv)
    settings = get_settings()
    store = args.store or settings.model_store
    device = args.device or settings.device
    try:
        if args.cmd == "bundle":
            cfg = read_config(args.config)
            if args.name:
                cfg["name"] = args.name
            if args.epochs is not None:
                cfg["hasher"]["epochs"] = args.epochs
        else:
            cfg = _config_from_args(args)
        manifest = build_bundle(cfg, Path(store), device=device,
                                checkpoint_dir=args.checkpoint_dir,
                                progress=not args.no_progress)
    except HashAuditError as exc:
        log.error("%s", exc.message)
        print(f"error: {exc.message}")
        return 2
    f = manifest.evaluation["figures"]
    print(f"bundle {manifest.name} written to {Path(store) / manifest.name}")
    print(f"clean mAP@all {f['map_all']:.4f}  mAP@1000 {f['map_1000']:.4f}  "
          f"P@r2 {f['p_r2']:.4f}  ({f['num_queries']} queries, {f['num_database']} database)")
    return 0
