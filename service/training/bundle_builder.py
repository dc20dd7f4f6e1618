"""Building a complete bundle from a config file: data, splits, hasher, gallery, figures."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

import service
from service.data.base import FileImageSet
from service.data.preprocess import InputTransform, make_thumbnails
from service.data.sources import load_source, materialize, source_record
from service.data.splits import SplitSpec, make_splits
from service.device import resolve_device
from service.errors import ConfigError
from service.evaluation import protocol_record, retrieval_figures
from service.store.bundle import THUMB_SIDE, Gallery, QuerySet, save_bundle
from service.store.manifest import Manifest
from service.store.modelstore import check_bundle_name
from service.training.hasher import HasherConfig, encode, train_hasher

log = logging.getLogger(__name__)


def read_config(path: Path) -> dict[str, Any]:
    """Read a TOML bundle config; errors name the file."""
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", field="config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", field="config") from exc
    for key in ("name", "data", "hasher"):
        if key not in cfg:
            raise ConfigError(f"config file {path} lacks [{key}]", field=key)
    return cfg


def build_bundle(
    cfg: dict[str, Any],
    out_root: Path,
    device: str = "auto",
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> Manifest:
    """Train a hasher as ``cfg`` says and write ``out_root/<name>/`` as a frozen bundle."""
    name = check_bundle_name(str(cfg["name"]), field="name")
    data_cfg = dict(cfg["data"])
    hcfg = HasherConfig.from_dict(dict(cfg["hasher"]))
    db_pool, query_pool = load_source(data_cfg)
    spec = SplitSpec(
        num_query=int(data_cfg.get("num_query", 1000)),
        num_database=int(data_cfg.get("num_database", 10000)),
        num_train=int(data_cfg.get("num_train", 5000)),
        seed=int(data_cfg.get("seed", 0)),
    )
    splits = make_splits(len(db_pool), len(query_pool), spec)
    reference = source_record(data_cfg, (len(db_pool), len(query_pool)))
    workers = min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    database = materialize(db_pool.subset(splits.database), workers)
    # the train split lies inside the database (both index arrays are sorted)
    train_set = database.subset(np.searchsorted(splits.database, splits.train))
    queries = materialize(query_pool.subset(splits.query), workers)
    log.info("decoded %d database and %d query images in %.1f s", len(database),
             len(queries), time.perf_counter() - t0)
    log.info("splits: %d train, %d database, %d queries", len(train_set), len(database),
             len(queries))

    t0 = time.perf_counter()
    hasher, history = train_hasher(hcfg, train_set, device=device,
                                   checkpoint_dir=checkpoint_dir, progress=progress)
    train_seconds = time.perf_counter() - t0
    dev = resolve_device(device)
    db_codes = encode(hasher, database.images, device=dev)
    q_codes = encode(hasher, queries.images, device=dev)
    hasher.cpu()
    figures = retrieval_figures(q_codes, queries.labels, db_codes, database.labels)
    log.info("clean mAP@all %.4f, mAP@1000 %.4f, P@r2 %.4f", figures["map_all"],
             figures["map_1000"], figures["p_r2"])

    c, h, w = database.images.shape[1:]
    transform = (db_pool.transform if isinstance(db_pool, FileImageSet)
                 else InputTransform(int(c), int(h), int(w)))
    manifest = Manifest(
        name=name,
        version=str(cfg.get("version", "1")),
        created_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        package_version=service.__version__,
        torch_version=torch.__version__,
        training={
            "command": command or " ".join(["hashaudit", *sys.argv[1:]]),
            "config": cfg,
            "history": history,
            "train_seconds": round(train_seconds, 1),
            "device": str(device),
            "precision": history[-1].get("precision") if history else None,
        },
        dataset={
            "name": db_pool.name.rsplit("-", 1)[0] if db_pool.name.endswith("-train")
            else db_pool.name,
            "source": {k: v for k, v in data_cfg.items()},
            "reference": reference,
            "class_names": database.class_names,
            "splits": splits.to_record(),
            "sizes": {"train": len(train_set), "database": len(database),
                      "query": len(queries)},
        },
        input={
            "channels": int(c), "height": int(h), "width": int(w), "dtype": "uint8",
            "value_range": [0.0, 1.0], "scaling": "pixel / 255",
            "mean": list(hcfg.mean), "std": list(hcfg.std),
            "normalisation": "(x - mean) / std, applied inside the hasher",
            "transform": transform.to_record(),
        },
        hasher={
            "family": hcfg.loss, "arch": hcfg.arch, "arch_kwargs": hcfg.arch_kwargs,
            "bits": hcfg.bits,
            "num_classes": database.num_classes if hcfg.cls_weight > 0 else 0,
            "weights": "hasher.safetensors",
            "params": int(sum(p.numel() for p in hasher.parameters())),
        },
        evaluation={"protocol": protocol_record(), "figures": figures},
    )
    folder = out_root / name
    manifest = save_bundle(
        folder, manifest, hasher,
        Gallery.from_codes(db_codes, database.labels, splits.database,
                           make_thumbnails(database.images, THUMB_SIDE)),
        QuerySet(queries.images, queries.labels, splits.query.astype(np.int64)),
        {"query": splits.query, "database": splits.database, "train": splits.train},
        embed_queries=cfg.get("embed_queries"),
    )
    log.info("wrote bundle %s", folder)
    return manifest
