"""Generator parts in a bundle: PrototypeNet (shared) and one decoder+generator per entry.

Manifest records:
* ``extra["prototype"]``: ``{"file", "arch", "training"}``; the PrototypeNet trained against
  this bundle's hasher;
* ``extra["patterns"]``: ``{"file", "eps", "target_hasher_sha", "training", "validation"}``;
  the universal patterns (per class and label-free, one per eps of the grid) of
  :mod:`service.attacks.universal`, stored as float32;
* ``generators``: one entry per trained generator: ``{"attack", "eps", "file", "arch":
  {"label_decoder": kwargs, "perturbation_generator": kwargs}, "dtype",
  "target_hasher_sha", "training", "evaluation"}``.
Weights are stored as float16 to keep bundles small and are loaded as float32.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.errors import AttackInputError, BundleError
from service.nets import create_net
from service.store.files import MANIFEST, finalize, sha256_file, write_payload
from service.store.manifest import Manifest

PROTOTYPE_FILE = "prototype.safetensors"
PATTERNS_FILE = "patterns.safetensors"


def _half(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        f"{prefix}{k}": (v.half() if v.is_floating_point() else v)
        for k, v in module.state_dict().items()
    }


def eps_tag(eps: float) -> str:
    """File-name tag of an eps: grey levels (8/255 -> 'e8'), else thousandths."""
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-3:
        return f"e{round(levels)}"
    return f"m{round(eps * 1000)}"


@contextlib.contextmanager
def bundle_lock(folder: Path) -> Iterator[Manifest]:
    """Exclusive lock on a bundle folder; yields its manifest as now on disk.

    Two trainers adding generators to one bundle at once each re-read the manifest under the
    lock, so neither overwrites the other's entry.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield Manifest.from_json((folder / MANIFEST).read_text(), f"{folder.name}/{MANIFEST}")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def save_prototype(folder: Path, proto: nn.Module, arch: dict[str, Any],
                   training: dict[str, Any]) -> Manifest:
    """Write the PrototypeNet into the bundle and re-seal it (refused if one appeared)."""
    with bundle_lock(folder) as manifest:
        if manifest.extra.get("prototype"):
            raise BundleError(f"{folder.name} got a PrototypeNet from another trainer meanwhile;"
                              " rerun to train against it")
        return _save_prototype(folder, manifest, proto, arch, training)


def _save_prototype(folder: Path, manifest: Manifest, proto: nn.Module, arch: dict[str, Any],
                    training: dict[str, Any]) -> Manifest:
    write_payload(folder, PROTOTYPE_FILE, _half(proto))
    extra = {**manifest.extra, "prototype": {
        "file": PROTOTYPE_FILE, "arch": arch, "dtype": "float16", "training": training,
        "target_hasher_sha": sha256_file(folder / manifest.hasher.get("weights",
                                                                     "hasher.safetensors")),
    }}
    manifest = manifest.replace(extra=extra)
    return finalize(folder, manifest, sorted({*(f["path"] for f in manifest.files),
                                              PROTOTYPE_FILE}))


def save_patterns(folder: Path, per_class: torch.Tensor, universal: torch.Tensor,
                  eps: list[float], training: dict[str, Any],
                  validation: dict[str, Any]) -> Manifest:
    """Write the universal patterns (replacing earlier ones) and re-seal the bundle."""
    with bundle_lock(folder) as manifest:
        write_payload(folder, PATTERNS_FILE, {"per_class": per_class.float().contiguous(),
                                              "universal": universal.float().contiguous()})
        extra = {**manifest.extra, "patterns": {
            "file": PATTERNS_FILE, "eps": [float(e) for e in eps], "dtype": "float32",
            "shape": {"per_class": list(per_class.shape), "universal": list(universal.shape)},
            "target_hasher_sha": sha256_file(folder / manifest.hasher.get(
                "weights", "hasher.safetensors")),
            "training": training, "validation": validation,
        }}
        manifest = manifest.replace(extra=extra)
        return finalize(folder, manifest, sorted({*(f["path"] for f in manifest.files),
                                                  PATTERNS_FILE}))


def set_extra(folder: Path, key: str, value: Any) -> Manifest:
    """Set one ``extra`` record of the manifest and re-seal the bundle (files unchanged)."""
    with bundle_lock(folder) as manifest:
        manifest = manifest.replace(extra={**manifest.extra, key: value})
        return finalize(folder, manifest, sorted(f["path"] for f in manifest.files))


def load_patterns(folder: Path, manifest: Manifest, load: Any) -> Any:
    """The bundle's :class:`~service.attacks.universal.PatternSet`, or None."""
    from service.attacks.universal import PatternSet

    info = manifest.extra.get("patterns")
    if not info:
        return None
    t = load(folder, info["file"])
    where = f"{folder.name}/{info['file']}"
    eps = [float(e) for e in info["eps"]]
    pc, un = t.get("per_class"), t.get("universal")
    if pc is None or un is None or pc.dim() != 5 or un.dim() != 4 or \
            pc.shape[0] != len(eps) or un.shape[0] != len(eps) or \
            pc.shape[1] != len(manifest.class_names) or pc.shape[2:] != un.shape[1:]:
        raise BundleError(f"{where} does not fit its manifest record (eps grid, classes)")
    if eps != sorted(eps) or any(max(p.abs().max().item(), c.abs().max().item()) > e + 1e-6
                                 for p, c, e in zip(un, pc, eps, strict=True)):
        raise BundleError(f"{where}: patterns exceed their recorded eps")
    return PatternSet(eps, pc.float(), un.float())


def save_generator(folder: Path, attack: str, eps: float, decoder: nn.Module | None,
                   generator: nn.Module, arch: dict[str, Any], training: dict[str, Any],
                   evaluation: dict[str, Any], base: str | None = None) -> Manifest:
    """Write one generator (replacing an earlier one of the same attack and eps) and re-seal.

    ``base``: the universal pattern the generator was trained on top of (``class_pattern``
    or ``universal_pattern``), recorded in its entry; None for a plain generator."""
    with bundle_lock(folder) as manifest:
        return _save_generator(folder, manifest, attack, eps, decoder, generator, arch,
                               training, evaluation, base)


def _save_generator(folder: Path, manifest: Manifest, attack: str, eps: float,
                    decoder: nn.Module | None, generator: nn.Module, arch: dict[str, Any],
                    training: dict[str, Any], evaluation: dict[str, Any],
                    base: str | None = None) -> Manifest:
    fname = f"gen_{attack}_{eps_tag(eps)}.safetensors"
    parts = _half(generator, "generator.")
    if decoder is not None:  # label-free generators (uaa_gan) have no label decoder
        parts.update(_half(decoder, "decoder."))
    write_payload(folder, fname, parts)
    entry = {
        "attack": attack, "eps": float(eps), "file": fname, "arch": arch, "dtype": "float16",
        "target_hasher_sha": sha256_file(folder / manifest.hasher.get("weights",
                                                                     "hasher.safetensors")),
        "training": training, "evaluation": evaluation,
    }
    if base:
        if not manifest.extra.get("patterns"):
            raise BundleError(f"{folder.name}: a generator on the {base} needs the bundle's "
                              "universal patterns (hashaudit train patterns)")
        entry["base"] = base
    gens = [g for g in manifest.generators
            if not (g["attack"] == attack and abs(g["eps"] - eps) < 1e-9)]
    manifest = manifest.replace(generators=sorted([*gens, entry],
                                                  key=lambda g: (g["attack"], g["eps"])))
    return finalize(folder, manifest, sorted({*(f["path"] for f in manifest.files), fname}))


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str,
               where: str) -> nn.Module:
    sd = {k[len(prefix):]: v.float() if v.is_floating_point() else v
          for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{where} does not fit its recorded architecture: {exc}") from exc
    return module.eval().requires_grad_(False)


def load_prototype(folder: Path, manifest: Manifest, load: Any) -> nn.Module | None:
    info = manifest.extra.get("prototype")
    if not info:
        return None
    return _load_into(create_net("prototype_net", **info["arch"]), load(folder, info["file"]),
                      "", f"{folder.name}/{info['file']}")


def pick_generator(manifest: Manifest, attack: str, eps: float) -> dict[str, Any]:
    """The entry of ``attack`` with the smallest trained eps >= ``eps``."""
    cands = [g for g in manifest.generators if g["attack"] == attack and g["eps"] >= eps - 1e-6]
    if not cands:
        have = sorted(g["eps"] for g in manifest.generators if g["attack"] == attack)
        if not have:
            raise AttackInputError(f"bundle {manifest.name} has no trained {attack} generator",
                                   field="method")
        raise AttackInputError(
            f"{attack} in bundle {manifest.name} is trained for eps up to {max(have):.4f} "
            f"(available: {', '.join(f'{e:.4f}' for e in have)}); asked for {eps:.4f}",
            field="eps")
    return min(cands, key=lambda g: g["eps"])


def load_generator(folder: Path, entry: dict[str, Any],
                   load: Any) -> tuple[nn.Module | None, nn.Module]:
    """(decoder or None for label-free generators, generator), float32, eval mode."""
    t = load(folder, entry["file"])
    where = f"{folder.name}/{entry['file']}"
    dec = None
    if "label_decoder" in entry["arch"]:
        dec = _load_into(create_net("label_decoder", **entry["arch"]["label_decoder"]), t,
                         "decoder.", where)
    gen = _load_into(create_net("perturbation_generator",
                                **entry["arch"]["perturbation_generator"]), t, "generator.", where)
    return dec, gen
