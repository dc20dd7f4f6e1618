"""The ``hashaudit`` command: one subcommand per task (``hashaudit --help`` lists them).

Every subcommand is a ``cmd_*(argv)`` function over its own argparse parser (``*_parser()``);
``main(argv)`` dispatches on the first word. Options' help ends with their defaults
(``service.clihelp.HelpFormatter``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from service import __version__
from service.clihelp import HelpFormatter
from service.clihelp import parser as new_parser
from service.config import get_settings
from service.errors import HashAuditError

SCALARS = ("map_all", "map_1000", "p_r2")

SUMMARIES = {
    "eval": "recompute a bundle's clean retrieval figures and compare them with the record",
    "bundles": "list the bundles in the model store",
    "attack": "attack image files with one method; writes the adversarial PNGs and a JSON",
    "serve": "run the REST API (docs at /docs and /redoc)",
    "worker": "run audit chunks from the Redis queue ($HASHAUDIT_REDIS_URL)",
    "index": "encode a database (DeepHash list or image folder) into an imported bundle's "
             "gallery",
}
IMPORT_COMMANDS = {
    "deephash": "a bundle from a DeepHash-pytorch checkpoint (AlexNet, VGG, ResNet hash nets; "
                "also DHTA, CIBA, ProS-GAN, THA)",
    "torchvision": "a bundle from a torchvision backbone with a linear hash layer",
}
DATA_COMMANDS = {
    "scenes": "make synthetic multi-label RGB scenes of Fashion-MNIST items as DeepHash lists",
}


def _open_bundle(ref: str, store: Path | None, device: str, precision: str = "fp32"):
    from service.store import ModelStore, load_bundle

    p = Path(ref)
    if p.is_dir() and (p / "manifest.json").is_file():
        bundle = load_bundle(p, device)
        bundle.hasher.set_precision(precision)
        return bundle
    return ModelStore(store or get_settings().model_store, device, precision).get(ref)


def _store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None,
                   help="model store folder (default: $HASHAUDIT_MODEL_STORE or ./model_store)")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda or cuda:N (default: $HASHAUDIT_DEVICE or auto)")


def _precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default=None,
                   help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16 "
                        "(default: $HASHAUDIT_PRECISION or auto)")


def _bundle_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=None,
                   help="bundle name in the store (default: $HASHAUDIT_DEFAULT_BUNDLE)")


def eval_parser() -> argparse.ArgumentParser:
    p = new_parser("hashaudit eval", SUMMARIES["eval"])
    p.add_argument("bundle", help="bundle name in the store, or a bundle folder")
    _store_option(p)
    _device_option(p)
    p.add_argument("--json", type=Path, default=None,
                   help="also write the result here as JSON (default: print only)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="allowed |recomputed - recorded|; 0 means exact")
    return p


def cmd_eval(argv: list[str]) -> int:
    from service.device import resolve_device
    from service.evaluation import evaluate_bundle

    args = eval_parser().parse_args(argv)
    device = str(resolve_device(args.device or get_settings().device))
    bundle = _open_bundle(args.bundle, args.store, device)
    res = evaluate_bundle(bundle, device=device)
    fig, rec = res["figures"], res["recorded"]
    print(f"bundle {bundle.name} v{bundle.manifest.version} sha {bundle.sha[:12]}  "
          f"({fig['num_queries']} queries, {fig['num_database']} database, {fig['bits']} bits)")
    print(f"{'figure':<10} {'recorded':>10} {'recomputed':>11} {'diff':>10}")
    ok = True
    for k in SCALARS:
        r = rec.get(k)
        diff = None if r is None else fig[k] - r
        ok = ok and diff is not None and abs(diff) <= args.tolerance
        rs = "-" if r is None else f"{r:.6f}"
        ds = "-" if diff is None else f"{diff:+.1e}"
        print(f"{k:<10} {rs:>10} {fig[k]:>11.6f} {ds:>10}")
    if res["gallery_codes_match"] is not None:
        same = "identical" if res["gallery_codes_match"] else "DIFFER"
        print(f"gallery codes re-encoded: {same}")
        ok = ok and res["gallery_codes_match"]
    if args.json:
        args.json.write_text(json.dumps({**res, "bundle": bundle.name, "sha": bundle.sha,
                                         "reproduced": ok}, indent=2))
    print("reproduced" if ok else "NOT reproduced")
    return 0 if ok else 1


def bundles_parser() -> argparse.ArgumentParser:
    p = new_parser("hashaudit bundles", SUMMARIES["bundles"])
    _store_option(p)
    return p


def cmd_bundles(argv: list[str]) -> int:
    from service.store import ModelStore

    args = bundles_parser().parse_args(argv)
    store = ModelStore(args.store or get_settings().model_store)
    for name in store.names():
        print(name)
    return 0


def cmd_train(argv: list[str]) -> int:
    from service.training.train_cli import main as train_main

    return train_main(argv)


def attack_parser() -> argparse.ArgumentParser:
    from service.attacks import ATTACKS
    from service.parsing import parse_eps

    p = new_parser(
        "hashaudit attack",
        f"{SUMMARIES['attack']} (attack.json) to --out. Images are converted to the "
        "bundle's channels and resized (bilinear) to its input size.")
    p.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files")
    _bundle_option(p)
    _store_option(p)
    p.add_argument("--method", required=True, help=", ".join(ATTACKS.names()))
    p.add_argument("--eps", type=parse_eps, default="8/255",
                   help="L-inf budget: a fraction like 8/255 or a number like 0.0314")
    p.add_argument("--labels", default=None,
                   help="query labels for every image: class indices or names, comma "
                        "separated (default: none, for label-free methods)")
    p.add_argument("--target", default=None,
                   help="target label(s) for targeted methods (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of random starts")
    _device_option(p)
    _precision_option(p)
    p.add_argument("--out", type=Path, default=Path("attack_out"), help="output folder")
    return p


def cmd_attack(argv: list[str]) -> int:
    import numpy as np
    from PIL import Image

    from service.attacks.runner import attack_batch
    from service.data.base import decode_image
    from service.data.preprocess import InputTransform
    from service.device import resolve_device
    from service.parsing import label_vector

    args = attack_parser().parse_args(argv)
    device = str(resolve_device(args.device or get_settings().device))
    bundle = _open_bundle(args.bundle or get_settings().default_bundle, args.store, device,
                          args.precision or get_settings().precision)
    m = bundle.manifest
    inp = m.input
    resize = InputTransform.from_input(inp).resize
    imgs = np.stack([decode_image(f, inp["channels"], (inp["height"], inp["width"]), resize)
                     for f in args.images])
    names = m.class_names
    labels = target = None
    if args.labels:
        labels = np.stack([label_vector(args.labels, names, "labels")] * len(imgs))
    if args.target:
        target = np.stack([label_vector(args.target, names, "target")] * len(imgs))
    res = attack_batch(bundle, args.method, args.eps, imgs, labels, target, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for f, adv, info in zip(args.images, res.adversarial, res.to_json(), strict=True):
        out = args.out / f"{f.stem}_adv.png"
        Image.fromarray(adv[0] if adv.shape[0] == 1 else adv.transpose(1, 2, 0)).save(out)
        rows.append({"input": str(f), "output": str(out), **info})
        print(f"{f.name}: hamming {info['hamming']}/{m.bits}, L-inf {info['linf_levels']}/255 "
              f"-> {out}")
    (args.out / "attack.json").write_text(json.dumps({
        "bundle": bundle.name, "sha": bundle.sha, "method": args.method, "eps": args.eps,
        "seed": args.seed, "bits": m.bits, "attack_seconds": res.seconds,
        "device": device, "precision": bundle.hasher.precision, "images": rows,
    }, indent=2))
    print(f"wrote {args.out / 'attack.json'}")
    return 0


def serve_parser() -> argparse.ArgumentParser:
    settings = get_settings()
    p = new_parser(
        "hashaudit serve",
        "Serve the bundles of the model store over HTTP. Swagger UI at /docs and ReDoc at "
        "/redoc work without internet access. Every HASHAUDIT_* setting applies (see "
        "README).")
    p.add_argument("--host", default=settings.host,
                   help="address to listen on ($HASHAUDIT_HOST)")
    p.add_argument("--port", type=int, default=settings.port,
                   help="port to listen on ($HASHAUDIT_PORT)")
    p.add_argument("--workers", type=int, default=settings.workers,
                   help="server processes on this port, each with its own bundles and "
                        "micro-batcher; more than 1 needs HASHAUDIT_REDIS_URL "
                        "($HASHAUDIT_WORKERS)")
    p.add_argument("--log-level", default="info",
                   help="uvicorn log level: critical, error, warning, info, debug or trace")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not log every request (saves CPU under heavy load)")
    return p


def cmd_serve(argv: list[str]) -> int:
    """Run the REST API with uvicorn: one process, or ``--workers N`` processes on one port
    (service.api.workers). SIGTERM drains requests in flight for at most
    HASHAUDIT_SHUTDOWN_DRAIN_S, then exits."""
    settings = get_settings()
    args = serve_parser().parse_args(argv)
    from service.api.workers import check_workers

    check_workers(settings, args.workers)
    settings = settings.model_copy(update={"workers": args.workers})
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"HashAudit {__version__}: serving {settings.model_store} "
          f"(default bundle {settings.default_bundle}, {args.workers} "
          f"process{'es' if args.workers > 1 else ''})\n"
          f"  Swagger UI: http://{shown}:{args.port}/docs (ReDoc: /redoc)\n"
          f"  ready when: http://{shown}:{args.port}/health/ready answers 200", flush=True)
    if args.workers > 1:
        from service.api.workers import serve_workers

        return serve_workers(settings, args.workers, args.host, args.port, args.log_level,
                             not args.no_access_log)
    from service.api import create_app
    from service.api.shutdown import serve
    from service.api.workers import set_torch_threads

    logging.getLogger("service.api").info("torch uses %d CPU thread(s)",
                                          set_torch_threads(settings, 1))
    app = create_app(settings)
    serve(app, args.host, args.port, settings.shutdown_drain_s, log_level=args.log_level,
          access_log=not args.no_access_log)
    return 0


def worker_parser() -> argparse.ArgumentParser:
    p = new_parser(
        "hashaudit worker",
        "Work the audit queue in Redis ($HASHAUDIT_REDIS_URL). Loads every bundle of the "
        "store first; run one worker per GPU.")
    p.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    p.add_argument("--name", default=None, help="worker name (default: host + pid)")
    return p


def cmd_worker(argv: list[str]) -> int:
    """Run audit chunks from Redis (RQ), with every bundle loaded first."""
    args = worker_parser().parse_args(argv)
    from service.jobs.worker import run_worker

    run_worker(get_settings(), burst=args.burst, name=args.name)
    return 0


def audit_commands() -> dict[str, str]:
    """``hashaudit audit`` actions: one per registered audit type (``HASHAUDIT_PLUGINS``
    included), with its one-line summary."""
    from service.jobs.audit_types import audit_types, load_plugins

    load_plugins(get_settings().plugin_list)
    return {t.cli_action: t.cli_help for t in audit_types()}


def audit_parser() -> argparse.ArgumentParser:
    """``hashaudit audit <action>``, one action per audit type: the type adds its options (with
    the defaults ``POST /audit`` applies), the rest are common."""
    from service.jobs.audit_types import audit_types

    p = new_parser("hashaudit audit", "Run a robustness audit in this process (the workers' "
                   "task code) and write report.json and report.html.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    for kind in audit_types():
        a = sub.add_parser(kind.cli_action, help=kind.cli_help, description=kind.cli_help,
                           formatter_class=HelpFormatter, prog=f"hashaudit audit {kind.cli_action}")
        _bundle_option(a)
        _store_option(a)
        kind.add_cli_options(a)
        _device_option(a)
        _precision_option(a)
        a.add_argument("--out", type=Path, default=Path(kind.cli_out),
                       help="folder for report.json and report.html")
        a.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cmd_audit(argv: list[str]) -> int:
    """``hashaudit audit <action>``: an audit in this process, with the workers' task code."""
    from tqdm import tqdm

    from service.device import resolve_device
    from service.jobs.audit_types import audit_types, load_plugins
    from service.jobs.queue import run_local_audit
    from service.jobs.report import render_html
    from service.jobs.spec import normalize_spec
    from service.serving import BundleService
    from service.store import ModelStore

    s = get_settings()
    load_plugins(s.plugin_list)
    args = audit_parser().parse_args(argv)
    kind = next(t for t in audit_types() if t.cli_action == args.action)
    store = ModelStore(args.store or s.model_store, str(resolve_device(args.device or s.device)),
                       args.precision or s.precision)
    svc = BundleService(store.get(args.bundle or s.default_bundle))
    spec = normalize_spec(svc, kind.cli_request(args), max_queries=s.max_audit_queries,
                          lookup=store.get)
    total, unit = kind.cli_total(spec)
    # a type that writes files (the backdoor audit's poisoned bundles) offers --artifacts
    artifact_dir = getattr(args, "artifacts", None) or s.artifact_dir
    with tqdm(total=total, unit=unit, disable=args.no_progress, desc="audit") as bar:
        queue, audit_id = run_local_audit(store, spec, s.max_pixels, progress=bar.update,
                                          artifact_dir=artifact_dir)
    status = queue.status(audit_id)
    if status["state"] != "done":
        print(f"error: audit {status['state']}: {status['error']}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(status["result"], indent=1))
    (args.out / "report.html").write_text(render_html(status))
    for line in kind.cli_summary(status["result"]):
        print(line)
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.html'}")
    return 0


def data_parser() -> argparse.ArgumentParser:
    """``data scenes``: write a synthetic data set in the DeepHash-pytorch list layout."""
    from service.data.scenes import IMAGE_FORMATS, SceneParams

    d = SceneParams()
    p = new_parser("hashaudit data", "Make data sets on disk, in the layouts users bring.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    s = sub.add_parser(
        "scenes", formatter_class=HelpFormatter, prog="hashaudit data scenes",
        help=DATA_COMMANDS["scenes"],
        description="Render RGB scenes of 1-4 tinted Fashion-MNIST items on random "
                    "backgrounds (label = union of the items' classes) and write them with "
                    "DeepHash-pytorch lists: database.txt, train.txt (a subset of the "
                    "database), test.txt (queries), layout.jsonl and dataset.json. Database "
                    "scenes use Fashion-MNIST train items, queries test items.")
    s.add_argument("--out", type=Path, required=True, help="new or empty output folder")
    s.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    s.add_argument("--database", type=int, default=10000, help="database scenes")
    s.add_argument("--train", type=int, default=5000,
                   help="training list size, a seeded subset of the database")
    s.add_argument("--query", type=int, default=1000, help="query scenes (test.txt)")
    s.add_argument("--seed", type=int, default=0, help="seed; same seed and options give "
                   "byte-identical files")
    s.add_argument("--format", choices=list(IMAGE_FORMATS), default="png", metavar="FORMAT",
                   help="png (lossless) or jpeg (quality 95, as photo sets ship)")
    s.add_argument("--min-items", type=int, default=d.min_items, help="fewest items per scene")
    s.add_argument("--max-items", type=int, default=d.max_items, help="most items per scene")
    s.add_argument("--root", type=Path, default=None,
                   help="Fashion-MNIST folder (default: $HASHAUDIT_FMNIST_DIR or "
                        "/usr/share/datasets/fashion-mnist)")
    s.add_argument("--workers", type=int, default=1,
                   help="processes drawing and encoding images; the files do not depend on it")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _index_options(p: argparse.ArgumentParser, required: bool) -> None:
    """Options of ``hashaudit index`` (also offered by ``import``, which then indexes)."""
    import os

    from service.importers.index import IndexSpec

    d = IndexSpec(database=Path("."))
    g = p.add_argument_group("index" if required else
                             "index now (optional; the same as `hashaudit index` next)")
    g.add_argument("--database", type=Path, required=required, default=None,
                   help="database: a DeepHash-pytorch list file ('path l1 ... lC' per line) "
                        "or an image folder with one sub-folder per class" +
                        ("" if required else " (default: none, index later)"))
    g.add_argument("--root", type=Path, default=None,
                   help="folder the list's image paths are relative to (required with a list; "
                        "default: none)")
    g.add_argument("--query", type=Path, default=None,
                   help="queries, as --database (default: none; then the bundle has no "
                        "query split and no clean figures, and audits need uploaded queries)")
    g.add_argument("--class-names", default=None,
                   help="class names, comma separated, one per label column (default: "
                        "class_0, class_1, ...; an image folder's are its sub-folders)")
    g.add_argument("--num-query", type=int, default=None,
                   help="use a seeded sample of this many queries (default: all)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the query sample and of "
                   "the sample that checks --codes")
    g.add_argument("--codes", type=Path, default=None,
                   help="precomputed database codes, .npy (DeepHash-pytorch's "
                        "trn_binary.npy), checked on a sample (default: encode here)")
    g.add_argument("--labels", type=Path, default=None,
                   help="the labels saved beside --codes, .npy (DeepHash-pytorch's "
                        "trn_label.npy), compared with the list's (default: not compared)")
    g.add_argument("--check-sample", type=int, default=d.check_sample,
                   help="database images re-encoded to check --codes")
    g.add_argument("--bit-tolerance", type=int, default=d.bit_tolerance,
                   help="a sampled code may differ from --codes in this many bits")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per forward pass")
    g.add_argument("--chunk", type=int, default=d.chunk,
                   help="images per resumable chunk of work")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image decoding threads")
    g.add_argument("--work", type=Path, default=None,
                   help="work folder for finished chunks; a rerun resumes from it (default: "
                        ".index-<name> beside the bundle)")


def _index_spec(args: argparse.Namespace) -> Any:
    from service.importers.index import IndexSpec

    names = None if args.class_names is None else [
        c.strip() for c in args.class_names.split(",") if c.strip()]
    return IndexSpec(database=args.database, root=args.root, query=args.query,
                     class_names=names, num_query=args.num_query, seed=args.seed,
                     codes=args.codes, labels=args.labels, check_sample=args.check_sample,
                     bit_tolerance=args.bit_tolerance, batch_size=args.batch_size,
                     chunk=args.chunk, workers=args.workers, work=args.work)


def _run_index(folder: Path, args: argparse.Namespace, command: str) -> int:
    from tqdm import tqdm

    from service.device import resolve_device
    from service.importers.index import index_bundle

    device = str(resolve_device(args.device or get_settings().device))
    with tqdm(unit="img", disable=args.no_progress, desc="index") as bar:
        def total(n: int) -> None:
            bar.total = n
            bar.refresh()

        m = index_bundle(folder, _index_spec(args), device, progress=bar.update, total=total,
                         command=command)
    sizes, fig = m.dataset["sizes"], m.evaluation.get("figures") or {}
    print(f"indexed {m.name} on {device}: {sizes['database']} database images, "
          f"{sizes['query']} queries, {len(m.dataset['class_names'])} classes")
    if fig:
        print(f"clean mAP@all {fig['map_all']:.4f}, mAP@1000 {fig['map_1000']:.4f}, "
              f"P@r<=2 {fig['p_r2']:.4f}")
    print(f"bundle {folder}: serve it (hashaudit serve), audit it (hashaudit audit run "
          f"--bundle {m.name}), train generators (hashaudit train generator --bundle {m.name})")
    return 0


def import_parser() -> argparse.ArgumentParser:
    """``import deephash`` / ``import torchvision``: a bundle from a checkpoint."""
    from service.importers.layouts import DEEPHASH_EVAL

    p = new_parser("hashaudit import", "Make a bundle from a checkpoint trained elsewhere. The "
                   "checkpoint is read with torch.load(weights_only=True) or safetensors, "
                   "never unpickled in full; index it next (hashaudit index) or at once with "
                   "--database.")
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT", title="formats")
    for fmt, line in IMPORT_COMMANDS.items():
        s = sub.add_parser(fmt, help=line, description=line, formatter_class=HelpFormatter,
                           prog=f"hashaudit import {fmt}")
        if fmt == "deephash":
            s.add_argument("--arch", required=True,
                           help="AlexNet, ResNet18/34/50/101/152, VGG11/13/16/19 (VGG16BN "
                                "for batch norm)")
            s.add_argument("--checkpoint", type=Path, required=True,
                           help="the saved state dict (torch.save(net.state_dict()), e.g. "
                                "DeepHash-pytorch's model.pt; or .safetensors)")
        else:
            s.add_argument("--arch", required=True,
                           help="torchvision model: resnet18 ... resnet152, alexnet, vgg11 ... "
                                "vgg19, vgg16_bn ...")
            s.add_argument("--weights", type=Path, required=True,
                           help="the state dict: .safetensors or a torch.save file")
            s.add_argument("--hash-layer", default=None,
                           help="module path of the linear hash layer in the state dict "
                                "(default: the classifier's last layer, fc or classifier.6)")
        s.add_argument("--name", required=True, help="bundle name to write")
        s.add_argument("--bits", type=int, default=None,
                       help="expected code length (default: read from the hash layer)")
        s.add_argument("--state-key", default=None,
                       help="entry of a wrapped checkpoint holding the state dict (default: "
                            "the file itself, else its state_dict/model/net entry)")
        s.add_argument("--resize", type=int, default=None,
                       help=f"resize before the centre crop (default: upstream's "
                            f"{DEEPHASH_EVAL['resize']}, or the crop size when --crop is "
                            "given)")
        s.add_argument("--crop", type=int, default=None,
                       help=f"model input side (default: upstream's {DEEPHASH_EVAL['crop']})")
        s.add_argument("--resize-mode", choices=["shorter", "stretch"], default=None,
                       metavar="MODE",
                       help="shorter: the shorter side becomes --resize (torchvision "
                            "Resize(int)); stretch: the image becomes --resize x --resize "
                            "(default: as the matched upstream code evaluates)")
        s.add_argument("--interpolation", choices=["bilinear", "bicubic"], default=None,
                       metavar="FILTER",
                       help="bilinear or bicubic resize filter (default: as the matched "
                            "upstream code)")
        s.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="normalisation mean (default: ImageNet's, 0.485 0.456 0.406)")
        s.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                       help="normalisation std (default: ImageNet's, 0.229 0.224 0.225)")
        s.add_argument("--version", default="1", help="the bundle's own version string")
        _store_option(s)
        _device_option(s)
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        _index_options(s, required=False)
    return p


def cmd_import(argv: list[str]) -> int:
    """``hashaudit import deephash|torchvision``: write the bundle, then index it if asked."""
    from service.importers.importer import ImportSpec, import_checkpoint

    args = import_parser().parse_args(argv)
    ckpt = args.checkpoint if args.format == "deephash" else args.weights
    spec = ImportSpec(args.format, args.arch, args.name, bits=args.bits,
                      hash_layer=getattr(args, "hash_layer", None), state_key=args.state_key,
                      resize=args.resize, crop=args.crop, interpolation=args.interpolation,
                      resize_mode=args.resize_mode, mean=args.mean, std=args.std,
                      version=args.version)
    store = args.store or get_settings().model_store
    command = " ".join(["hashaudit", "import", *argv])
    m = import_checkpoint(spec, ckpt, store, command=command)
    prov, t = m.extra["provenance"], m.input["transform"]
    src = prov["upstream"][0]
    print(f"imported {prov['checkpoint']['file']} as {m.name}: {prov['layout']} "
          f"({src['repository']} {src['commit'][:8]} {src['path']} {src['symbol']}), "
          f"{prov['torchvision_model']}, {m.bits} bits")
    resize = t.get("resize_square") or t.get("resize_shorter")
    print(f"input: {t.get('resize_mode', 'shorter')} resize to {resize}, "
          f"{t['interpolation']}, centre crop {t['crop'][0]}x{t['crop'][1]}, mean "
          f"{m.input['mean']}, std {m.input['std']}")
    if args.database is None:
        print(f"next: hashaudit index {m.name} --database LIST --root DIR [--query LIST]")
        return 0
    return _run_index(Path(store) / m.name, args, command)


def index_parser() -> argparse.ArgumentParser:
    p = new_parser("hashaudit index", "Encode a database into an imported bundle's gallery "
                   "(batched, on the GPU when there is one, resumable: rerun the same command "
                   "after an interruption), or take precomputed .npy codes after checking a "
                   "sample of them. The bundle then reads its images through your list or "
                   "folder (dataset.reference) and keeps 64 px thumbnails.")
    p.add_argument("bundle", help="bundle name in the store, or a bundle folder")
    _index_options(p, required=True)
    _store_option(p)
    _device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cmd_index(argv: list[str]) -> int:
    from service.store.modelstore import ModelStore

    args = index_parser().parse_args(argv)
    ref = Path(args.bundle)
    if ref.is_dir() and (ref / "manifest.json").is_file():
        folder = ref
    else:
        folder = ModelStore(args.store or get_settings().model_store).path(args.bundle)
    return _run_index(folder, args, " ".join(["hashaudit", "index", *argv]))


def cmd_data(argv: list[str]) -> int:
    """``hashaudit data scenes``: render a synthetic scene set to disk."""
    import time

    from tqdm import tqdm

    from service.data.fashion_mnist import load_fashion_mnist
    from service.data.scenes import LIST_FILES, SceneParams, write_scene_dataset

    args = data_parser().parse_args(argv)
    params = SceneParams(size=args.size, min_items=args.min_items, max_items=args.max_items)
    db_pool = load_fashion_mnist(args.root, "train")
    q_pool = load_fashion_mnist(args.root, "test")
    start = time.perf_counter()
    with tqdm(total=args.database + args.query, unit="img", disable=args.no_progress,
              desc="scenes") as bar:
        rec = write_scene_dataset(args.out, db_pool, q_pool, database=args.database,
                                  train=args.train, query=args.query, seed=args.seed,
                                  fmt=args.format, params=params, workers=args.workers,
                                  progress=bar.update)
    seconds = time.perf_counter() - start
    total = args.database + args.query
    print(f"wrote {total} {args.size} px {args.format} scenes in {seconds:.1f} s "
          f"({total / seconds:.0f} img/s) to {args.out}: {LIST_FILES['database']} "
          f"({args.database}), {LIST_FILES['train']} ({args.train}), {LIST_FILES['query']} "
          f"({args.query}), {len(rec['class_names'])} classes")  # type: ignore[arg-type]
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "bundles": cmd_bundles, "attack": cmd_attack,
            "serve": cmd_serve, "worker": cmd_worker, "audit": cmd_audit, "data": cmd_data,
            "import": cmd_import, "index": cmd_index}


def command_lines() -> list[tuple[str, str]]:
    """(``train hasher``, its one-line summary), ... for every command, in ``COMMANDS`` order;
    ``train`` and ``audit`` list their subcommands."""
    from service.training.commands import TRAIN_COMMANDS

    nested = {"train": TRAIN_COMMANDS, "audit": audit_commands(), "data": DATA_COMMANDS,
              "import": IMPORT_COMMANDS}
    out = []
    for name in COMMANDS:
        if name in nested:
            out += [(f"{name} {sub}", line) for sub, line in nested[name].items()]
        else:
            out.append((name, SUMMARIES[name]))
    return out


def main_parser() -> argparse.ArgumentParser:
    lines = command_lines()
    width = max(len(name) for name, _ in lines) + 2
    table = "\n".join(f"  {name:<{width}}{line}" for name, line in lines)
    p = argparse.ArgumentParser(
        prog="hashaudit", usage="%(prog)s [-h] [--version] COMMAND [ARGS...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Robustness audits for deep-hashing image retrieval: train hashers into "
                    "frozen bundles,\nattack them, audit them, serve them over HTTP.\n\n"
                    f"commands:\n{table}",
        epilog="`hashaudit COMMAND --help` shows a command's options and their defaults.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a usage error, as argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if not argv:
            main_parser().print_help()
            return 0
        if argv[0].startswith("-"):
            main_parser().parse_args(argv)  # --help and --version exit; anything else errs
            return 2
        if argv[0] not in COMMANDS:
            main_parser().error(f"unknown command {argv[0]!r}; valid commands: "
                                f"{', '.join(COMMANDS)}")
        return COMMANDS[argv[0]](argv[1:])
    except HashAuditError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    raise SystemExit(main())
