"""``POST /models``: import a checkpoint and index its database on the server.

The request is checked before it is accepted, in the thread pool: the name, the checkpoint
(read with ``torch.load(weights_only=True)`` or safetensors and matched to an upstream
layout, so an unsafe or unknown file is a 422 at once), and the archive (extracted with the
audit uploads' limits, lists and listed files checked). The unindexed bundle is then written
and the database is indexed on a thread of its own (one import at a time), after which the
bundle is loaded, warmed and served like the others. ``GET /models/imports/{name}`` follows
it. Status lives in this process: it is lost when the server restarts (the half-made bundle
is then refused by ``load_bundle`` as not indexed, and can be removed).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import IO, Any

from service.errors import BadInput, Busy, Forbidden, HashAuditError, UnknownName
from service.importers.importer import ImportSpec, build_hasher_from_checkpoint, import_checkpoint
from service.importers.index import IndexSpec, index_bundle
from service.importers.upload import unpack_model_archive
from service.jobs.uploads import ArchiveLimits, extract_archive
from service.serving import BundleService
from service.store.modelstore import check_bundle_name

log = logging.getLogger("service.api")

COPY_PIECE = 1 << 20


class ModelImports:
    """The imports of this server process: status by name, one running at a time."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.status: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._running: str | None = None

    def get(self, name: str) -> dict[str, Any]:
        with self._lock:
            st = self.status.get(name)
            if st is None:
                raise UnknownName(f"model: no import of {name!r} since this server started",
                                  field="model")
            return dict(st, progress=dict(st["progress"]))

    def _set(self, name: str, **changes: Any) -> None:
        with self._lock:
            self.status[name].update(changes)

    def start(self, spec: ImportSpec, checkpoint: IO[bytes], checkpoint_name: str,
              archive: IO[bytes], class_names: list[str] | None,
              num_query: int | None) -> dict[str, Any]:
        """Check everything that can be checked at once, write the unindexed bundle and
        start indexing on a thread; returns the status. Runs in the thread pool."""
        s = self.state.settings
        if not s.model_uploads:
            raise Forbidden("POST /models is off on this server (HASHAUDIT_MODEL_UPLOADS)",
                            field=None)
        name = check_bundle_name(spec.name, field="name")
        store = self.state.store
        with self._lock:
            if self._running is not None:
                raise Busy(f"an import ({self._running}) is running; one at a time",
                           retry_after=30)
            if name in store.names() or name in self.state.services or (
                    self.status.get(name, {}).get("state") not in (None, "failed")):
                raise BadInput(f"name: a model {name!r} exists already", field="name")
            self._running = name
        data = Path(s.artifact_dir) / "models" / name
        try:
            if data.exists():
                shutil.rmtree(data)
            data.mkdir(parents=True)
            suffix = ".safetensors" if checkpoint_name.lower().endswith(".safetensors") \
                else ".pt"
            ckpt = data / f"checkpoint{suffix}"
            with open(ckpt, "wb") as f:
                shutil.copyfileobj(checkpoint, f, COPY_PIECE)
            if ckpt.stat().st_size == 0:
                raise BadInput("checkpoint: the uploaded file is empty", field="checkpoint")
            built = build_hasher_from_checkpoint(spec, ckpt)
            built[3]["file"] = Path(checkpoint_name.replace("\\", "/")).name[:255] or ckpt.name
            archive.seek(0, 2)
            if archive.tell() == 0:
                raise BadInput("archive: the uploaded file is empty", field="archive")
            archive.seek(0)
            files = extract_archive(archive, ArchiveLimits.from_settings(s), "archive")
            db_list, q_list, columns = unpack_model_archive(files, data / "data", "archive")
            del files
            if class_names is not None and len(class_names) != columns:
                raise BadInput(f"class_names: {len(class_names)} names for {columns} label "
                               "columns", field="class_names")
            index = IndexSpec(database=db_list, root=data / "data", query=q_list,
                              class_names=class_names, num_query=num_query)
            index.check()
            import_checkpoint(spec, ckpt, store.root, command="POST /models", built=built)
            ckpt.unlink()  # the bundle holds the weights (and the file's sha256)
        except BaseException:
            shutil.rmtree(data, ignore_errors=True)
            with self._lock:
                self._running = None
            raise
        status = {"name": name, "state": "indexing", "created_at": time.time(),
                  "progress": {"done": 0, "total": None}, "error": None, "model": None,
                  "checkpoint": built[3]}
        with self._lock:
            self.status[name] = status
        threading.Thread(target=self._run, args=(name, index, data), daemon=True,
                         name=f"import-{name}").start()
        return self.get(name)

    def _run(self, name: str, index: IndexSpec, data: Path) -> None:
        folder = self.state.store.root / name
        st = self.status[name]

        def total(n: int) -> None:
            with self._lock:
                st["progress"]["total"] = n

        def progress(k: int) -> None:
            with self._lock:
                st["progress"]["done"] += k

        try:
            index_bundle(folder, index, self.state.device, progress=progress, total=total,
                         command="POST /models")
            self._set(name, state="loading")
            svc = BundleService(self.state.store.get(name), seed=self.state.settings.attack_seed)
            svc.warmup()
            self.state.services[name] = svc
            self.state.load_errors.pop(name, None)
            self.state.metrics.models.set(len(self.state.services))
            self._set(name, state="done", model=svc.summary())
            log.info("imported model %s is served", name)
        except Exception as exc:  # noqa: BLE001 - reported in the status, never lost
            msg = exc.message if isinstance(exc, HashAuditError) else \
                f"{type(exc).__name__}: {exc}"
            log.error("import of %s failed: %s", name, msg)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
            self._set(name, state="failed", error=msg)
        finally:
            with self._lock:
                self._running = None
