"""ModelStore: the bundles under one folder, loaded once per process."""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import torch

from service.errors import InvalidName, UnknownName
from service.precision import resolve_precision
from service.store.bundle import MANIFEST, Bundle, load_bundle

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_bundle_name(name: str, field: str = "model") -> str:
    """Reject names that could reach outside the store (``..``, slashes, odd characters)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidName(
            f"invalid bundle name {name!r}: use letters, digits, '.', '_' and '-' only",
            field=field,
        )
    return name


class ModelStore:
    """Lists and loads bundles from ``root``; loaded bundles are cached (thread-safe).

    ``precision`` (``auto``, ``fp32`` or ``bf16``; see :mod:`service.precision`) is set on
    every hasher it loads, so encoding and attacks run in it; the default ``fp32`` computes
    what the bundle's recorded figures were computed with.
    """

    def __init__(self, root: Path | str, device: str | torch.device = "cpu",
                 precision: str = "fp32") -> None:
        self.root = Path(root)
        self.device = device
        self.precision = resolve_precision(precision, device)
        self._cache: dict[str, Bundle] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Bundle folders (those holding a manifest), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and _NAME.match(p.name) and (p / MANIFEST).is_file()
        )

    def path(self, name: str) -> Path:
        check_bundle_name(name)
        if name not in self.names():
            known = ", ".join(self.names()) or "(none)"
            raise UnknownName(f"unknown model {name!r}; available: {known}", field="model")
        return self.root / name

    def get(self, name: str) -> Bundle:
        """The loaded bundle ``name`` (loads and verifies it on first use)."""
        with self._lock:
            if name not in self._cache:
                path = self.path(name)
                log.info("loading bundle %s from %s", name, path)
                bundle = load_bundle(path, self.device)
                bundle.hasher.set_precision(self.precision)
                self._cache[name] = bundle
            return self._cache[name]
