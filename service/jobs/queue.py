"""Submitting, tracking and cancelling audits; the RQ queue and the in-process runner.

``AuditQueue`` is what the API and the CLI talk to. It stores the audit record, then hands
every chunk to a runner:

* ``RQRunner`` (``HASHAUDIT_REDIS_URL`` set): one RQ job per chunk on the ``hashaudit`` queue,
  with ``Retry`` so that the job of a worker that died is run again by another worker;
* ``LocalRunner`` (no Redis): a thread in this process runs the same ``run_chunk`` calls in
  order; ``run_now`` runs them inline (the CLI).
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from service.config import Settings
from service.jobs import tasks
from service.jobs.audit_store import FINAL, AuditStore
from service.jobs.audit_types import DEFAULT_TYPE, type_of
from service.jobs.context import JobContext, configure, context_from_settings
from service.jobs.kv import MemoryKV
from service.jobs.outage import TRANSIENT

log = logging.getLogger(__name__)

QUEUE_NAME = "hashaudit"


class LocalRunner:
    """Runs chunks on one background thread in this process (single-machine mode)."""

    def __init__(self) -> None:
        self._q: queue_mod.Queue[tuple[str, str] | None] = queue_mod.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="audit-runner", daemon=True)
            self._thread.start()

    def stop(self, join_s: float = 30.0) -> None:
        """Let the thread end after its chunk; wait for it at most ``join_s`` (a daemon: an
        in-process audit still running when the server exits is lost with the process)."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(join_s)
            self._thread = None

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                tasks.run_chunk(*item)
            except Exception:  # noqa: BLE001 - run_chunk records failures itself
                log.exception("audit chunk %s failed", item)

    def enqueue(self, audit_id: str, chunks: list[str], spec: dict[str, Any],
                create: Callable[[Any], None]) -> None:
        create(None)
        self.start()
        for c in chunks:
            self._q.put((audit_id, c))

    def cancel(self, audit_id: str, chunks: list[str]) -> int:
        return 0  # queued chunks see the cancel flag and skip themselves

    def depth(self) -> int | None:
        return self._q.qsize()

    def failed(self, audit_id: str, chunks: list[str]) -> list[tuple[str, str]]:
        return []  # run_chunk records every failure itself in this process

    def healthy(self) -> bool:
        return True


class RQRunner:
    """One RQ job per chunk, retried when its worker dies."""

    def __init__(self, connection: Any, settings: Settings) -> None:
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.connection = connection
        self.settings = settings
        self.queue = Queue(QUEUE_NAME, connection=connection, serializer=JSONSerializer)

    @staticmethod
    def job_id(audit_id: str, chunk: str) -> str:
        return f"audit-{audit_id}-" + chunk.replace("|", "-")

    def enqueue(self, audit_id: str, chunks: list[str], spec: dict[str, Any],
                create: Callable[[Any], None]) -> None:
        """One job per chunk, with an RQ dependency on each chunk its type says it reads.

        ``create(pipe)`` writes the audit record. When no chunk depends on another it goes
        into the same MULTI/EXEC transaction as the jobs: if Redis goes away mid-submit,
        either the audit and all its chunks exist or nothing does (no audit left queued
        without jobs). Jobs with dependencies are enqueued one by one, in plan order (RQ
        checks each dependency as it enqueues). A retried chunk (its worker died, or it
        failed) goes to the front of the queue, so an audit in progress is not delayed
        behind every audit queued after it."""
        from rq import Retry

        s = self.settings
        kind = type_of(spec)
        timeout = kind.job_timeout(s)

        def put(c: str, pipe: Any = None) -> None:
            deps = [self.job_id(audit_id, d) for d in kind.depends_on(spec, c)]
            self.queue.enqueue_call(
                tasks.run_chunk, args=(audit_id, c), job_id=self.job_id(audit_id, c),
                timeout=timeout, depends_on=deps or None,
                retry=(Retry(max=s.chunk_retries, enqueue_at_front=True)
                       if s.chunk_retries > 0 else None),
                result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
                description=f"audit {audit_id} chunk {c}", pipeline=pipe)

        if any(kind.depends_on(spec, c) for c in chunks):
            create(None)
            for c in chunks:
                put(c)
            return
        with self.connection.pipeline() as pipe:
            for c in chunks:
                put(c, pipe)
            create(pipe)  # after the jobs: RQ's enqueue WATCHes before it queues commands
            pipe.execute()

    def failed(self, audit_id: str, chunks: list[str]) -> list[tuple[str, str]]:
        """Chunks whose job failed for good (retries used up), with the last error line."""
        from rq.job import Job, JobStatus
        from rq.serializers import JSONSerializer

        ids = [self.job_id(audit_id, c) for c in chunks]
        out = []
        for c, job in zip(chunks, Job.fetch_many(ids, connection=self.connection,
                                                 serializer=JSONSerializer), strict=True):
            if job is not None and job.get_status(refresh=False) == JobStatus.FAILED:
                result = job.latest_result()
                lines = ((result.exc_string if result is not None else "") or "").strip()
                last = lines.splitlines()[-1] if lines else "worker lost"
                out.append((c, f"failed after {self.settings.chunk_retries} retries ({last})"))
        return out

    def cancel(self, audit_id: str, chunks: list[str]) -> int:
        """Drop the audit's queued jobs (running ones stop at their next batch)."""
        from rq.job import Job
        from rq.serializers import JSONSerializer

        ids = [self.job_id(audit_id, c) for c in chunks]
        dropped = 0
        for job in Job.fetch_many(ids, connection=self.connection,
                                  serializer=JSONSerializer):
            if job is not None and job.get_status() in ("queued", "scheduled", "deferred"):
                job.cancel()
                dropped += 1
        return dropped

    def depth(self) -> int | None:
        """Queued chunks; None while Redis is unreachable."""
        try:
            return len(self.queue)
        except TRANSIENT:
            return None

    def healthy(self) -> bool:
        try:
            return bool(self.connection.ping())
        except Exception:  # noqa: BLE001 - any failure means not reachable
            return False


class AuditQueue:
    """Create, run, track and cancel audits (API and CLI)."""

    def __init__(self, ctx: Any, runner: Any) -> None:
        self.ctx = ctx
        self.runner = runner

    @property
    def store(self) -> AuditStore:
        return self.ctx.audits

    def submit(self, spec: dict[str, Any]) -> str:
        audit_id = uuid.uuid4().hex[:16]
        chunks = type_of(spec).chunk_keys(spec)
        self.runner.enqueue(audit_id, chunks, spec,
                            lambda kv: self.store.create(audit_id, spec, len(chunks), kv=kv))
        log.info("audit %s: %d chunks queued (%s)", audit_id, len(chunks),
                 type(self.runner).__name__)
        return audit_id

    def run_now(self, spec: dict[str, Any], progress: Callable[[int], None] | None = None) -> str:
        """Run an audit inline in this process (the CLI); same task code as the workers."""
        audit_id = uuid.uuid4().hex[:16]
        chunks = type_of(spec).chunk_keys(spec)
        st = self.store
        st.create(audit_id, spec, len(chunks))
        st.mark_running(audit_id)
        for c in chunks:
            try:
                data = tasks.compute_chunk(self.ctx, audit_id, spec, c, progress=progress)
            except Exception as exc:
                st.finish(audit_id, "failed", error=f"chunk {c}: {exc}")
                raise
            st.put_chunk(audit_id, c, data)
        tasks.maybe_reduce(audit_id)
        return audit_id

    def cancel(self, audit_id: str) -> dict[str, Any]:
        rec = self.store.record(audit_id)
        if rec["state"] in FINAL:
            return self.status(audit_id)
        self.store.cancel(audit_id)
        self.store.finish(audit_id, "cancelled", error="cancelled by request")
        dropped = self.runner.cancel(audit_id, type_of(rec["spec"]).chunk_keys(rec["spec"]))
        log.info("audit %s cancelled; %d queued chunks dropped", audit_id, dropped)
        return self.status(audit_id)

    def status(self, audit_id: str, with_result: bool = True) -> dict[str, Any]:
        rec = self.store.record(audit_id)
        spec = rec["spec"]
        kind = type_of(spec)
        done = self.store.done_chunks(audit_id)
        if rec["state"] not in FINAL and self._reconcile(audit_id, spec, done):
            rec = self.store.record(audit_id)
        inside = self.store.progress(audit_id) if kind.chunk_progress else {}
        progress = kind.progress(spec, done, inside)
        progress.update(done_chunks=len(done), total_chunks=rec["n_chunks"])
        now = time.time()
        started, finished_at = rec["started_at"], rec["finished_at"]
        out = {
            "id": audit_id, "type": spec.get("type", DEFAULT_TYPE), "state": rec["state"],
            "error": rec["error"], "model": spec["model"],
            "methods": spec.get("methods", []), "eps": spec.get("eps", []),
            "progress": progress,
            "timings": {
                "created_at": rec["created_at"], "started_at": started,
                "finished_at": finished_at,
                "queued_s": (started or finished_at or now) - rec["created_at"],
                "running_s": ((finished_at or now) - started) if started else None,
            },
            "spec": spec,
            "links": {"self": f"/audit/{audit_id}", "report": f"/audit/{audit_id}/report"},
        }
        if with_result:
            out["result"] = rec["result"]
        return out

    def _reconcile(self, audit_id: str, spec: dict[str, Any], done: list[str]) -> bool:
        """Fail the audit when a chunk's job failed for good (its retries used up), so an
        audit never stays running forever. True if it changed the record."""
        finished = set(done)
        pending = [c for c in type_of(spec).chunk_keys(spec) if c not in finished]
        if not pending:
            return False
        failed = self.runner.failed(audit_id, pending)
        if not failed:
            return False
        chunk, why = failed[0]
        return self.store.finish(audit_id, "failed", error=f"chunk {chunk}: {why}")


def make_audit_queue(settings: Settings, models: Any) -> AuditQueue:
    """Redis + RQ when ``redis_url`` is set, else the in-process runner."""
    ctx = context_from_settings(settings, models)
    configure(ctx)
    if settings.redis_url:
        return AuditQueue(ctx, RQRunner(ctx.audits.kv, settings))
    return AuditQueue(ctx, LocalRunner())


def run_local_audit(models: Any, spec: dict[str, Any], max_pixels: int = 4096 * 4096,
                    progress: Callable[[int], None] | None = None,
                    artifact_dir: Any = None) -> tuple[AuditQueue, str]:
    """Run ``spec`` inline in this process, without Redis (CLI, benchmarks).

    Returns the queue (for ``status``) and the audit id.
    """
    ctx = JobContext(models=models, audits=AuditStore(MemoryKV()), max_pixels=max_pixels,
                           artifact_dir=artifact_dir)
    configure(ctx)
    queue = AuditQueue(ctx, LocalRunner())
    return queue, queue.run_now(spec, progress=progress)
