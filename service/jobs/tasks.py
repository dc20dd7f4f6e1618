"""An audit chunk's life: ``run_chunk`` (the RQ job), ``compute_chunk`` and the reduce step.

These know no audit type: the chunk's computation is the type's chunk function (named by a
dotted string, imported here by name), the reduce is the type's ``reduce``. Both entry points
are plain functions, strings in and a JSON-able dict out, so RQ can run them in any worker
process and the in-process runner calls them directly. They reach bundles and the audit
store through :func:`~service.jobs.context.context`, which a process sets up once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from service.errors import HashAuditError
from service.jobs.audit_store import FINAL
from service.jobs.audit_types import Cancelled, chunk_function, type_of
from service.jobs.context import JobContext, context
from service.jobs.outage import TRANSIENT, retry

log = logging.getLogger(__name__)


def compute_chunk(ctx: JobContext, audit_id: str, spec: dict[str, Any], chunk: str,
                  progress: Callable[[int], Any] | None = None) -> bytes:
    """Run one chunk with its type's chunk function; returns its packed result."""
    fn = chunk_function(type_of(spec).chunk_function)
    return fn(ctx, audit_id, spec, chunk, progress)


def run_chunk(audit_id: str, chunk: str) -> dict[str, Any]:
    """RQ entry point: run one chunk unless done, cancelled or failed; then maybe reduce.

    Bad data (HashAuditError, e.g. a corrupt uploaded image) fails the audit with the
    message; the job itself ends normally so it is not retried. A crash (worker killed)
    leaves nothing stored, and RQ's retry runs the chunk again.

    Redis may go away at any time (a restart, a network cut): the chunk keeps computing,
    and every read and write of the audit store here is retried until Redis answers again
    (:func:`service.jobs.outage.retry`). The writes are idempotent (the chunk result goes to
    a fixed hash field; the reduce lock belongs to this call), so a write repeated after an
    outage never counts twice.
    """
    ctx = context()
    st = ctx.audits
    state = retry(st.state, audit_id, doing="reading an audit")
    if state is None:
        return {"chunk": chunk, "skipped": "unknown audit"}
    if state in FINAL or retry(st.cancelled, audit_id, doing="reading an audit"):
        return {"chunk": chunk, "skipped": state}
    if not retry(st.has_chunk, audit_id, chunk, doing="reading an audit"):
        retry(st.mark_running, audit_id, doing="marking an audit running")
        spec = retry(st.spec, audit_id, doing="reading an audit")
        t0 = time.perf_counter()
        try:
            data = compute_chunk(ctx, audit_id, spec, chunk)
        except Cancelled:
            return {"chunk": chunk, "skipped": "stopped"}
        except HashAuditError as exc:
            retry(st.finish, audit_id, "failed", error=f"chunk {chunk}: {exc.message}",
                  doing="failing an audit")
            return {"chunk": chunk, "failed": exc.message}
        retry(st.put_chunk, audit_id, chunk, data, doing=f"storing chunk {chunk}")
        log.info("audit %s chunk %s done in %.2f s", audit_id, chunk, time.perf_counter() - t0)
    maybe_reduce(audit_id)
    return {"chunk": chunk, "done": True}


def maybe_reduce(audit_id: str) -> bool:
    """Reduce once every chunk is in (one process wins the lock); True if it reduced.

    Retried as a whole after a Redis outage; the retry holds the same lock token, so an
    interrupted reduce resumes at once instead of waiting for its own lock to expire."""
    return retry(_maybe_reduce, audit_id, uuid.uuid4().hex, doing="reducing an audit")


def _maybe_reduce(audit_id: str, token: str) -> bool:
    ctx = context()
    st = ctx.audits
    rec = st.record(audit_id)
    if rec["state"] in FINAL or len(st.done_chunks(audit_id)) < rec["n_chunks"]:
        return False
    if not st.take_reduce_lock(audit_id, token):
        return False
    try:
        result = reduce_audit(ctx, audit_id, rec["spec"])
    except TRANSIENT:
        raise  # Redis went away: retried with the lock still ours
    except Exception as exc:  # noqa: BLE001 - the audit must end, never hang
        log.exception("audit %s: reduce failed", audit_id)
        st.finish(audit_id, "failed", error=f"reduce: {type(exc).__name__}: {exc}")
    else:
        st.finish(audit_id, "done", result=result)
    st.release_reduce_lock(audit_id, token)
    return True


def reduce_audit(ctx: JobContext, audit_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Every stored chunk -> the audit's result, by its type's ``reduce``."""
    kind = type_of(spec)
    chunks = ctx.audits.chunks(audit_id)
    missing = [k for k in kind.chunk_keys(spec) if k not in chunks]
    if missing:
        raise RuntimeError(f"chunks missing at reduce: {missing[:5]}")
    return kind.reduce(ctx, audit_id, spec, chunks)
