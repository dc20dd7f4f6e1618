"""Audit specs: a request checked against a bundle by its audit type (shared by the API and
the CLI). What each type accepts is in its module under ``service.jobs.audit_types``."""

from __future__ import annotations

from typing import Any

from service.config import get_settings
from service.jobs.audit_types import DEFAULT_TYPE, SpecInputs, audit_type


def normalize_spec(svc: Any, raw: dict[str, Any], *, max_queries: int | None = None,
                   audits: Any = None, lookup: Any = None) -> dict[str, Any]:
    """Check a request against the bundle and return the full spec the chunks run.

    ``svc`` is the audited bundle's ``BundleService``; ``raw`` holds ``type`` (default
    ``attack``), ``seed`` and the type's own fields; ``audits`` (the audit store) resolves
    uploaded query sets and ``lookup(name)`` other served bundles; ``max_queries`` defaults
    to ``HASHAUDIT_MAX_AUDIT_QUERIES``. Errors name the field.
    """
    name = raw.get("type") or DEFAULT_TYPE
    kind = audit_type(name)
    if max_queries is None:
        max_queries = get_settings().max_audit_queries
    spec = kind.normalize(raw, SpecInputs(svc=svc, max_queries=max_queries, audits=audits,
                                          lookup=lookup))
    if spec.get("type", DEFAULT_TYPE) != name:
        raise RuntimeError(f"audit type {name}: its spec says type {spec.get('type')!r}")
    return spec
