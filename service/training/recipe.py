"""``hashaudit train generators``: a bundle's universal patterns and all its generators from
one TOML recipe (see ``configs/default_generators.toml``), recorded in the manifest.

The recipe has a ``[patterns]`` table (:class:`~service.training.patterns.PatternConfig`
fields), a ``[defaults]`` table applied to every generator and one ``[[generator]]`` table
per generator (:class:`~service.training.generator_trainer.GeneratorConfig` fields; eps
values may be written as ``"8/255"``). Patterns are fitted first (generators with a ``base``
train on top of them). The hasher is never touched. The command and the recipe go into
``extra.generator_recipe``; every generator entry records its own config and validation
curve as well.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from pathlib import Path
from typing import Any

from service.errors import AttackInputError, ConfigError
from service.parsing import eps_value
from service.store.generator_parts import set_extra
from service.training.generator_trainer import GeneratorConfig, PrototypeConfig, train_generator
from service.training.patterns import PatternConfig, fit_patterns

log = logging.getLogger(__name__)

EPS_FIELDS = ("eps", "eps_min", "eps_max", "val_eps")


def _eps(v: Any, where: str) -> Any:
    if isinstance(v, list):
        return [_eps(x, where) for x in v]
    try:
        return eps_value(v, where)
    except AttackInputError as exc:
        raise ConfigError(exc.message, field=where) from None


def _typed(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}",
                          field=where)
    kw = {k: (_eps(v, f"{where}.{k}") if k in EPS_FIELDS else v) for k, v in table.items()}
    if "prototype" in kw:
        kw["prototype"] = _typed(PrototypeConfig, kw["prototype"], f"{where}.prototype")
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}", field=where) from None


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe as plain TOML data (checked by :func:`parse_recipe`)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist", field="config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}", field="config") from exc
    parse_recipe(data)
    return data


def parse_recipe(data: dict[str, Any]) -> tuple[PatternConfig | None, list[GeneratorConfig]]:
    """(pattern config or None, generator configs) of a recipe; errors name the table."""
    unknown = sorted(set(data) - {"patterns", "defaults", "generator"})
    if unknown:
        raise ConfigError(f"recipe: unknown tables {unknown}", field="config")
    pat = _typed(PatternConfig, data["patterns"], "patterns") if "patterns" in data else None
    defaults = dict(data.get("defaults", {}))
    gens = []
    for i, table in enumerate(data.get("generator", [])):
        gens.append(_typed(GeneratorConfig, {**defaults, **table}, f"generator[{i}]"))
    names = [g.attack for g in gens]
    if len(set(names)) != len(names):
        raise ConfigError("recipe: each attack may appear once", field="generator")
    return pat, gens


def run_recipe(bundle_path: Path, data: dict[str, Any], device: str = "auto",
               only: list[str] | None = None, skip_patterns: bool = False,
               progress: bool = True, command: str = "") -> dict[str, Any]:
    """Fit the patterns (unless skipped) and train the recipe's generators (all, or those
    named in ``only``) into the bundle; returns ``{"patterns": record, "generators":
    [entries]}``."""
    pat, gens = parse_recipe(data)
    if only:
        missing = sorted(set(only) - {g.attack for g in gens})
        if missing:
            raise ConfigError(f"--only names attacks not in the recipe: {missing}",
                              field="only")
        gens = [g for g in gens if g.attack in only]
    out: dict[str, Any] = {"patterns": None, "generators": []}
    if pat is not None and not skip_patterns:
        out["patterns"] = fit_patterns(bundle_path, pat, device=device, progress=progress)
    for cfg in gens:
        log.info("training %s", cfg.attack)
        out["generators"].append(train_generator(bundle_path, cfg, device=device,
                                                 progress=progress))
    prior = load_manifest(bundle_path).extra.get("generator_recipe") or {}
    runs = prior.get("runs", []) if prior.get("config") == data else []
    set_extra(bundle_path, "generator_recipe", {"config": data, "runs": [*runs, {
        "command": command, "only": only, "skip_patterns": skip_patterns,
        "patterns": out["patterns"] is not None,
        "generators": [g["attack"] for g in out["generators"]]}]})
    return out


def load_manifest(folder: Path) -> Any:
    from service.store.files import MANIFEST
    from service.store.manifest import Manifest

    return Manifest.from_json((folder / MANIFEST).read_text(), f"{folder.name}/{MANIFEST}")
