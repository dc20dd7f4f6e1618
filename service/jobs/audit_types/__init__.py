"""Audit types, all behind one registry (``AUDIT_TYPES``); names are the request's ``"type"``.

Register, don't branch: the queue, the tasks, the reports, the API and the CLI ask the
audit's type (:func:`type_of`) for every step that differs between types
(:class:`~service.jobs.audit_types.base.AuditType`). A new type is one module with an
``AuditType`` subclass plus one ``register_audit_type`` line below; a type kept outside this
package registers itself when imported, and ``HASHAUDIT_PLUGINS`` names the modules that
``serve``, ``worker`` and ``audit`` import at start (:func:`load_plugins`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from service.errors import ConfigError
from service.jobs.audit_types.attack import AttackAudit
from service.jobs.audit_types.backdoor import BackdoorAudit
from service.jobs.audit_types.base import (
    AuditType,
    Cancelled,
    SpecInputs,
    check_bundle,
    chunk_function,
)
from service.jobs.audit_types.harden import HardenAudit
from service.registry import Registry

AUDIT_TYPES: Registry[AuditType] = Registry("audit type")
DEFAULT_TYPE = "attack"  # requests and specs without a "type"


def register_audit_type(cls: type[AuditType]) -> type[AuditType]:
    """Register an ``AuditType`` subclass under its ``name`` (names are unique)."""
    AUDIT_TYPES.register(cls.name)(cls)
    return cls


# The built-in types, registered here and nowhere else.
register_audit_type(AttackAudit)
register_audit_type(BackdoorAudit)
register_audit_type(HardenAudit)


def audit_type(name: str) -> AuditType:
    """The registered type ``name``; UnknownName (field ``type``) listing the known ones."""
    return AUDIT_TYPES.get(name, field="type")()


def type_of(spec: dict[str, Any]) -> AuditType:
    """The type of a stored spec (specs without ``"type"`` are attack audits)."""
    return audit_type(spec.get("type", DEFAULT_TYPE))


def audit_types() -> list[AuditType]:
    """Every registered type, by name."""
    return [audit_type(n) for n in AUDIT_TYPES.names()]


def load_plugins(modules: Iterable[str]) -> None:
    """Import each module named (``HASHAUDIT_PLUGINS``); importing one registers its types.
    A module imported before is not imported again."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"HASHAUDIT_PLUGINS: cannot import {name!r} ({exc})",
                              field="plugins") from None


__all__ = [
    "AUDIT_TYPES", "DEFAULT_TYPE", "AuditType", "Cancelled", "SpecInputs", "audit_type",
    "audit_types", "check_bundle", "chunk_function", "load_plugins", "register_audit_type",
    "type_of",
]
