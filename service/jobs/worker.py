"""``hashaudit worker``: load every bundle, then run audit chunks from Redis (RQ).

One process per GPU. The worker is an RQ ``SimpleWorker`` (jobs run in this process, so
models stay loaded and CUDA is never used after a fork) with a heartbeat thread.

Dead workers. While a chunk runs, the heartbeat thread renews the job's lease every
``worker_heartbeat_s`` seconds, with a lease of three beats. The same thread (and the idle
loop) runs the queue maintenance every ``worker_maintenance_s`` seconds, so a busy worker
also looks for chunks of dead workers: if a process dies (SIGKILL, OOM, power) its lease
lapses and the chunk is retried within ``3 * heartbeat + maintenance`` seconds, at the front
of the queue (``Retry(enqueue_at_front=True)``). Chunk results are stored under a fixed key,
so nothing counts twice.

Redis outages. The worker never quits because Redis is unreachable: a running chunk keeps
computing and its writes wait for Redis (:mod:`service.jobs.outage`); missed heartbeats and
maintenance passes are skipped; RQ's idle loop reconnects with backoff. When RQ's own
bookkeeping around a job fails in an outage, the job is put back at the front of the queue
once Redis is back (its stored result, if any, makes the rerun a no-op). No maintenance
runs until Redis has been back for a full lease, so that workers whose heartbeats failed in
the same outage renew their leases before anyone takes their chunks for dead. Logs: one line
when an outage starts, a reminder a minute, one when it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rq import SimpleWorker
from rq.job import JobStatus
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus
from rq.worker_registration import clean_worker_registry

from service.config import Settings, get_settings
from service.jobs.audit_types import load_plugins
from service.jobs.context import configure, context_from_settings
from service.jobs.outage import OUTAGE, TRANSIENT, RateLimitFilter, retry, wait_until_up
from service.jobs.queue import QUEUE_NAME

log = logging.getLogger(__name__)

# RQ's idle loop logs each reconnect attempt; these lines are let through once a minute.
_RQ_NOISE = RateLimitFilter(("could not connect to Redis", "pubsub thread"))


class AuditWorker(SimpleWorker):
    """SimpleWorker with a short lease renewed by a heartbeat thread, maintenance while busy,
    and no exit on Redis outages."""

    heartbeat_interval: float = 2.0
    max_connection_wait_time = 5.0  # RQ's idle-loop reconnect backoff stops growing here

    @property
    def lease_s(self) -> int:
        return max(2, int(round(3 * self.heartbeat_interval)))

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return self.lease_s

    # ---- maintenance: dead workers' chunks back to the front of the queue

    @property
    def should_run_maintenance_tasks(self) -> bool:
        if OUTAGE.down or OUTAGE.up_for() < self.lease_s + 1:
            return False  # let every worker renew its lease after an outage first
        return bool(super().should_run_maintenance_tasks)

    def run_maintenance_tasks(self) -> None:
        try:
            self.clean_registries()
        except TRANSIENT as exc:
            OUTAGE.failed(exc, "cleaning the queue registries")
        else:
            OUTAGE.ok()

    def clean_registries(self) -> None:
        """RQ's registry cleanup (abandoned jobs are retried at the front of the queue) under
        a lock that lapses by itself within one maintenance interval: RQ's own lock lasts
        15 minutes, so a worker killed or cut off while holding it would stop every
        recovery for that long."""
        ttl = max(2, int(self.maintenance_interval))
        for queue in self.queues:
            lock = queue.registry_cleaning_key
            if not self.connection.set(lock, self.name, nx=True, ex=ttl):
                continue
            clean_registries(queue, self._exc_handlers)
            clean_worker_registry(queue)
            queue.intermediate_queue.cleanup(self, queue)
            holder = self.connection.get(lock)
            if holder is not None and holder.decode() == self.name:
                self.connection.delete(lock)
        self.last_cleaned_at = _utcnow()

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except TRANSIENT as exc:
            OUTAGE.failed(exc, "checking for suspension")

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        try:
            super().heartbeat(timeout)
        except TRANSIENT as exc:
            OUTAGE.failed(exc, "renewing the worker's heartbeat")

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, thread: Any) -> None:
        if isinstance(exc, TRANSIENT):
            OUTAGE.failed(exc, "listening for commands")
            time.sleep(2.0)
            return
        super()._pubsub_exception_handler(exc, pubsub, thread)

    def teardown(self) -> None:
        try:
            super().teardown()
        except TRANSIENT as exc:
            log.warning("worker %s: could not record its exit in Redis (%s)", self.name, exc)

    # ---- running a job

    def execute_job(self, job: Any, queue: Any) -> None:
        execution = retry(self.prepare_execution, job, doing="starting a job")
        stop = threading.Event()
        last_maintenance = time.monotonic()

        def beat() -> None:
            nonlocal last_maintenance
            while not stop.wait(self.heartbeat_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except TRANSIENT as exc:
                    OUTAGE.failed(exc, "renewing a job's lease")
                    continue
                except Exception:  # noqa: BLE001 - a missed beat is retried next interval
                    log.warning("heartbeat for job %s failed", job.id, exc_info=True)
                    continue
                OUTAGE.ok()
                if (time.monotonic() - last_maintenance >= self.maintenance_interval
                        and self.should_run_maintenance_tasks):
                    last_maintenance = time.monotonic()
                    self.run_maintenance_tasks()

        thread = threading.Thread(target=beat, name="rq-heartbeat", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        except TRANSIENT as exc:
            # RQ's bookkeeping before or after the chunk could not reach Redis.
            OUTAGE.failed(exc, f"recording the end of job {job.id}")
            stop.set()
            self._requeue_after_outage(job, queue)
        finally:
            stop.set()
            thread.join(5)
        retry(self.set_state, WorkerStatus.IDLE, doing="recording the worker idle")

    def _requeue_after_outage(self, job: Any, queue: Any) -> None:
        """Once Redis is back: a job whose start or end could not be recorded goes back to
        the front of the queue, unless RQ recorded its end after all or it is queued already.
        The rerun finds the chunk's stored result (when the chunk got that far) and only
        completes the bookkeeping."""
        wait_until_up(self.connection, doing=f"recording the end of job {job.id}")
        status = retry(job.get_status, refresh=True)
        if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED,
                      JobStatus.SCHEDULED, JobStatus.DEFERRED):
            log.info("job %s is %s after the outage", job.id, status)
            return
        registry = StartedJobRegistry(queue.name, connection=self.connection,
                                      serializer=self.serializer)

        def requeue() -> bool:
            if job.id in queue.get_job_ids():
                return False
            with self.connection.pipeline() as pipe:
                for entry in self.connection.zrange(registry.key, 0, -1):
                    entry = entry.decode() if isinstance(entry, bytes) else entry
                    if registry.parse_job_id(entry) == job.id:
                        pipe.zrem(registry.key, entry)
                pipe.lrem(queue.intermediate_queue_key, 0, job.id)
                job.started_at = None
                job.ended_at = None
                queue._enqueue_job(job, pipeline=pipe, at_front=True)
                pipe.execute()
            return True

        if retry(requeue, doing=f"requeueing job {job.id}"):
            log.warning("job %s put back at the front of the queue after a Redis outage",
                        job.id)


def _utcnow() -> Any:
    from rq.utils import now

    return now()


def run_worker(settings: Settings | None = None, burst: bool = False,
               name: str | None = None) -> bool:
    """Load bundles, then work the audit queue (until SIGTERM, or the queue is empty in
    burst mode). Returns whether any job ran."""
    s = settings or get_settings()
    if not s.redis_url:
        raise SystemExit("hashaudit worker needs HASHAUDIT_REDIS_URL (e.g. redis://host:6379/0);"
                         " without Redis, `hashaudit serve` runs audits in-process")
    load_plugins(s.plugin_list)
    ctx = context_from_settings(s)
    loaded = []
    for bundle in ctx.models.names():
        try:
            ctx.models.get(bundle)
            loaded.append(bundle)
        except Exception as exc:  # noqa: BLE001 - a broken bundle must not stop the rest
            log.error("bundle %s not loaded: %s", bundle, exc)
    log.info("worker: bundles loaded: %s (device %s, %s)", ", ".join(loaded) or "none",
             ctx.models.device, ctx.models.precision)
    configure(ctx)
    AuditWorker.heartbeat_interval = s.worker_heartbeat_s
    wait_until_up(ctx.audits.kv, doing="starting the worker")
    logging.getLogger("rq.worker").addFilter(_RQ_NOISE)
    worker = AuditWorker(
        [QUEUE_NAME], connection=ctx.audits.kv, name=name, serializer=JSONSerializer,
        maintenance_interval=max(1, int(round(s.worker_maintenance_s))),
        worker_ttl=max(20, int(s.worker_maintenance_s) + 15))
    return worker.work(burst=burst, logging_level="INFO")
