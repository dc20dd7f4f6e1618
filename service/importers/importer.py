"""``hashaudit import``: a bundle from a checkpoint trained elsewhere.

The checkpoint's state dict (read with :func:`service.importers.checkpoint.read_state_dict`:
never full unpickling) is matched against the upstream layouts of
:mod:`service.importers.layouts` by its key names, loaded with ``strict=True`` into a
HashAudit hasher (torchvision trunk + linear hash layer; the normalisation the upstream code
applies in its data loader moves inside the hasher), checked with one forward pass at the
input size, and written as ``hasher.safetensors`` with a manifest that records where it came
from (``extra.provenance``). Until ``hashaudit index`` gives it a gallery the bundle is marked
``extra.indexed = false`` and ``load_bundle`` refuses it with a message saying so.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import service
from service.data.preprocess import InputTransform
from service.errors import BadInput, ConfigError
from service.importers.checkpoint import read_state_dict
from service.importers.layouts import Layout, deephash_model, layouts_for, torchvision_layout
from service.nets import Hasher
from service.nets.torchvision_trunk import MODELS, TorchvisionTrunk
from service.store.bundle import HASHER_FILE
from service.store.files import finalize, write_payload
from service.store.manifest import Manifest
from service.store.modelstore import check_bundle_name

log = logging.getLogger(__name__)

FORMATS = {"deephash": "DeepHash-pytorch and the code derived from it (DHTA, CIBA, ProS-GAN, "
                       "THA)",
           "torchvision": "a torchvision backbone with a linear hash layer"}
MAX_BITS = 4096
_SHOWN = 6


@dataclass(frozen=True)
class ImportSpec:
    """What to import and how its inputs are prepared (``None``: the upstream default).

    Attributes:
        fmt: ``deephash`` or ``torchvision``.
        arch: ``AlexNet``, ``ResNet50``, ``VGG16`` ... (deephash) or a torchvision model name
            (``resnet50``, ``vgg16_bn`` ...).
        name: bundle name to write.
        bits: expected code length (checked against the checkpoint).
        hash_layer: torchvision format: the hash layer's module path (default ``fc`` /
            ``classifier.6``).
        state_key: the entry of a wrapped checkpoint that holds the state dict.
        resize, crop, interpolation, resize_mode, mean, std: preprocessing overrides.
        version: the bundle's own version string.
    """

    fmt: str
    arch: str
    name: str
    bits: int | None = None
    hash_layer: str | None = None
    state_key: str | None = None
    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    resize_mode: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    version: str = "1"

    def model(self) -> str:
        if self.fmt == "deephash":
            return deephash_model(self.arch)
        if self.fmt == "torchvision":
            m = self.arch.strip().lower()
            if m not in MODELS:
                raise ConfigError(f"arch: unknown torchvision model {self.arch!r}; known: "
                                  f"{', '.join(MODELS)}", field="arch")
            return m
        raise ConfigError(f"format: {self.fmt!r} is not one of {', '.join(FORMATS)}",
                          field="format")


def _keys(layout: Layout, trunk: TorchvisionTrunk, state: dict[str, torch.Tensor]) -> set[str]:
    w = state.get(f"{layout.hash_key}.weight")
    bits = int(w.shape[0]) if w is not None and w.ndim == 2 else 1
    return set(layout.build(trunk, nn.Linear(trunk.out_features, bits)).state_dict())


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return (", ".join(keys[:_SHOWN]) + more) if keys else "none"


def match_layout(spec: ImportSpec, model: str, trunk: TorchvisionTrunk,
                 state: dict[str, torch.Tensor], file: str) -> Layout:
    """The layout whose key names are exactly the checkpoint's; else a ConfigError naming
    the closest one's missing and unexpected keys."""
    candidates = (layouts_for("deephash", model) if spec.fmt == "deephash"
                  else [torchvision_layout(model, spec.hash_layer)])
    have = set(state)
    scored = []
    for lay in candidates:
        want = _keys(lay, trunk, state)
        if want == have:
            return lay
        scored.append((len(want ^ have), lay, sorted(want - have), sorted(have - want)))
    _, lay, missing, unexpected = min(scored, key=lambda s: s[0])
    tried = ", ".join(c.name for c in candidates)
    hint = ("; is --arch right?" if spec.fmt == "deephash" else
            "; is --arch right, and --hash-layer the hash layer's module path?")
    raise ConfigError(
        f"checkpoint: the keys of {file} match no {spec.fmt} layout of {model} (tried: "
        f"{tried}); the closest, {lay.name}, misses {len(missing)} key(s): "
        f"{_listed(missing)}; and does not expect {len(unexpected)}: {_listed(unexpected)}"
        f"{hint}", field="checkpoint")


def _check_shared(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Upstream names that register one module twice must hold equal tensors."""
    groups: dict[int, list[str]] = defaultdict(list)
    for k, v in module.state_dict(keep_vars=True).items():
        groups[id(v)].append(k)
    for keys in groups.values():
        first = state[keys[0]]
        for k in keys[1:]:
            other = state[k]
            if other.shape != first.shape or not torch.equal(other, first):
                raise ConfigError(
                    f"checkpoint: {keys[0]} and {k} name one shared layer upstream, but the "
                    "file holds different tensors under them", field="checkpoint")


def _transform(spec: ImportSpec, lay: Layout) -> tuple[InputTransform, list[float], list[float]]:
    ev = lay.evaluation
    crop = spec.crop if spec.crop is not None else int(ev["crop"])
    # a crop of its own without a resize: resize to the crop (DeepHash-pytorch's CIFAR path)
    resize = spec.resize if spec.resize is not None else (
        int(ev["resize"]) if spec.crop is None else crop)
    t = InputTransform(3, crop, crop, resize, spec.interpolation or ev["interpolation"],
                       spec.resize_mode or ev["resize_mode"])
    mean = [float(v) for v in (spec.mean if spec.mean is not None else ev["mean"])]
    std = [float(v) for v in (spec.std if spec.std is not None else ev["std"])]
    for key, vals in (("mean", mean), ("std", std)):
        if len(vals) != 3:
            raise ConfigError(f"{key}: three values (R G B), got {len(vals)}", field=key)
    if any(not 0.0 < s < 1e3 for s in std) or any(abs(m) > 1e3 for m in mean):
        raise ConfigError("std: positive values; mean and std at most 1000 in size",
                          field="std")
    return t, mean, std


def build_hasher_from_checkpoint(spec: ImportSpec, checkpoint: Path | str
                                 ) -> tuple[Hasher, Layout, InputTransform, dict[str, Any]]:
    """Read, match and load a checkpoint into a hasher (CPU, eval mode).

    Returns:
        ``(hasher, layout, input transform, checkpoint record)``.

    Raises:
        UnsafeCheckpoint: the file needs arbitrary globals (nothing from it ran).
        ConfigError: unknown arch, no layout matches the keys, shapes or bits differ, or the
            net cannot take the crop size.
    """
    model = spec.model()
    if spec.hash_layer is not None and spec.fmt != "torchvision":
        raise ConfigError("hash_layer: only for the torchvision format", field="hash_layer")
    state, record = read_state_dict(checkpoint, spec.state_key)
    trunk = TorchvisionTrunk(model)
    lay = match_layout(spec, model, trunk, state, record["file"])
    weight = state[f"{lay.hash_key}.weight"]
    if weight.ndim != 2 or weight.shape[1] != trunk.out_features:
        raise ConfigError(f"checkpoint: {lay.hash_key}.weight has shape {tuple(weight.shape)}; "
                          f"{model} gives {trunk.out_features} features to the hash layer",
                          field="checkpoint")
    bits = int(weight.shape[0])
    if not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"checkpoint: a {bits}-bit hash layer; 1 to {MAX_BITS} bits",
                          field="checkpoint")
    if spec.bits is not None and spec.bits != bits:
        raise ConfigError(f"bits: the checkpoint's hash layer gives {bits} bits, not "
                          f"{spec.bits}", field="bits")
    if not lay.avgpool and not trunk.is_resnet:
        trunk.avgpool = nn.Identity()
    transform, mean, std = _transform(spec, lay)
    hasher = Hasher(trunk, bits, num_classes=0, mean=mean, std=std)
    upstream = lay.build(hasher.backbone, hasher.hash_layer)  # type: ignore[arg-type]
    _check_shared(upstream, state)
    try:
        upstream.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint: {record['file']} does not fit {lay.name} ({model}): "
                          f"{str(exc)[:600]}", field="checkpoint") from None
    hasher.eval().requires_grad_(False)
    try:
        with torch.no_grad():
            hasher(torch.zeros(1, *transform.shape))
    except RuntimeError as exc:
        raise ConfigError(
            f"crop: {lay.name} ({model}) cannot take {transform.height}x{transform.width} "
            f"inputs ({str(exc)[:200]}); upstream evaluates at {lay.evaluation['crop']}",
            field="crop") from None
    return hasher, lay, transform, record


def import_checkpoint(spec: ImportSpec, checkpoint: Path | str, store: Path,
                      command: str | None = None,
                      built: tuple[Hasher, Layout, InputTransform, dict[str, Any]] | None = None
                      ) -> Manifest:
    """Write ``store/<name>/`` from ``checkpoint``: the hasher and a manifest, not yet
    indexed (see the module docstring). Refuses an existing bundle name. ``built`` is what
    :func:`build_hasher_from_checkpoint` returned for this spec, when it was called already."""
    name = check_bundle_name(spec.name, field="name")
    folder = Path(store) / name
    if folder.exists():
        raise BadInput(f"name: {folder} exists already; choose another name", field="name")
    hasher, lay, transform, record = built or build_hasher_from_checkpoint(spec, checkpoint)
    model = spec.model()
    ev = lay.evaluation
    own = {k: getattr(spec, k) for k in ("resize", "crop", "interpolation", "resize_mode",
                                         "mean", "std") if getattr(spec, k) is not None}
    provenance = {
        "format": spec.fmt, "format_description": FORMATS[spec.fmt], "arch": spec.arch,
        "torchvision_model": model, "layout": lay.name, "upstream": list(lay.upstream),
        "hash_layer": lay.hash_key, "checkpoint": record,
        "preprocessing": {"upstream": ev["source"],
                          "options": {k: list(v) if isinstance(v, tuple | list) else v
                                      for k, v in own.items()}},
        "imported_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    _, mean, std = _transform(spec, lay)  # as given, not read back from float32 buffers
    manifest = Manifest(
        name=name, version=str(spec.version),
        created_at=provenance["imported_at"], package_version=service.__version__,
        torch_version=torch.__version__,
        training={"command": command or f"hashaudit import {spec.fmt}", "imported": True},
        dataset={"name": None, "class_names": [], "reference": None},
        input={"channels": 3, "height": transform.height, "width": transform.width,
               "dtype": "uint8", "value_range": [0.0, 1.0], "scaling": "pixel / 255",
               "mean": mean, "std": std,
               "normalisation": "(x - mean) / std, applied inside the hasher (the upstream code "
                                "applies it to its input tensors)",
               "transform": transform.to_record()},
        hasher={"family": "imported", "arch": "torchvision",
                "arch_kwargs": {"model": model, "avgpool": lay.avgpool},
                "bits": int(hasher.bits), "num_classes": 0, "weights": HASHER_FILE,
                "params": int(sum(p.numel() for p in hasher.parameters()))},
        extra={"indexed": False, "provenance": provenance},
    )
    tmp = folder.parent / f".{name}.importing"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write_payload(tmp, HASHER_FILE, dict(hasher.state_dict()))
        manifest = finalize(tmp, manifest, [HASHER_FILE])
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s (%s, %s, %d bits) as %s", record["file"], lay.name, model,
             hasher.bits, folder)
    return manifest
