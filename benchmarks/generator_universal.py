"""How much of the generator's effect is image-specific? (issue 3 ablation)

Fits one fixed perturbation per class (a class-universal perturbation: 150 sign-gradient steps
of the ``untargeted_gan_plus`` own-code objective on batches of 64 training images of that
class, on a seeded subset of the default bundle's train split), then adds the class's pattern
to every query of that class. Such an attack costs one addition at inference; a generator that
does better has learned something about the individual image. Optionally (``--residual``) a
PerturbationGenerator is trained on top of the fixed pattern, delta = clip(D_y + G(x), eps), to
see whether an image-dependent part adds anything. The shipped generators of the bundle are
measured on the same queries for comparison. mAP@all after uint8 rounding.

    python benchmarks/generator_universal.py [--eps 8 16] [--residual-epochs 4] [--name STEM]
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
from service.attacks.runner import attack_batch  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.evaluation import retrieval_figures  # noqa: E402
from service.nets.gan import PerturbationGenerator  # noqa: E402
from service.nets.hasher import encode_uint8  # noqa: E402
from service.store import ModelStore  # noqa: E402


def own_code_loss(h, x_adv: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    """Mean agreement of the relaxed adversarial code with the clean code (to minimise)."""
    anchor = torch.where(u0 >= 0, 1.0, -1.0)
    return (anchor * torch.tanh(scale_for(u0) * h(x_adv))).mean()


def fit_class_patterns(h, x: torch.Tensor, cls: torch.Tensor, classes: int, eps: float,
                       steps: int, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.zeros(classes, *x.shape[1:], device=x.device)
    for c in range(classes):
        xc = x[cls == c]
        if len(xc) == 0:
            continue
        d = torch.zeros(1, *x.shape[1:], device=x.device)
        for _ in range(steps):
            xb = xc[torch.randint(0, len(xc), (batch,), generator=gen)]
            with torch.no_grad():
                u0 = h(xb)
            d.requires_grad_(True)
            (g,) = torch.autograd.grad(own_code_loss(h, (xb + d).clamp(0, 1), u0), d)
            with torch.no_grad():
                d = (d - eps / 20 * g.sign()).clamp(-eps, eps)
        patterns[c] = d[0]
    return patterns


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=None)
    p.add_argument("--eps", type=float, nargs="+", default=[8, 16], help="in 1/255 units")
    p.add_argument("--num-train", type=int, default=5000)
    p.add_argument("--num-queries", type=int, default=1000)
    p.add_argument("--steps", type=int, default=150, help="sign steps per class pattern")
    p.add_argument("--residual-epochs", type=int, default=4, help="0: no residual generator")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--name", default="generator_universal", help="stem of the JSON file")
    add_device_arg(p)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    s = get_settings()
    dev = pick_device(args.device)
    bundle = ModelStore(s.model_store, dev).get(args.bundle or s.default_bundle)
    h = bundle.hasher.eval()
    for prm in h.parameters():
        prm.requires_grad_(False)
    if bool((bundle.gallery.labels.sum(1) != 1).any()):
        raise SystemExit("class-universal patterns need single-label data")
    x8, y = bundle.train_split(args.num_train, 0)
    x_tr = torch.from_numpy(x8).to(dev).float() / 255
    c_tr = torch.from_numpy(y.argmax(1)).to(dev)
    q = bundle.queries
    n = args.num_queries
    x_q = torch.from_numpy(q.images[:n]).to(dev).float() / 255
    c_q = torch.from_numpy(q.labels[:n].argmax(1)).to(dev)
    db = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
    classes = y.shape[1]

    def score(perturb) -> tuple[float, float]:
        advs, t0 = [], time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, 100):
                x = x_q[i:i + 100]
                advs.append(to_uint8_within((x + perturb(x, c_q[i:i + 100])).clamp(0, 1), x,
                                            eps).cpu().numpy())
        ms = 1000 * (time.perf_counter() - t0) / n
        codes = encode_uint8(h, np.concatenate(advs))
        return retrieval_figures(codes, q.labels[:n], *db, curves=False)["map_all"], ms

    rows = []
    for eps255 in args.eps:
        eps = eps255 / 255
        for method in ("untargeted_gan", "untargeted_gan_plus"):
            res = attack_batch(bundle, method, eps, q.images[:n], q.labels[:n], batch_size=100)
            fig = retrieval_figures(res.adv_codes, q.labels[:n], *db, curves=False)
            rows.append({"eps_255": eps255, "attack": f"{method} (shipped)",
                         "map_all": fig["map_all"], "ms_per_image": 1000 * res.seconds / n})
            print(rows[-1], flush=True)
        t0 = time.perf_counter()
        pats = fit_class_patterns(h, x_tr, c_tr, classes, eps, args.steps, 64, 0)
        fit_s = time.perf_counter() - t0
        m, ms = score(lambda x, c, pats=pats: pats[c])
        rows.append({"eps_255": eps255, "attack": "class-universal pattern", "map_all": m,
                     "ms_per_image": ms, "fit_s": fit_s})
        print(rows[-1], flush=True)
        if args.residual_epochs:
            gen = PerturbationGenerator(x_tr.shape[1], width=16, blocks=6,
                                        cond_channels=0).to(dev)
            opt = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999))

            def perturb(x, c, gen=gen, pats=pats, eps=eps):
                return (pats[c] + gen(x, None, eps)).clamp(-eps, eps)

            t0 = time.perf_counter()
            for _ in range(args.residual_epochs):
                perm = torch.randperm(len(x_tr))
                for i in range(0, len(x_tr), 32):
                    idx = perm[i:i + 32]
                    x = x_tr[idx]
                    with torch.no_grad():
                        u0 = h(x)
                    loss = own_code_loss(h, (x + perturb(x, c_tr[idx])).clamp(0, 1), u0)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            fit_s = time.perf_counter() - t0
            gen.eval()
            m, ms = score(perturb)
            rows.append({"eps_255": eps255, "attack": "pattern + generator residual",
                         "map_all": m, "ms_per_image": ms, "fit_s": fit_s})
            print(rows[-1], flush=True)
    table = print_table(rows, [("eps_255", "eps (x/255)", ".0f"), ("attack", "attack", ""),
                               ("map_all", "mAP@all", ".4f"), ("ms_per_image", "ms/image", ".3f"),
                               ("fit_s", "fit s", ".0f")])
    write_json(args.name, {
        "machine": machine(dev), "bundle": bundle.name, "num_train": args.num_train,
        "queries": n, "steps_per_class": args.steps, "residual_epochs": args.residual_epochs,
        "rows": rows, "table": table, "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
