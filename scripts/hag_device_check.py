"""HAG across devices, precisions, TF32 and batch sizes on the default bundle (issue 20, item 1).

    python scripts/hag_device_check.py OUT.json [--queries 1000]

Prints one line per run and writes them as JSON. Each run attacks the bundle's queries with
HAG (20 steps) at 8/255 and 16/255 and scores the uint8-rounded images (mAP@all):

* ``hag``: the shipped attack (the hasher sees ``x + delta``);
* ``hag_clamp_in_forward``: the attack before the fix (the hasher saw
  ``(x + delta).clamp(0, 1)``), to show whether this torch build passes clamp's gradient at
  the bounds (``clamp_grad_at_bounds`` in the JSON, per device);

on the CPU at batch 100, and on CUDA (when present) at batch 100 and 1,000, in fp32 with TF32
off and on, and in bf16 (what ``auto`` picks on CUDA). Under a minute on one H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.attacks.base import register_attack, scale_for  # noqa: E402
from service.attacks.hag import HAG  # noqa: E402
from service.attacks.runner import attack_batch  # noqa: E402
from service.config import get_settings  # noqa: E402
from service.evaluation import retrieval_figures  # noqa: E402
from service.store import ModelStore  # noqa: E402


@register_attack("hag_clamp_in_forward")
class HAGClampInForward(HAG):
    """HAG as it was before issue 20: a clamp inside the forward pass."""

    def perturb(self, x, labels, target, gen):
        with torch.no_grad():
            u0 = self.hasher(x)
        b = torch.where(u0 >= 0, 1.0, -1.0)
        scale = scale_for(u0)
        delta = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        for _ in range(self.steps):
            u = self.hasher((x + delta).clamp(0, 1))
            mask = (b * u > 0).float().detach()
            loss = (mask * b * torch.tanh(scale * u)).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-self.eps, self.eps)
                delta.copy_((x + delta).clamp(0, 1) - x)
        return (x + delta).detach()


def clamp_grad_at_bounds(device: str) -> list[float]:
    """d/dx clamp(x, 0, 1) at x = 0, 0.5, 1 on ``device`` (torch 2.14: 0, 1, 0)."""
    x = torch.tensor([0.0, 0.5, 1.0], device=device, requires_grad=True)
    x.clamp(0, 1).sum().backward()
    return [float(v) for v in x.grad.cpu()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    settings = get_settings()
    cuda = torch.cuda.is_available()
    record: dict = {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
                    "device_name": torch.cuda.get_device_name(0) if cuda else None,
                    "cpu_threads": torch.get_num_threads(),
                    "clamp_grad_at_bounds": {"cpu": clamp_grad_at_bounds("cpu")},
                    "runs": []}
    if cuda:
        record["clamp_grad_at_bounds"]["cuda"] = clamp_grad_at_bounds("cuda")
    print(f"torch {torch.__version__}; d clamp(x,0,1)/dx at x=0,0.5,1: "
          f"{record['clamp_grad_at_bounds']}", flush=True)
    configs = [("cpu", "fp32", None, 100)]
    if cuda:
        configs += [("cuda", "fp32", False, 100), ("cuda", "fp32", False, 1000),
                    ("cuda", "fp32", True, 1000), ("cuda", "bf16", None, 100),
                    ("cuda", "bf16", None, 1000)]
    stores: dict = {}
    for device, precision, tf32, batch in configs:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        key = (device, precision)
        if key not in stores:
            stores[key] = ModelStore(settings.model_store, device, precision).get(
                settings.default_bundle)
        bundle = stores[key]
        q = bundle.queries
        n = min(args.queries, len(q))
        images, labels = q.images[:n], q.labels[:n]
        db_codes, db_labels = bundle.gallery.codes(bundle.manifest.bits), bundle.gallery.labels
        for method in ("hag", "hag_clamp_in_forward"):
            for eps in (8 / 255, 16 / 255):
                t0 = time.perf_counter()
                res = attack_batch(bundle, method, eps, images, labels, batch_size=batch,
                                   steps=args.steps)
                fig = retrieval_figures(res.adv_codes, labels, db_codes, db_labels,
                                        curves=False)
                run = {"device": device, "precision": precision, "tf32": tf32, "batch": batch,
                       "method": method, "eps_255": round(eps * 255), "queries": n,
                       "map_all": fig["map_all"], "hamming": float(res.hamming.mean()),
                       "ms_per_image": 1000 * res.seconds / n,
                       "wall_s": time.perf_counter() - t0}
                record["runs"].append(run)
                print(f"{device:4s} {precision} tf32={tf32!s:5s} batch {batch:4d} "
                      f"{method:21s} {run['eps_255']:2d}/255 mAP@all {run['map_all']:.4f} "
                      f"ham {run['hamming']:5.2f} {run['ms_per_image']:.3f} ms/img", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
