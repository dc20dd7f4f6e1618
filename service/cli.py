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
    p.add_argument("--log-level", default="info",
                   help="uvicorn log level: critical, error, warning, info, debug or trace")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not log every request (saves CPU under heavy load)")
    return p


def cmd_serve(argv: list[str]) -> int:
    """Run the REST API with uvicorn (one process; the micro-batcher needs one model copy).
    SIGTERM drains requests in flight for at most HASHAUDIT_SHUTDOWN_DRAIN_S, then exits."""
    settings = get_settings()
    args = serve_parser().parse_args(argv)
    from service.api import create_app
    from service.api.shutdown import serve

    app = create_app(settings)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"HashAudit {app.version}: serving {settings.model_store} "
          f"(default bundle {settings.default_bundle})\n"
          f"  Swagger UI: http://{shown}:{args.port}/docs (ReDoc: /redoc)\n"
          f"  ready when: http://{shown}:{args.port}/health/ready answers 200", flush=True)
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
    from service.inference import BundleService
    from service.jobs.audit_types import audit_types, load_plugins
    from service.jobs.queue import run_local_audit
    from service.jobs.report import render_html
    from service.jobs.spec import normalize_spec
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
            "serve": cmd_serve, "worker": cmd_worker, "audit": cmd_audit, "data": cmd_data}


def command_lines() -> list[tuple[str, str]]:
    """(``train hasher``, its one-line summary), ... for every command, in ``COMMANDS`` order;
    ``train`` and ``audit`` list their subcommands."""
    from service.training.commands import TRAIN_COMMANDS

    nested = {"train": TRAIN_COMMANDS, "audit": audit_commands(), "data": DATA_COMMANDS}
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
