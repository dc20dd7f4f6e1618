"""``hashaudit worker``: load every bundle, then run audit chunks from Redis (RQ).

One process per GPU. The worker is an RQ ``SimpleWorker`` (jobs run in this process, so
models stay loaded and CUDA is never used after a fork) with a heartbeat thread: while a
chunk runs it renews the job's lease every ``worker_heartbeat_s`` seconds, with a lease of
three beats. If the process dies (SIGKILL, OOM, power), the lease lapses within seconds and
the next maintenance pass of any live worker (every ``worker_maintenance_s``) retries the
chunk (RQ ``Retry``); chunk results are stored under a fixed key, so nothing counts twice.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from rq import SimpleWorker
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from service.config import Settings, get_settings
from service.jobs import tasks
from service.jobs.queue import QUEUE_NAME, context_from_settings

log = logging.getLogger(__name__)


class AuditWorker(SimpleWorker):
    """SimpleWorker whose job lease is short and renewed by a heartbeat thread."""

    heartbeat_interval: float = 5.0

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return max(2, int(3 * self.heartbeat_interval))

    def execute_job(self, job: Any, queue: Any) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # noqa: BLE001 - a missed beat is retried next interval
                    log.warning("heartbeat for job %s failed", job.id, exc_info=True)

        thread = threading.Thread(target=beat, name="rq-heartbeat", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join(5)
        self.set_state(WorkerStatus.IDLE)


def run_worker(settings: Settings | None = None, burst: bool = False,
               name: str | None = None) -> bool:
    """Load bundles, then work the audit queue (until SIGTERM, or the queue is empty in
    burst mode). Returns whether any job ran."""
    s = settings or get_settings()
    if not s.redis_url:
        raise SystemExit("hashaudit worker needs HASHAUDIT_REDIS_URL (e.g. redis://host:6379/0);"
                         " without Redis, `hashaudit serve` runs audits in-process")
    ctx = context_from_settings(s)
    loaded = []
    for bundle in ctx.models.names():
        try:
            ctx.models.get(bundle)
            loaded.append(bundle)
        except Exception as exc:  # noqa: BLE001 - a broken bundle must not stop the rest
            log.error("bundle %s not loaded: %s", bundle, exc)
    log.info("worker: bundles loaded: %s (device %s)", ", ".join(loaded) or "none",
             ctx.models.device)
    tasks.configure(ctx)
    AuditWorker.heartbeat_interval = s.worker_heartbeat_s
    worker = AuditWorker(
        [QUEUE_NAME], connection=ctx.audits.kv, name=name, serializer=JSONSerializer,
        maintenance_interval=max(1, int(s.worker_maintenance_s)),
        worker_ttl=max(20, int(s.worker_maintenance_s) + 15))
    return worker.work(burst=burst, logging_level="INFO")
