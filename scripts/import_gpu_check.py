"""GPU check of `hashaudit import` + `hashaudit index` (run where CUDA is; about 2 minutes).

Writes a synthetic DeepHash list set of non-square JPEGs (so the shorter-side resize and the
centre crop both act), imports a DeepHash-pytorch ResNet-50 hash net with random weights
(the upstream layout, saved with torch.save), indexes the database on CUDA and reports: the
indexing rate, how the CUDA codes compare with CPU codes of the same images (default cuDNN
settings, TF32 convolutions allowed, and with TF32 off), and whether the imported hasher and
the upstream-named net give identical outputs on the GPU too. JSON to $OUT (or ./out).

    python3 scripts/import_gpu_check.py [--database 4000] [--query 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "importers")]

from upstream_nets import DeepHashResNet, normalise, randomize  # noqa: E402

from service.importers.importer import ImportSpec, import_checkpoint  # noqa: E402
from service.importers.index import IndexSpec, index_bundle  # noqa: E402
from service.nets.hasher import encode_uint8  # noqa: E402
from service.store import load_bundle  # noqa: E402


def write_set(folder: Path, n: int, name: str, rng: np.random.Generator) -> Path:
    lines = []
    for k in range(n):
        w, h = int(rng.integers(280, 480)), int(rng.integers(240, 400))
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        rel = f"images/{name}/{k:06d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / rel, quality=90)
        lab = (rng.random(10) < 0.2).astype(int)
        lab[rng.integers(10)] = 1
        lines.append(rel + " " + " ".join(map(str, lab)))
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.txt"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--database", type=int, default=4000)
    ap.add_argument("--query", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/import_gpu_check"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    assert dev == "cpu" or torch.cuda.is_available(), "no CUDA device"
    rep: dict = {"torch": torch.__version__, "device": dev,
                 "gpu": torch.cuda.get_device_name(0) if dev != "cpu" else None,
                 "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                 "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    rng = np.random.default_rng(0)
    data = args.work / "data"
    t0 = time.perf_counter()
    db = write_set(data, args.database, "database", rng)
    q = write_set(data, args.query, "test", rng)
    rep["write_s"] = round(time.perf_counter() - t0, 1)

    net = randomize(DeepHashResNet(64, 50), seed=5)
    ckpt = args.work / "model.pt"
    torch.save(net.state_dict(), ckpt)
    store = args.work / "store"
    import shutil
    shutil.rmtree(store, ignore_errors=True)
    import_checkpoint(ImportSpec("deephash", "ResNet50", "r50"), ckpt, store)
    t0 = time.perf_counter()
    m = index_bundle(store / "r50", IndexSpec(database=db, root=data, query=q,
                                              batch_size=128, chunk=1024, workers=16),
                     device=dev)
    sec = time.perf_counter() - t0
    n = args.database + args.query
    rep["index"] = {"images": n, "seconds": round(sec, 1), "img_per_s": round(n / sec, 1),
                    "figures": {k: m.evaluation["figures"][k] for k in ("map_all", "p_r2")}}

    b = load_bundle(store / "r50", "cpu")
    k = min(256, len(b.gallery))
    sample = b.database_set(np.arange(k)).materialize(16).images  # type: ignore[attr-defined]
    if dev == "cpu":
        print(json.dumps(rep, indent=1))
        return 0
    cpu = encode_uint8(b.hasher, sample, 64)
    gal = b.gallery.codes(64)[:k]
    rep["gallery_cuda_vs_cpu"] = {"codes_differing": int((cpu != gal).any(1).sum()),
                                  "bits_differing": int((cpu != gal).sum()), "of": k}
    h = b.hasher.to("cuda")
    x = torch.from_numpy(sample[:64]).float().div(255).cuda()
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        with torch.no_grad():
            u = h(x).cpu()
        ucpu = b.hasher.to("cpu")(x.cpu()).detach()
        h.to("cuda")
        rep[f"cuda_tf32_{tf32}"] = {
            "max_abs_diff_vs_cpu": float((u - ucpu).abs().max()),
            "codes_differing_vs_cpu": int(((u >= 0) != (ucpu >= 0)).any(1).sum()), "of": 64}
    torch.backends.cudnn.allow_tf32 = True
    net = net.cuda()
    with torch.no_grad():
        theirs = net(normalise(x.cpu()).cuda()).cpu()
        ours = h(x).cpu()
    rep["upstream_vs_imported_on_cuda"] = {"identical": bool(torch.equal(theirs, ours)),
                                           "max_abs_diff": float((theirs - ours).abs().max())}
    print(json.dumps(rep, indent=1))
    (out / "import_gpu_check.json").write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
