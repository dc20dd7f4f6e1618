"""Low-level files of a bundle folder: checksums, safetensors payloads, the manifest and
SHA256SUMS. Both the bundle (``bundle.py``) and its generator parts (``generators.py``) write
through these helpers, so neither needs the other for file handling."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from service.errors import BundleError
from service.store.manifest import Manifest

SUMS = "SHA256SUMS"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def write_payload(folder: Path, filename: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors payload file into a bundle folder (call finalize afterwards)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / filename, tensors)
    (folder / filename).chmod(0o644)


def finalize(folder: Path, manifest: Manifest, payload: list[str]) -> Manifest:
    """Record sha256 and size of ``payload`` files in the manifest; write it and SHA256SUMS."""
    files = [
        {"path": p, "sha256": sha256_file(folder / p), "bytes": (folder / p).stat().st_size}
        for p in sorted(payload)
    ]
    manifest = manifest.replace(files=files)
    (folder / MANIFEST).write_text(manifest.to_json())
    shas = {f["path"]: f["sha256"] for f in files}  # each payload is hashed once
    shas[MANIFEST] = sha256_file(folder / MANIFEST)
    lines = [f"{shas[p]}  {p}" for p in sorted([*payload, MANIFEST])]
    (folder / SUMS).write_text("\n".join(lines) + "\n")
    return manifest


def load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Read one safetensors payload; a damaged file raises a BundleError naming it."""
    try:
        return load_file(str(folder / name))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{folder.name}: cannot read {name}: {exc}") from exc
