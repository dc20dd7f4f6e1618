"""Frozen model bundles: manifest, safetensors weights, gallery, checksums."""

from service.store.bundle import (
    Bundle,
    Gallery,
    QuerySet,
    load_bundle,
    load_hasher,
    save_bundle,
    verify_bundle,
)
from service.store.manifest import FORMAT_VERSION, Manifest
from service.store.modelstore import ModelStore

__all__ = [
    "Bundle", "Gallery", "QuerySet", "load_bundle", "load_hasher", "save_bundle", "verify_bundle",
    "FORMAT_VERSION", "Manifest", "ModelStore",
]
