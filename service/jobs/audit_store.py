"""Audit state in Redis (or :class:`~service.jobs.kv.MemoryKV`): spec, state, chunk results.

Keys (``P`` = prefix, default ``hashaudit``)::

    P:audits                   sorted set of audit ids by creation time
    P:audit:<id>               hash: spec, state, created_at, started_at, finished_at,
                               error, n_chunks, result (JSON when done)
    P:audit:<id>:chunks        hash: chunk key -> chunk result (npz bytes); HSET of the same
                               key replaces, so a chunk that runs twice never counts twice
    P:audit:<id>:progress      hash: chunk key -> JSON progress inside a long chunk (epochs)
    P:audit:<id>:cancel        set when the audit is cancelled
    P:audit:<id>:reduce        lock taken by the one process that reduces
    P:upload:<id>              hash: uploaded query set (labels, names, file bytes)

States: queued -> running -> done | failed | cancelled.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np

from service.errors import UnknownName
from service.jobs.outage import OUTAGE, TRANSIENT

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
KEEP_SECONDS = 30 * 24 * 3600  # audits expire after 30 days


def pack_arrays(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bytes:
    """numpy arrays + JSON meta -> npz bytes (no pickles)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                        **arrays)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
        meta = json.loads(z["__meta__"].tobytes().decode())
    return arrays, meta


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class AuditStore:
    """Reads and writes audit records; every method is one or a few atomic commands."""

    def __init__(self, kv: Any, prefix: str = "hashaudit") -> None:
        self.kv = kv
        self.prefix = prefix

    def key(self, audit_id: str, part: str = "") -> str:
        return f"{self.prefix}:audit:{audit_id}" + (f":{part}" if part else "")

    # ---- records

    def create(self, audit_id: str, spec: dict[str, Any], n_chunks: int,
               kv: Any = None) -> None:
        """Write a new audit record (into ``kv``, e.g. a Redis transaction, when given)."""
        kv = self.kv if kv is None else kv
        now = time.time()
        kv.hset(self.key(audit_id), mapping={
            "spec": json.dumps(spec), "state": "queued", "created_at": now,
            "n_chunks": n_chunks})
        kv.expire(self.key(audit_id), KEEP_SECONDS)
        kv.zadd(f"{self.prefix}:audits", {audit_id: now})

    def exists(self, audit_id: str) -> bool:
        return bool(self.kv.exists(self.key(audit_id)))

    def record(self, audit_id: str) -> dict[str, Any]:
        raw = self.kv.hgetall(self.key(audit_id))
        if not raw:
            raise UnknownName(f"audit: no audit {audit_id!r}", field="audit")
        r = {_s(k): _s(v) for k, v in raw.items()}
        out: dict[str, Any] = {
            "id": audit_id, "state": r.get("state"), "spec": json.loads(r["spec"]),
            "n_chunks": int(r.get("n_chunks", 0)), "error": r.get("error"),
        }
        for k in ("created_at", "started_at", "finished_at"):
            out[k] = float(r[k]) if r.get(k) else None
        out["result"] = json.loads(r["result"]) if r.get("result") else None
        return out

    def state(self, audit_id: str) -> str | None:
        return _s(self.kv.hget(self.key(audit_id), "state"))

    def spec(self, audit_id: str) -> dict[str, Any]:
        raw = self.kv.hget(self.key(audit_id), "spec")
        if raw is None:
            raise UnknownName(f"audit: no audit {audit_id!r}", field="audit")
        return json.loads(_s(raw))

    def mark_running(self, audit_id: str) -> None:
        """queued -> running, recording the first start (idempotent: safe to repeat)."""
        self.kv.hsetnx(self.key(audit_id), "started_at", time.time())
        if self.state(audit_id) == "queued":
            self.kv.hset(self.key(audit_id), "state", "running")

    def finish(self, audit_id: str, state: str, result: dict[str, Any] | None = None,
               error: str | None = None) -> bool:
        """Set a final state unless one is set already (first writer wins)."""
        if self.state(audit_id) in FINAL:
            return False
        mapping: dict[str, Any] = {"state": state, "finished_at": time.time()}
        if result is not None:
            mapping["result"] = json.dumps(result)
        if error is not None:
            mapping["error"] = error
        self.kv.hset(self.key(audit_id), mapping=mapping)
        return True

    def list(self, limit: int = 100) -> list[str]:
        return [_s(x) for x in self.kv.zrevrange(f"{self.prefix}:audits", 0, limit - 1)]

    # ---- chunks

    def put_chunk(self, audit_id: str, chunk: str, data: bytes) -> None:
        self.kv.hset(self.key(audit_id, "chunks"), chunk, data)
        self.kv.expire(self.key(audit_id, "chunks"), KEEP_SECONDS)

    def has_chunk(self, audit_id: str, chunk: str) -> bool:
        return bool(self.kv.hexists(self.key(audit_id, "chunks"), chunk))

    def done_chunks(self, audit_id: str) -> list[str]:
        return sorted(_s(k) for k in self.kv.hkeys(self.key(audit_id, "chunks")))

    def get_chunk(self, audit_id: str, chunk: str) -> bytes | None:
        return self.kv.hget(self.key(audit_id, "chunks"), chunk)

    def set_progress(self, audit_id: str, chunk: str, info: dict[str, Any]) -> None:
        """Progress inside a long chunk; best effort: while Redis is unreachable the update
        is dropped (the next one replaces it) and the chunk keeps running."""
        try:
            self.kv.hset(self.key(audit_id, "progress"), chunk, json.dumps(info))
            self.kv.expire(self.key(audit_id, "progress"), KEEP_SECONDS)
        except TRANSIENT as exc:
            OUTAGE.failed(exc, "writing progress")
        else:
            OUTAGE.ok()

    def progress(self, audit_id: str) -> dict[str, dict[str, Any]]:
        raw = self.kv.hgetall(self.key(audit_id, "progress"))
        return {_s(k): json.loads(_s(v)) for k, v in raw.items()}

    def chunks(self, audit_id: str) -> dict[str, bytes]:
        return {_s(k): v for k, v in self.kv.hgetall(self.key(audit_id, "chunks")).items()}

    # ---- cancel / reduce lock

    def cancel(self, audit_id: str) -> None:
        self.kv.set(self.key(audit_id, "cancel"), 1, ex=KEEP_SECONDS)

    def cancelled(self, audit_id: str) -> bool:
        return bool(self.kv.exists(self.key(audit_id, "cancel")))

    def stopped(self, audit_id: str) -> bool:
        """Cancelled, or already ended (e.g. failed by another chunk): running work stops.

        Asked between batches of a running chunk. While Redis is unreachable the answer is
        "not stopped" (the chunk keeps computing; a cancel is seen at the next batch after
        Redis is back, or by the chunk's final checks)."""
        try:
            out = self.cancelled(audit_id) or self.state(audit_id) in FINAL
        except TRANSIENT as exc:
            OUTAGE.failed(exc, "checking for cancel")
            return False
        OUTAGE.ok()
        return out

    def take_reduce_lock(self, audit_id: str, token: str, seconds: int = 600) -> bool:
        """Take the audit's reduce lock for ``token``; True also when ``token`` holds it
        already (a reduce retried after a Redis outage takes its own lock again)."""
        key = self.key(audit_id, "reduce")
        if self.kv.set(key, token, nx=True, ex=seconds):
            return True
        return _s(self.kv.get(key)) == token

    def release_reduce_lock(self, audit_id: str, token: str) -> None:
        key = self.key(audit_id, "reduce")
        if _s(self.kv.get(key)) == token:
            self.kv.delete(key)

    # ---- uploads

    def upload_key(self, upload_id: str) -> str:
        return f"{self.prefix}:upload:{upload_id}"
