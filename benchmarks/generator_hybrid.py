"""Does a generator start help iterative attacks? Generator + k PGD steps vs k PGD steps.

For issue 3: at each eps, ``untargeted_gan_plus`` alone, then k sign-gradient steps of the
center-code objective (``pgd_center``'s) started from the generator's output (step eps/2) or
from the clean image (step 2.5 eps / k, as ``pgd_center``), for k in 1, 2, 3, 5. mAP@all on
the default bundle's queries after uint8 rounding; time per image includes the generator for
the generator-started rows.

    python benchmarks/generator_hybrid.py [--num-queries 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_device_arg, machine, pick_device, print_table, write_json  # noqa: E402, E501
from service.attacks.base import scale_for, to_uint8_within  # noqa: E402
from service.attacks.factory import bundle_context  # noqa: E402
from service.attacks.runner import attack_batch  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.evaluation import retrieval_figures  # noqa: E402
from service.nets.hasher import encode_uint8  # noqa: E402
from service.store import ModelStore  # noqa: E402


def pgd_from(hasher: torch.nn.Module, x: torch.Tensor, x0: torch.Tensor, anchor: torch.Tensor,
             eps: float, steps: int, step: float) -> torch.Tensor:
    with torch.no_grad():
        scale = scale_for(hasher(x))
    xa = x0.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = (anchor * torch.tanh(scale * hasher(xa))).mean(1).sum()
        (g,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            xa = xa - step * g.sign()
            xa = torch.max(torch.min(xa, x + eps), x - eps).clamp(0, 1)
    return xa.detach()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None)
    p.add_argument("--num-queries", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    add_device_arg(p)
    args = p.parse_args()
    s = get_settings()
    dev = pick_device(args.device)
    b = ModelStore(s.model_store, dev).get(args.bundle or s.default_bundle)
    q, n, bs = b.queries, args.num_queries, args.batch_size
    images, labels = q.images[:n], q.labels[:n]
    db = b.gallery.codes(b.manifest.bits), b.gallery.labels
    ctx = bundle_context(b)

    def map_all(adv: np.ndarray) -> float:
        codes = encode_uint8(b.hasher, adv)
        return retrieval_figures(codes, labels, *db, curves=False)["map_all"]

    rows = []
    for eps in (8 / 255, 16 / 255):
        gen = attack_batch(b, "untargeted_gan_plus", eps, images, labels, batch_size=bs)
        rows.append({"eps": f"{eps * 255:.0f}/255", "attack": "generator", "steps": 0,
                     "map_all": map_all(gen.adversarial), "ms": 1e3 * gen.seconds / n})
        for steps in (1, 2, 3, 5):
            for start in ("generator", "clean"):
                advs, t = [], gen.seconds if start == "generator" else 0.0
                for i in range(0, n, bs):
                    x = torch.from_numpy(images[i:i + bs]).to(dev).float() / 255
                    anchor = ctx.prototype_codes(
                        torch.from_numpy(labels[i:i + bs]).to(dev).float())
                    x0 = (torch.from_numpy(gen.adversarial[i:i + bs]).to(dev).float() / 255
                          if start == "generator" else x)
                    step = eps / 2 if start == "generator" else 2.5 * eps / steps
                    t0 = time.perf_counter()
                    xa = pgd_from(b.hasher, x, x0, anchor, eps, steps, step)
                    t += time.perf_counter() - t0
                    advs.append(to_uint8_within(xa, x, eps).cpu().numpy())
                rows.append({"eps": f"{eps * 255:.0f}/255", "attack": f"{start} start + PGD",
                             "steps": steps, "map_all": map_all(np.concatenate(advs)),
                             "ms": 1e3 * t / n})
                print(rows[-1], flush=True)
    table = print_table(rows, [("eps", "eps", ""), ("attack", "attack", ""),
                               ("steps", "PGD steps", "d"), ("map_all", "mAP@all", ".4f"),
                               ("ms", "ms / image", ".3f")])
    write_json("generator_hybrid", {"machine": machine(dev), "bundle": b.name, "queries": n,
                                    "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
