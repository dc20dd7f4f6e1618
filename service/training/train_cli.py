"""``hashaudit train ...``: train hashers into frozen bundles (subcommands: ``commands.py``)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from service.clihelp import HelpFormatter
from service.clihelp import parser as new_parser
from service.config import get_settings
from service.errors import HashAuditError
from service.parsing import parse_eps
from service.precision import CHOICES
from service.training.bundle_builder import build_bundle, read_config
from service.training.commands import TRAIN_COMMANDS
from service.training.generator_trainer import GeneratorConfig, PrototypeConfig, train_generator
from service.training.hasher import HasherConfig
from service.training.patterns import PatternConfig

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None,
                   help="model store folder (default: $HASHAUDIT_MODEL_STORE or ./model_store)")
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda or cuda:N (default: $HASHAUDIT_DEVICE or auto)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save a checkpoint every epoch here and resume from it if present "
                        "(default: no checkpoints)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _precision(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    p.add_argument("--precision", choices=CHOICES, default=default, metavar="PRECISION",
                   help=f"{what}: auto (bf16 autocast + channels-last on CUDA, fp32 on CPU), "
                        "fp32 or bf16 (recorded in the bundle)")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("hashaudit train", "Train hashers, generators and poisoned models "
                        "into frozen bundles.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                                title="commands")

    def add(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=TRAIN_COMMANDS[name], description=TRAIN_COMMANDS[name],
                              formatter_class=HelpFormatter, prog=f"hashaudit train {name}")

    h = add("hasher")
    h.add_argument("--name", required=True, help="bundle name to write")
    h.add_argument("--data-kind", default="fashion_mnist",
                   help="fashion_mnist, fashion_mnist_mosaic, deephash_list or image_folder")
    h.add_argument("--data-option", action="append", default=[], metavar="KEY=JSON",
                   help="extra [data] option, e.g. root=\"/data/fmnist\" (repeatable)")
    h.add_argument("--num-query", type=int, default=1000, help="query split size")
    h.add_argument("--num-database", type=int, default=10000,
                   help="database (gallery) split size")
    h.add_argument("--num-train", type=int, default=5000, help="training split size")
    h.add_argument("--seed", type=int, default=0, help="split and training seed")
    defaults = HasherConfig()
    h.add_argument("--arch", default=defaults.arch,
                   help="small_cnn, resnet18, resnet50 or vgg11")
    h.add_argument("--arch-kwargs", type=json.loads, default={},
                   help="JSON object of backbone options, e.g. '{\"width\": 32}'")
    h.add_argument("--bits", type=int, default=defaults.bits, help="code length")
    h.add_argument("--loss", default=defaults.loss, help="dpsh or hashnet")
    h.add_argument("--loss-kwargs", type=json.loads, default={},
                   help="JSON object of loss options")
    h.add_argument("--cls-weight", type=float, default=defaults.cls_weight,
                   help="weight of the classification head's loss")
    h.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    h.add_argument("--batch-size", type=int, default=defaults.batch_size, help="batch size")
    h.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    h.add_argument("--no-augment", action="store_true",
                   help="no random shifts and flips while training")
    _precision(h, defaults.precision, "training precision")
    _common(h)

    b = add("bundle")
    b.add_argument("--config", type=Path, required=True, help="TOML config file")
    b.add_argument("--name", default=None,
                   help="override the bundle name (default: the config's name)")
    b.add_argument("--epochs", type=int, default=None,
                   help="override hasher epochs (default: the config's)")
    _precision(b, None, "override the training precision (default: the config's "
                        "[hasher] precision, else auto)")
    _common(b)

    g = add("generator")
    g.add_argument("--bundle", required=True, help="bundle name in the store, or a folder")
    g.add_argument("--attack", default="untargeted_gan_plus",
                   help="untargeted_gan (paper loss), untargeted_gan_plus, uaa_gan "
                        "(label-free UAA-GAN), targeted_gan (ProS-GAN style) or saliency_gan "
                        "(Grad-CAM difference term, for transfer)")
    g.add_argument("--eps", type=parse_eps, default=None,
                   help="train for this one eps, e.g. 8/255 (default: the range of "
                        "--eps-min..--eps-max)")
    g.add_argument("--eps-min", type=parse_eps, default=GeneratorConfig.eps_min,
                   help="smallest eps drawn while training")
    g.add_argument("--eps-max", type=parse_eps, default=GeneratorConfig.eps_max,
                   help="largest eps drawn while training")
    g.add_argument("--epochs", type=int, default=GeneratorConfig.epochs, help="training epochs")
    g.add_argument("--batch-size", type=int, default=GeneratorConfig.batch_size,
                   help="batch size")
    g.add_argument("--lr", type=float, default=GeneratorConfig.lr,
                   help="Adam learning rate (generator and discriminator)")
    g.add_argument("--width", type=int, default=GeneratorConfig.width,
                   help="generator channel width")
    g.add_argument("--num-train", type=int, default=GeneratorConfig.num_train,
                   help="training images drawn from the bundle's train split")
    g.add_argument("--weights", type=float, nargs=3, metavar=("A", "B", "C"), default=None,
                   help="loss weights a (hashing/metric), b (L2), c (discriminator) "
                        "(default: the attack's own)")
    g.add_argument("--cam-weight", type=float, default=GeneratorConfig.cam_weight,
                   help="saliency_gan: weight of the Grad-CAM difference term")
    g.add_argument("--margin", type=float, default=GeneratorConfig.margin,
                   help="uaa_gan: triplet margin on relaxed-code distance (0..4)")
    g.add_argument("--proto-steps", type=int, default=PrototypeConfig.steps,
                   help="PrototypeNet training steps (when the bundle has none yet)")
    g.add_argument("--seed", type=int, default=0, help="training seed")
    g.add_argument("--base", choices=["class_pattern", "universal_pattern"], default=None,
                   metavar="BASE",
                   help="class_pattern or universal_pattern: train as a residual on the "
                        "bundle's universal pattern (fitted first if missing; default: none, "
                        "universal_gan: always class_pattern)")
    g.add_argument("--val-num", type=int, default=GeneratorConfig.val_num,
                   help="validation images held out of the train split; the best epoch on "
                        "them is kept (0: no validation, keep the last epoch)")
    g.add_argument("--val-eps", type=parse_eps, nargs="+", default=None,
                   help="eps values validated at (default: 8/255 16/255)")
    g.add_argument("--patience", type=int, default=GeneratorConfig.patience,
                   help="stop after this many epochs without a better validation score "
                        "(0: never)")
    _precision(g, GeneratorConfig.precision, "training precision")
    _common(g)

    pt = add("patterns")
    pt.add_argument("--bundle", required=True, help="bundle name in the store, or a folder")
    pt.add_argument("--eps", type=parse_eps, nargs="+", default=None,
                    help="eps grid (default: 4/255 8/255 16/255 0.1)")
    pt.add_argument("--steps", type=int, default=PatternConfig.steps,
                    help="signed-gradient steps per eps")
    pt.add_argument("--per-class-batch", type=int, default=PatternConfig.per_class_batch,
                    help="images of each class per step")
    pt.add_argument("--num-train", type=int, default=None,
                    help="training images to fit on (default: all but the validation split)")
    pt.add_argument("--val-num", type=int, default=PatternConfig.val_num,
                    help="validation images held out of the train split (0: none)")
    pt.add_argument("--seed", type=int, default=0, help="fitting seed")
    _common(pt)

    gs = add("generators")
    gs.add_argument("--bundle", required=True, help="bundle name in the store, or a folder")
    gs.add_argument("--config", type=Path, required=True, help="TOML recipe")
    gs.add_argument("--only", nargs="+", default=None, metavar="ATTACK",
                    help="train only these generators of the recipe (default: all)")
    gs.add_argument("--skip-patterns", action="store_true",
                    help="keep the bundle's fitted patterns")
    _common(gs)

    bd = add("backdoor")
    bd.add_argument("--bundle", required=True, help="source bundle (surrogate and recipe)")
    bd.add_argument("--target", required=True, help="target class (index or name)")
    bd.add_argument("--poisons", type=int, default=40, help="poisoned training images")
    bd.add_argument("--patch", type=int, default=None, help="trigger side in pixels "
                    "(default: 10%% of the width, at least 3)")
    bd.add_argument("--num-train", type=int, default=None,
                    help="subset of the bundle's train split (default: all)")
    bd.add_argument("--epochs", type=int, default=None, help="default: the bundle's recipe")
    bd.add_argument("--name", default=None,
                    help="also write the poisoned bundle under this name (default: not saved)")
    bd.add_argument("--out", type=Path, default=Path("backdoor.json"),
                    help="where the result JSON goes")
    bd.add_argument("--seed", type=int, default=0, help="poisoning and training seed")
    _common(bd)
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
        precision=args.precision,
    )
    return {"name": args.name, "version": "1", "data": data, "hasher": hasher.to_dict()}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    import shlex
    import sys

    raw = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(raw)
    args.command_line = "hashaudit train " + shlex.join(raw)
    settings = get_settings()
    store = args.store or settings.model_store
    device = args.device or settings.device
    if args.cmd == "generator":
        return _generator(args, Path(store), device)
    if args.cmd == "backdoor":
        return _backdoor(args, Path(store))
    if args.cmd in ("patterns", "generators"):
        return _patterns_or_recipe(args, Path(store), device)
    try:
        if args.cmd == "bundle":
            cfg = read_config(args.config)
            if args.name:
                cfg["name"] = args.name
            if args.epochs is not None:
                cfg["hasher"]["epochs"] = args.epochs
            if args.precision is not None:
                cfg["hasher"]["precision"] = args.precision
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


def _backdoor(args: argparse.Namespace, store: Path) -> int:
    from service.parsing import label_vector
    from service.store import load_bundle
    from service.store.modelstore import check_bundle_name
    from service.training.backdoor import BackdoorConfig, run_backdoor, save_poisoned_bundle

    folder = Path(args.bundle)
    if not (folder / "manifest.json").is_file():
        folder = store / check_bundle_name(args.bundle, field="bundle")
    try:
        bundle = load_bundle(folder, "cpu")
        target = int(label_vector(args.target, bundle.manifest.class_names, "target").argmax())
        cfg = BackdoorConfig(target=target, poisons=args.poisons, patch=args.patch,
                             num_train=args.num_train, epochs=args.epochs, seed=args.seed)
        res = run_backdoor(bundle, cfg, progress=not args.no_progress)
        if args.name:
            save_poisoned_bundle(bundle, res, store, args.name)
    except HashAuditError as exc:
        print(f"error: {exc.message}")
        return 2
    report = {k: v for k, v in res.items() if k not in ("poisoned_hasher", "clean_hasher",
                                                        "trigger")}
    args.out.write_text(json.dumps(report, indent=1))
    p, c = res["poisoned"], res["clean"]
    print(f"target {res['target_name']}, {args.poisons} poisons, patch {res['patch_side']} px")
    print(f"clean mAP@all: poisoned model {p['clean_map']:.4f}, clean model {c['clean_map']:.4f}")
    print(f"t-MAP with trigger: poisoned model {p['t_map_triggered']:.4f}, clean model "
          f"{c['t_map_triggered']:.4f} (no trigger: {p['t_map_untriggered']:.4f})")
    if args.name:
        print(f"poisoned bundle written to {store / args.name} (manifest extra.poisoned)")
    print(f"wrote {args.out}")
    return 0


def _generator(args: argparse.Namespace, store: Path, device: str) -> int:
    from service.store.modelstore import check_bundle_name

    folder = Path(args.bundle)
    if not (folder / "manifest.json").is_file():
        folder = store / check_bundle_name(args.bundle, field="bundle")
    lo, hi = (args.eps, args.eps) if args.eps is not None else (args.eps_min, args.eps_max)
    a, b, c = args.weights if args.weights else (None, None, None)
    if args.proto_steps < 1:
        print(f"error: --proto-steps must be at least 1, got {args.proto_steps}")
        return 2
    try:
        cfg = GeneratorConfig(attack=args.attack, eps_min=lo, eps_max=hi, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, d_lr=args.lr,
                              width=args.width, num_train=args.num_train, seed=args.seed,
                              weight_t=a, weight_q=b, weight_d=c, margin=args.margin,
                              cam_weight=args.cam_weight, precision=args.precision,
                              prototype=PrototypeConfig(steps=args.proto_steps),
                              base=args.base, val_num=args.val_num, patience=args.patience,
                              **({"val_eps": args.val_eps} if args.val_eps else {}))
        entry = train_generator(folder, cfg, device=device, checkpoint_dir=args.checkpoint_dir,
                                progress=not args.no_progress)
    except HashAuditError as exc:
        print(f"error: {exc.message}")
        return 2
    last = entry["training"]["history"][-1]
    print(f"{entry['attack']} (eps {lo:.4f}..{hi:.4f}) written to {folder / entry['file']}; "
          f"last epoch: bits flipped {last['bits_flipped']:.3f}, "
          f"{'L_metric' if 'l_metric' in last else 'L_T'} "
          f"{last.get('l_metric', last.get('l_t', float('nan'))):.4f}")
    return 0


def _bundle_folder(name: str, store: Path) -> Path:
    from service.store.modelstore import check_bundle_name

    folder = Path(name)
    if not (folder / "manifest.json").is_file():
        folder = store / check_bundle_name(name, field="bundle")
    return folder


def _patterns_or_recipe(args: argparse.Namespace, store: Path, device: str) -> int:
    from service.training.patterns import fit_patterns
    from service.training.recipe import read_recipe, run_recipe

    try:
        folder = _bundle_folder(args.bundle, store)
        if args.cmd == "patterns":
            cfg = PatternConfig(**{k: v for k, v in (
                ("eps", args.eps), ("steps", args.steps),
                ("per_class_batch", args.per_class_batch), ("num_train", args.num_train),
                ("val_num", args.val_num), ("seed", args.seed)) if v is not None})
            records = [fit_patterns(folder, cfg, device=device, progress=not args.no_progress)]
            gens = []
        else:
            out = run_recipe(folder, read_recipe(args.config), device=device, only=args.only,
                             skip_patterns=args.skip_patterns, progress=not args.no_progress,
                             command=args.command_line)
            records = [out["patterns"]] if out["patterns"] else []
            gens = out["generators"]
    except HashAuditError as exc:
        print(f"error: {exc.message}")
        return 2
    for rec in records:
        v = rec["validation"]
        print(f"patterns (eps {', '.join(f'{e:.4f}' for e in rec['eps'])}) written to "
              f"{folder / rec['file']}; validation {v.get('metric')}: class_universal "
              f"{v.get('class_universal')}, universal {v.get('universal')}")
    for g in gens:
        val = g["training"].get("validation")
        best = "" if not val else (f"; best validation epoch {val['best_epoch']}: "
                                   f"{val['curve'][val['best_epoch']]['figures']}")
        print(f"{g['attack']} written to {folder / g['file']}{best}")
    return 0
