"""What an audit type declares (:class:`AuditType`) and what its chunk functions share.

An audit is planned as chunks (units of work with string keys), each run by a *chunk
function* on some worker, then reduced to one result JSON once every chunk is in. The
generic machinery (``service.jobs.tasks``, ``queue``, ``report``, the API route and the CLI)
knows nothing of any one type: it asks the type for each step.

The chunk function is named by a dotted string ``"package.module:function"`` (as RQ names
job functions) and imported by name only where a chunk runs (:func:`chunk_function`), so
an audit type whose chunks train models (the backdoor audit) keeps its chunk code in
``service.training`` while ``service.jobs`` never imports that package.

A chunk function is called as ``fn(ctx, audit_id, spec, chunk, progress)`` with the
process's :class:`~service.jobs.context.JobContext`, the stored spec, the chunk key and
``progress`` (None, or a callable the CLI's progress bar counts with), and returns the
chunk's result as bytes (:func:`~service.jobs.audit_store.pack_arrays`). It checks
``ctx.audits.stopped(audit_id)`` between steps and raises :class:`Cancelled` when the audit
ended; a :class:`~service.errors.HashAuditError` fails the audit with its message (bad data,
not retried); anything else is a crash, retried by RQ.
"""

from __future__ import annotations

import argparse
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from service.errors import BadInput, BundleError, ConfigError
from service.jobs.context import JobContext

# Ranges of every number an audit request carries (the API schema uses the same constants;
# values outside them are refused before anything is stored). Seeds feed numpy and torch
# generators, which take 0 .. 2**32 - 1 everywhere; counts stay far below what the store
# (JSON, 64-bit integers) can hold.
SEED_MAX = 2**32 - 1
COUNT_MAX = 10_000_000  # queries.count, top_k, backdoor.num_train, backdoor.poisons
CHUNK_MAX = 5000
BATCH_MAX = 1024

_DOTTED = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Cancelled(Exception):
    """Raised inside a chunk when its audit was cancelled or has ended (e.g. failed by another
    chunk); the chunk stores nothing."""


def int_in(value: Any, lo: int, hi: int, field: str, what: str = "an integer") -> int:
    """``value`` as an int in [lo, hi]; BadInput naming ``field`` otherwise (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise BadInput(f"{field}: {what} from {lo} to {hi}, got {shown}", field=field)
    return value


def check_bundle(ctx: JobContext, spec: dict[str, Any]) -> Any:
    """The audit's bundle, refused if it changed since the audit was submitted."""
    bundle = ctx.models.get(spec["model"])
    if bundle.sha != spec["bundle_sha"]:
        raise BundleError(f"bundle {spec['model']} changed since the audit was submitted "
                          f"(sha {bundle.sha[:12]} != {spec['bundle_sha'][:12]})", field="model")
    return bundle


def chunk_function(dotted: str) -> Callable[..., bytes]:
    """The function named ``"package.module:function"``, imported now (where a chunk runs)."""
    if not _DOTTED.match(dotted):
        raise ConfigError(f"chunk function {dotted!r}: expected 'package.module:function'",
                          field="chunk_function")
    try:
        fn = pkgutil.resolve_name(dotted)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"chunk function {dotted!r} cannot be imported here: {exc}",
                          field="chunk_function") from None
    if not callable(fn):
        raise ConfigError(f"chunk function {dotted!r} is not callable", field="chunk_function")
    return fn


@dataclass
class SpecInputs:
    """What a type's ``normalize`` may use besides the request: the audited bundle's service
    (``service.serving.BundleService``), the query limit, the audit store (uploaded query
    sets; None in the CLI) and a lookup of other served bundles by name (None: none)."""

    svc: Any
    max_queries: int
    audits: Any = None  # service.jobs.audit_store.AuditStore
    lookup: Callable[[str], Any] | None = None


class AuditType:
    """One kind of audit. Subclass it in one module, set the class attributes, implement the
    methods, and register the class (``service.jobs.audit_types.register_audit_type``).

    Class attributes:
        name: the request's ``"type"``; specs of this type carry it under ``"type"``
            (except ``attack``, the default, whose specs never did).
        title: the report's heading, e.g. ``"Robustness audit"``.
        summary: one line for the API's ``type`` field and ``hashaudit audit --help``.
        chunk_function: ``"package.module:function"`` that computes one chunk (see the module
            docstring); imported by name only where a chunk runs.
        request_fields: the top-level request fields this type reads, besides ``type``,
            ``model`` and ``seed``: name -> ``(annotation, pydantic.Field(...))``. The API
            builds its request schema from every registered type's fields and refuses a field
            of another type. Their values reach :meth:`normalize` under the same names.
        example: a request of this type, for the API's schema.
        chunk_progress: its chunks write progress inside a chunk
            (``ctx.audits.set_progress``), which :meth:`progress` then receives.
        timeout_setting: the ``Settings`` field giving the seconds one chunk job may run.
        cli_action: ``hashaudit audit <cli_action>`` runs this type in-process.
        cli_help: that command's one line in ``hashaudit --help``.
        cli_out: that command's default output folder.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]
    chunk_function: ClassVar[str]
    request_fields: ClassVar[dict[str, tuple[Any, Any]]] = {}
    example: ClassVar[dict[str, Any]] = {}
    chunk_progress: ClassVar[bool] = False
    timeout_setting: ClassVar[str] = "chunk_timeout"
    cli_action: ClassVar[str]
    cli_help: ClassVar[str]
    cli_out: ClassVar[str] = "audit_out"

    # ---- spec and plan

    def normalize(self, raw: dict[str, Any], inputs: SpecInputs) -> dict[str, Any]:
        """Check a request (``raw``: ``seed``, ``model`` and this type's request fields)
        against the bundle and return the full spec the chunks run: JSON, with ``model``,
        ``bundle_version``, ``bundle_sha`` and ``seed``. Errors are
        :class:`~service.errors.HashAuditError` naming the field."""
        raise NotImplementedError

    def chunk_keys(self, spec: dict[str, Any]) -> list[str]:
        """Every chunk of the audit, each after the chunks it depends on."""
        raise NotImplementedError

    def depends_on(self, spec: dict[str, Any], chunk: str) -> list[str]:
        """Chunks whose results ``chunk`` reads (it runs after they are stored)."""
        return []

    def job_timeout(self, settings: Any) -> int:
        return int(getattr(settings, self.timeout_setting))

    # ---- results

    def reduce(self, ctx: JobContext, audit_id: str, spec: dict[str, Any],
               chunks: dict[str, bytes]) -> dict[str, Any]:
        """Every chunk's stored bytes (by key) -> the audit's result (JSON)."""
        raise NotImplementedError

    def progress(self, spec: dict[str, Any], done: list[str],
                 inside: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """``GET /audit/{id}``'s ``progress`` (``done_chunks`` and ``total_chunks`` are added):
        ``done`` lists the stored chunks, ``inside`` the progress running chunks wrote."""
        return {}

    def progress_text(self, progress: dict[str, Any]) -> str:
        """One phrase for an unfinished report, e.g. ``"12 / 60 images done"``."""
        return f"{progress['done_chunks']} / {progress['total_chunks']} chunks done"

    def report_body(self, audit_id: str, result: dict[str, Any], json_href: str) -> str:
        """The finished report's HTML below its heading (``audit_types.html`` has the shared
        pieces: provenance line, JSON link, images, tables)."""
        raise NotImplementedError

    def frozen_bundles(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        """Bundles the audit froze (``name``, ``path``, ``host``, ``sha``, ``version``), which
        ``GET /audit/{id}/bundles/{name}`` serves."""
        return []

    # ---- the command line (``hashaudit audit <cli_action>``)

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        """This type's options (``--bundle``, ``--store``, ``--device``, ``--out`` and
        ``--no-progress`` are common). Each option's help ends with its default."""

    def cli_request(self, args: argparse.Namespace) -> dict[str, Any]:
        """The parsed options as a request (what :meth:`normalize` receives)."""
        raise NotImplementedError

    def cli_total(self, spec: dict[str, Any]) -> tuple[int, str]:
        """The progress bar's total and unit (what chunk functions count with ``progress``)."""
        return len(self.chunk_keys(spec)), "chunk"

    def cli_summary(self, result: dict[str, Any]) -> list[str]:
        """Lines printed when the audit is done."""
        return []
