"""The bundle manifest: a frozen record of what a bundle holds and how it was made."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from service.errors import BundleError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json`` (see docs/architecture.md for every field).

    Attributes:
        name: bundle name (the folder name under ``model_store/``).
        version: the bundle's own version string, bumped when it is rebuilt.
        created_at: ISO-8601 UTC time of creation.
        package_version / torch_version: versions that wrote it.
        training: the command and the full config that produced it.
        dataset: data set name, source, class names, split record and sizes.
        input: channels, height, width, value range and normalisation of model input.
        hasher: family (loss), arch, arch kwargs, bits, classifier classes, weights file.
        generators: one entry per trained attack generator (attack, arch, kwargs, eps,
            target hasher sha, weights file).
        evaluation: protocol and clean retrieval figures.
        files: every payload file with its sha256 and size in bytes.
        extra: room for later additions (flags such as ``poisoned``).
    """

    name: str
    version: str
    created_at: str
    package_version: str
    torch_version: str
    training: dict[str, Any]
    dataset: dict[str, Any]
    input: dict[str, Any]
    hasher: dict[str, Any]
    generators: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset["class_names"])

    @property
    def bits(self) -> int:
        return int(self.hasher["bits"])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise BundleError(f"{where} must hold a JSON object")
        fv = raw.get("format_version")
        if fv != FORMAT_VERSION:
            raise BundleError(
                f"{where} has format_version {fv!r}; this hashaudit reads format_version "
                f"{FORMAT_VERSION}. Rebuild the bundle with `hashaudit train bundle`."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in raw and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise BundleError(f"{where} lacks required fields: {missing}")
        unknown = sorted(set(raw) - names)
        if unknown:
            raise BundleError(f"{where} has unknown fields: {unknown}")
        return cls(**raw)
