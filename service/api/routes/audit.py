"""Audits: POST /audit, GET /audit[/{id}], DELETE /audit/{id}, reports, query uploads.

``POST /audit``'s body is built from the registered audit types (:func:`submit_router`):
``type`` is one of their names, and each type adds the request fields it reads."""

from __future__ import annotations

import io
import logging
import re
import tarfile
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, Response

from service.api.deps import get_state, require_api_key, service_for
from service.api.responses import JSON
from service.api.schemas import ERRORS
from service.api.state import AppState
from service.errors import BadInput, UnknownName
from service.jobs.audit_types import DEFAULT_TYPE, AuditType, audit_type, audit_types
from service.jobs.audit_types.base import SEED_MAX
from service.jobs.outage import TRANSIENT
from service.jobs.report import render_html
from service.jobs.spec import normalize_spec
from service.jobs.uploads import ArchiveLimits, parse_query_archive, save_upload

log = logging.getLogger("service.api")

router = APIRouter(tags=["audit"], dependencies=[Depends(require_api_key)])

_ID = re.compile(r"^[0-9a-f]{16}$")

COMMON_FIELDS = ("type", "model", "seed")


def audit_request_model(types: list[AuditType]) -> type[BaseModel]:
    """``AuditRequest``: ``type`` (one of ``types``), ``model``, ``seed`` and every type's
    own fields; unknown fields are refused."""
    fields: dict[str, Any] = {
        "type": (Literal[tuple(t.name for t in types)], Field(  # type: ignore[misc]
            DEFAULT_TYPE, description="; ".join(f"{t.name}: {t.summary}" for t in types))),
        "model": (str | None, Field(None, description="bundle; default the server's default "
                                    "bundle")),
        "seed": (int, Field(0, ge=0, le=SEED_MAX,
                            description="seeds random starts, targets and sampling")),
    }
    for t in types:
        for name, definition in t.request_fields.items():
            if name in fields:
                raise ValueError(f"audit type {t.name}: request field {name!r} is taken")
            fields[name] = definition
    config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [t.example for t in types if t.example]})
    return create_model("AuditRequest", __config__=config, **fields)


def submit_router() -> APIRouter:
    """``POST /audit`` for the audit types registered now (built once per app, after the
    plugins are imported)."""
    types = audit_types()
    owners = {f: t.name for t in types for f in t.request_fields}
    sub = APIRouter(tags=["audit"], dependencies=[Depends(require_api_key)])

    async def create_audit(request: Request, body: BaseModel) -> JSON:
        state = get_state(request)
        svc = service_for(state, body.model)  # type: ignore[attr-defined]
        audits = _audits(state)
        kind = audit_type(body.type)  # type: ignore[attr-defined]
        foreign = sorted(body.model_fields_set - set(COMMON_FIELDS) - set(kind.request_fields))
        if foreign:
            f = foreign[0]
            raise BadInput(f'{f}: used only by "type": "{owners[f]}" audits, not by '
                           f'"type": "{kind.name}"', field=f)
        raw = body.model_dump(include=set(COMMON_FIELDS) | set(kind.request_fields))
        spec = await run_in_threadpool(
            normalize_spec, svc, raw, max_queries=state.settings.max_audit_queries,
            audits=audits.store,
            lookup=lambda n: service_for(state, n, field="transfer_to").bundle)
        audit_id = await run_in_threadpool(audits.submit, spec)
        out = await run_in_threadpool(audits.status, audit_id, False)
        return JSON(out, status_code=202, headers={"Location": f"/audit/{audit_id}"})

    # The body's model is built at run time, so its annotation is set here (a string
    # annotation would be looked up among this module's globals).
    create_audit.__annotations__["body"] = audit_request_model(types)
    sub.add_api_route("/audit", create_audit, methods=["POST"], status_code=202,
                      responses=ERRORS, summary="Start a robustness audit (runs on the workers)")
    return sub


def _check_id(audit_id: str) -> str:
    if not _ID.match(audit_id):
        raise UnknownName(f"audit: no audit {audit_id!r}", field="audit")
    return audit_id


def _audits(state: AppState) -> Any:
    if state.audits is None:
        from service.errors import Busy

        raise Busy("audits are not available yet (still starting)", retry_after=2)
    return state.audits


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
    frozen = [b for b in audit_type(status["type"]).frozen_bundles(result) if b["name"] == name]
    if not frozen:
        raise UnknownName(f"bundle: audit {audit_id} froze no bundle {name!r}" +
                          ("" if status["state"] == "done" else
                           f" (the audit is {status['state']})"), field="bundle")
    info = frozen[0]
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
