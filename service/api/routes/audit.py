"""Audits: POST /audit, GET /audit[/{id}], DELETE /audit/{id}, reports, query uploads."""

from __future__ import annotations

import io
import logging
import re
import tarfile
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, Response

from service.api.deps import get_state, require_api_key, service_for
from service.api.responses import JSON
from service.api.schemas import ERRORS
from service.api.state import AppState
from service.errors import BadInput, UnknownName
from service.jobs.outage import TRANSIENT
from service.jobs.report import render_html
from service.jobs.spec import (
    BACKDOOR_DEFAULT_POISONS,
    BATCH_MAX,
    CHUNK_MAX,
    COUNT_MAX,
    EPOCHS_MAX,
    PATCH_MAX,
    SEED_MAX,
    TRIGGER_STEPS_MAX,
    normalize_backdoor_spec,
    normalize_spec,
)
from service.jobs.uploads import ArchiveLimits, parse_query_archive, save_upload, upload_meta

log = logging.getLogger("service.api")

router = APIRouter(tags=["audit"], dependencies=[Depends(require_api_key)])

_ID = re.compile(r"^[0-9a-f]{16}$")


class QueriesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int | None = Field(None, ge=1, le=COUNT_MAX, description="audit a seeded sample of "
                              "this many of the bundle's queries; null = all")
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="sample seed (default: the audit's seed)")
    upload_id: str | None = Field(None, description="audit an uploaded set instead "
                                  "(POST /audit/uploads)")


class BackdoorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # the unions are range-checked by normalize_backdoor_spec, whose errors name the field
    target: int | str = Field(description="target class (index 0 .. classes - 1, or name)")
    poisons: int | list[int] = Field(
        list(BACKDOOR_DEFAULT_POISONS), description="poisoned training images (0 .. the "
        "target class's training images); one count or several (a model is retrained per "
        "count; 0, the clean baseline, is always added)")
    patch: int | None = Field(None, ge=1, le=PATCH_MAX, description="trigger side in pixels "
                              "(default 10% of the width, at least 3)")
    num_train: int | None = Field(None, ge=10, le=COUNT_MAX, description="seeded subset of "
                                  "the bundle's train split (default: all of it)")
    epochs: int | None = Field(None, ge=1, le=EPOCHS_MAX,
                               description="training epochs (default: the bundle's recipe)")
    perturb_eps: float | str = Field("8/255", description="L-inf budget of the confusing "
                                     "perturbations")
    trigger_steps: int | None = Field(None, ge=1, le=TRIGGER_STEPS_MAX,
                                      description="trigger optimisation steps (default 300)")
    save_bundles: bool = Field(True, description="freeze each poisoned hasher as a bundle "
                               "(GET /audit/{id}/bundles/{name} downloads it)")


class AuditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model": "fmnist-dpsh-32", "methods": ["untargeted_gan", "pgd"],
        "eps": ["8/255", "16/255"], "queries": {"count": 200, "seed": 0}, "top_k": None,
        "seed": 0}, {"model": "fmnist-dpsh-32", "type": "backdoor",
                     "backdoor": {"target": "Bag", "poisons": [40, 80], "epochs": 8}}]})
    type: Literal["attack", "backdoor"] = Field(
        "attack", description="attack: adversarial queries against the frozen hasher; "
        "backdoor: clean-label poisoning of its training set, retrained on the workers")
    model: str | None = Field(None, description="bundle; default the server's default bundle")
    backdoor: BackdoorSpec | None = Field(None, description="backdoor audits only")
    methods: list[str] | None = Field(None, min_length=1, max_length=16,
                                      description="registered attacks (GET /models lists "
                                      "them); default: the bundle's default generator")
    eps: float | str | list[float | str] = Field(
        "8/255", description="one budget or a list for a robustness curve; 8/255 or 0.0314")
    queries: QueriesSpec = Field(default_factory=QueriesSpec)
    top_k: int | None = Field(None, ge=1, le=COUNT_MAX,
                              description="mAP@K cut-off; null = whole gallery")
    seed: int = Field(0, ge=0, le=SEED_MAX,
                      description="seeds random starts, targets and sampling")
    chunk_size: int = Field(250, ge=1, le=CHUNK_MAX, description="queries per chunk job")
    batch_size: int | None = Field(None, ge=1, le=BATCH_MAX,
                                   description="images per forward pass")
    transfer_to: list[str] = Field(
        default_factory=list, max_length=16,
        description="other served bundles (same classes and input) to evaluate the adversarial "
                    "queries on: a transfer (black-box) row per attack")


def _check_id(audit_id: str) -> str:
    if not _ID.match(audit_id):
        raise UnknownName(f"audit: no audit {audit_id!r}", field="audit")
    return audit_id


def _audits(state: AppState) -> Any:
    if state.audits is None:
        from service.errors import Busy

        raise Busy("audits are not available yet (still starting)", retry_after=2)
    return state.audits


@router.post("/audit", status_code=202, responses=ERRORS,
             summary="Start a robustness audit (runs on the workers)")
async def create_audit(request: Request, body: AuditRequest) -> JSON:
    state = get_state(request)
    svc = service_for(state, body.model)
    audits = _audits(state)
    if body.type == "backdoor":
        spec = await run_in_threadpool(_backdoor_spec, svc, body)
        audit_id = await run_in_threadpool(audits.submit, spec)
        out = await run_in_threadpool(audits.status, audit_id, False)
        return JSON(out, status_code=202, headers={"Location": f"/audit/{audit_id}"})
    if body.backdoor is not None:
        raise BadInput('backdoor: only for "type": "backdoor"', field="backdoor")
    upload = None
    if body.queries.upload_id:
        upload = await run_in_threadpool(upload_meta, audits.store, body.queries.upload_id)
        if upload["model"] != svc.name:
            raise BadInput(f"queries.upload_id: the upload was made for {upload['model']}, "
                           f"not {svc.name}", field="queries.upload_id")
    spec = normalize_spec(svc, body.model_dump(), upload=upload,
                          max_queries=state.settings.max_audit_queries,
                          lookup=lambda n: service_for(state, n, field="transfer_to").bundle)
    audit_id = await run_in_threadpool(audits.submit, spec)
    out = await run_in_threadpool(audits.status, audit_id, False)
    return JSON(out, status_code=202, headers={"Location": f"/audit/{audit_id}"})


ATTACK_ONLY = frozenset({"methods", "eps", "queries", "top_k", "chunk_size", "batch_size",
                         "transfer_to"})


def _backdoor_spec(svc: Any, body: AuditRequest) -> dict[str, Any]:
    extra = sorted(ATTACK_ONLY & body.model_fields_set)
    if extra:
        raise BadInput(f"{extra[0]}: not used by a backdoor audit", field=extra[0])
    if body.backdoor is None:
        raise BadInput("backdoor: the backdoor settings (at least target) are required",
                       field="backdoor")
    return normalize_backdoor_spec(svc, {"seed": body.seed,
                                         "backdoor": body.backdoor.model_dump()})


@router.get("/audit", responses=ERRORS, summary="Recent audits (newest first)")
async def list_audits(request: Request,
                      limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Response:
    audits = _audits(get_state(request))
    body = await run_in_threadpool(_listing, audits, limit)
    return Response(body, media_type="application/json")


def _listing(audits: Any, limit: int) -> bytes:
    """The listing as JSON; each record is read and serialised on its own, so one that cannot
    be (damaged in Redis, written by another version) is logged and left out, never fatal."""
    parts = []
    for audit_id in audits.store.list(limit):
        try:
            parts.append(orjson.dumps(audits.status(audit_id, with_result=False),
                                      option=orjson.OPT_SERIALIZE_NUMPY))
        except UnknownName:
            continue  # expired between listing and reading
        except TRANSIENT:
            raise  # Redis went away: the whole listing answers 503, not a partial list
        except Exception as exc:  # noqa: BLE001 - one bad record must not hide the others
            log.warning("audit listing: record %r skipped, unreadable (%s: %s)", audit_id,
                        type(exc).__name__, str(exc)[:200])
    return b'{"audits":[' + b",".join(parts) + b"]}"


@router.get("/audit/{audit_id}", responses=ERRORS,
            summary="State, progress, timings and (when done) the result")
async def get_audit(request: Request, audit_id: str) -> JSON:
    audits = _audits(get_state(request))
    return JSON(await run_in_threadpool(audits.status, _check_id(audit_id)))


@router.delete("/audit/{audit_id}", responses=ERRORS,
               summary="Cancel: queued chunks are dropped, running ones stop at the next batch")
async def cancel_audit(request: Request, audit_id: str) -> JSON:
    audits = _audits(get_state(request))
    return JSON(await run_in_threadpool(audits.cancel, _check_id(audit_id)))


@router.get("/audit/{audit_id}/report", responses={
    200: {"content": {"application/json": {}, "text/html": {}}}, **ERRORS},
    summary="The report as JSON, or as HTML with plots (?format=html or Accept: text/html)")
async def report(request: Request, audit_id: str,
                 format: Annotated[str | None, Query(pattern="^(json|html)$")] = None
                 ) -> Response:
    audits = _audits(get_state(request))
    status = await run_in_threadpool(audits.status, _check_id(audit_id))
    want_html = format == "html" or (
        format is None and "text/html" in request.headers.get("accept", ""))
    if want_html:
        # relative: resolves to this same path with ?format=json, also behind a path prefix
        page = await run_in_threadpool(render_html, status, "?format=json")
        return HTMLResponse(page)
    if status["result"] is None:
        return JSON({"id": audit_id, "state": status["state"], "error": status["error"],
                     "progress": status["progress"], "report": None})
    return JSON(status["result"])


@router.get("/audit/{audit_id}/bundles/{name}", responses={
    200: {"content": {"application/gzip": {}}}, **ERRORS},
    summary="Download a poisoned bundle a backdoor audit froze (tar.gz of the bundle folder)")
async def download_bundle(request: Request, audit_id: str, name: str) -> Response:
    audits = _audits(get_state(request))
    status = await run_in_threadpool(audits.status, _check_id(audit_id))
    result = status["result"] or {}
    rows = [r for r in result.get("rows", []) if r.get("bundle") and
            r["bundle"]["name"] == name]
    if not rows:
        raise UnknownName(f"bundle: audit {audit_id} froze no bundle {name!r}" +
                          ("" if status["state"] == "done" else
                           f" (the audit is {status['state']})"), field="bundle")
    info = rows[0]["bundle"]
    data = await run_in_threadpool(_tar_folder, Path(info["path"]), info)
    return Response(data, media_type="application/gzip", headers={
        "Content-Disposition": f'attachment; filename="{name}.tar.gz"'})


def _tar_folder(folder: Path, info: dict[str, Any]) -> bytes:
    if not (folder / "SHA256SUMS").is_file():
        raise UnknownName(f"bundle: {info['name']} was written on {info['host']} at "
                          f"{folder}, which this server cannot read (share "
                          "HASHAUDIT_ARTIFACT_DIR between workers and the API)", field="bundle")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=3) as tar:
        tar.add(folder, arcname=info["name"])
    return buf.getvalue()


@router.post("/audit/uploads", status_code=201, responses=ERRORS,
             summary="Upload a query set: zip/tar of images + labels.txt ('path l1 ... lC')")
async def upload_queries(
    request: Request,
    archive: Annotated[UploadFile, File(description="zip or tar(.gz) with images and one "
                                        "list file labels.txt at its root")],
    model: Annotated[str | None, Form(description="bundle the labels belong to")] = None,
) -> JSON:
    state = get_state(request)
    svc = service_for(state, model)
    audits = _audits(state)
    names, labels, blobs = await run_in_threadpool(
        _parse_upload, archive.file, svc.classes, ArchiveLimits.from_settings(state.settings))
    meta = await run_in_threadpool(save_upload, audits.store, svc.name, names, labels, blobs)
    return JSON(meta, status_code=201)


def _parse_upload(f: Any, classes: list[str], limits: ArchiveLimits) -> Any:
    """Runs in the thread pool: the archive is inflated and checked off the event loop."""
    f.seek(0, 2)
    if f.tell() == 0:
        raise BadInput("archive: the uploaded file is empty", field="archive")
    return parse_query_archive(f, classes, limits)
