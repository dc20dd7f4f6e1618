"""Does the generator learn more when it sees the hasher's features? (issue 3 ablation)

A simplified trainer (generator only: no PrototypeNet, decoder or discriminator; the
``untargeted_gan_plus`` hashing term with the own-code anchor, which last session's ablation
found as strong as the center anchor) trains the same PerturbationGenerator (width 16, 6
blocks) at eps 8/255 on a seeded subset of the default bundle's train split, once on the image
alone and once with the hasher's last convolutional feature map (per-sample standardised,
upsampled to the image size) as extra input channels. mAP@all of the first N queries after
uint8 rounding, after every epoch.

    python benchmarks/generator_features.py [--epochs 12] [--num-train 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_device_arg, machine, pick_device, print_table, write_json  # noqa: E402, E501
from service.attacks.base import scale_for, to_uint8_within  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.evaluation import retrieval_figures  # noqa: E402
from service.nets.gan import PerturbationGenerator  # noqa: E402
from service.nets.hasher import encode_uint8  # noqa: E402
from service.store import ModelStore  # noqa: E402

EPS = 8 / 255


def run(bundle, features: bool, epochs: int, num_train: int, queries: int,
        lr: float) -> list[dict]:
    torch.manual_seed(0)
    h = bundle.hasher.eval()
    for p in h.parameters():
        p.requires_grad_(False)
    dev = bundle.device
    x_train = torch.from_numpy(bundle.train_split(num_train, 0)[0]).to(dev).float() / 255
    with torch.no_grad():
        channels = h.forward_features(x_train[:1]).shape[1] if features else 0
    gen = PerturbationGenerator(x_train.shape[1], width=16, blocks=6,
                                cond_channels=channels).to(dev)
    opt = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    q = bundle.queries
    db = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels

    def cond(x: torch.Tensor) -> torch.Tensor | None:
        if not channels:
            return None
        with torch.no_grad():
            f = h.forward_features(x)
            f = f / (f.flatten(1).std(1)[:, None, None, None] + 1e-6)
        return F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def evaluate() -> float:
        gen.eval()
        advs = []
        with torch.no_grad():
            for i in range(0, queries, 100):
                x = torch.from_numpy(q.images[i:i + 100]).to(dev).float() / 255
                xa = (x + gen(x, cond(x), EPS)).clamp(0, 1)
                advs.append(to_uint8_within(xa, x, EPS).cpu().numpy())
        gen.train()
        codes = encode_uint8(h, np.concatenate(advs))
        return retrieval_figures(codes, q.labels[:queries], *db, curves=False)["map_all"]

    rows, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(0, len(x_train), 32):
            x = x_train[perm[i:i + 32]]
            with torch.no_grad():
                u0 = h(x)
            scale, anchor = scale_for(u0), torch.where(u0 >= 0, 1.0, -1.0)
            u = h((x + gen(x, cond(x), EPS)).clamp(0, 1))
            agree = (anchor * u > 0).float().detach()
            loss = (agree * anchor * torch.tanh(scale * u)).sum(1).mean() / u.shape[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows.append({"input": "image + hasher features" if features else "image",
                     "epoch": epoch + 1, "map_all": evaluate(),
                     "train_s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--num-train", type=int, default=5000)
    p.add_argument("--num-queries", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-4)
    add_device_arg(p)
    args = p.parse_args()
    torch.set_num_threads(2)
    s = get_settings()
    dev = pick_device(args.device)
    bundle = ModelStore(s.model_store, dev).get(args.bundle or s.default_bundle)
    rows = []
    for features in (True, False):
        rows += run(bundle, features, args.epochs, args.num_train, args.num_queries, args.lr)
    table = print_table(rows, [("input", "generator input", ""), ("epoch", "epoch", "d"),
                               ("map_all", "mAP@all 8/255", ".4f"),
                               ("train_s", "train s", ".0f")])
    write_json("generator_features", {"machine": machine(dev), "bundle": bundle.name,
                                      "num_train": args.num_train,
                                      "queries": args.num_queries, "rows": rows,
                                      "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
