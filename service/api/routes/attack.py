"""POST /attack and POST /encode: decode, validate, then queue for the micro-batcher."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from service.api.deps import get_state, require_api_key, service_for
from service.api.forms import FastFormRoute
from service.api.responses import JSON
from service.api.schemas import ERRORS, AttackResponse, EncodeResponse
from service.api.state import AppState
from service.errors import BadInput
from service.images import decode_upload, header_size, sniff_image
from service.serving import BundleService, Query

router = APIRouter(tags=["attack"], dependencies=[Depends(require_api_key)],
                   route_class=FastFormRoute)

ImageField = Annotated[UploadFile, File(description="PNG or JPEG (checked by content)")]
ModelField = Annotated[str | None, Form(
    description="bundle name; empty = the server's default bundle", examples=["fmnist-dpsh-32"])]
TopKField = Annotated[int, Form(ge=1, description="gallery hits to return (max: server's "
                                "HASHAUDIT_MAX_TOP_K, default 100)")]


INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 128 * 128


async def _decode(state: AppState, svc: BundleService, image: UploadFile) -> Query:
    """Decode in the thread pool unless the upload is small in bytes *and* its header claims
    at most ``INLINE_DECODE_PIXELS`` pixels (a fraction of a millisecond; the trip to the
    pool would cost more): a few kB of PNG may hold millions of pixels, and the event loop
    must keep answering (``/health/live``) meanwhile."""
    data = await image.read()
    max_pixels = state.settings.max_pixels
    claimed = header_size(data, sniff_image(data)) if len(data) <= INLINE_DECODE_BYTES else None
    if claimed is not None and claimed[0] * claimed[1] <= INLINE_DECODE_PIXELS:
        pixels, info = decode_upload(data, svc.transform, max_pixels)
    else:
        pixels, info = await run_in_threadpool(decode_upload, data, svc.transform, max_pixels)
    return Query(image=pixels, preprocess=info)


def _check_top_k(state: AppState, top_k: int) -> None:
    if top_k > state.settings.max_top_k:
        raise BadInput(f"top_k: at most {state.settings.max_top_k}, got {top_k}", field="top_k")


def _finish(result: dict, t0: float, t_pre: float) -> JSON:
    total = (time.perf_counter() - t0) * 1e3
    tm = result["timings_ms"]
    busy = sum(tm.values())
    tm["preprocess"] = t_pre * 1e3
    tm["wait"] = max(0.0, total - t_pre * 1e3 - busy)
    tm["total"] = total
    return JSON(result)


@router.post("/attack", response_model=AttackResponse, responses=ERRORS,
             summary="Attack one image and show what it does to retrieval")
async def attack(
    request: Request,
    image: ImageField,
    labels: Annotated[list[str] | None, Form(
        description="the image's labels: class indices or names; several allowed "
                    "(repeat the field or separate with commas). Without labels only "
                    "label-free methods run (default then: label_free_method in GET /models)",
        examples=[["Coat"]])] = None,
    model: ModelField = None,
    method: Annotated[str | None, Form(
        description="registered attack (GET /models lists them); empty = the bundle's "
                    "default_method (GET /models; pgd unless the bundle declares another)",
        examples=["pgd"])] = None,
    eps: Annotated[str | None, Form(
        description="L-inf budget in [0, 1] pixel units, e.g. 8/255 or 0.0314 "
                    "(default 8/255; at most the bundle's max_eps)", examples=["8/255"])] = None,
    target: Annotated[list[str] | None, Form(
        description="target label(s), only for targeted methods")] = None,
    top_k: TopKField = 10,
) -> JSON:
    """Returns the adversarial image and the perturbation (stretched to full range around
    mid-grey) as base64 PNGs (model input size and mode; other sizes are converted and
    resized bilinearly, see `preprocess`), whether the code and the top-k changed (`changed`,
    `hits_changed`, and a `note` naming a stronger method or a larger eps when they did not),
    clean and adversarial codes, Hamming distances (between them and to the label's prototype
    code), top-k hits before and after with precision@k, perturbation stats and timings.
    Requests for the same model, method and eps that arrive together run as one batch
    (`batch_size`)."""
    t0 = time.perf_counter()
    state = get_state(request)
    with state.batcher.incoming() as ticket:
        svc = service_for(state, model)
        name = svc.check_method(method, has_labels=bool(labels))
        eps_v = svc.check_eps(eps)
        _check_top_k(state, top_k)
        lab = svc.labels_for(labels, "labels") if labels else None
        tgt = svc.labels_for(target, "target") if target else None
        svc.check_attack_inputs(name, lab, tgt)
        query = await _decode(state, svc, image)
        query.labels, query.target, query.top_k = lab, tgt, top_k
        t_pre = time.perf_counter() - t0
        result = await state.batcher.submit((svc.name, "attack", name, eps_v), query, ticket)
    return _finish(result, t0, t_pre)


@router.post("/encode", response_model=EncodeResponse, responses=ERRORS,
             summary="Hash one image and search the gallery (no attack)")
async def encode(
    request: Request,
    image: ImageField,
    model: ModelField = None,
    labels: Annotated[list[str] | None, Form(
        description="optional labels: marks relevant hits and gives precision@k")] = None,
    top_k: TopKField = 10,
) -> JSON:
    t0 = time.perf_counter()
    state = get_state(request)
    with state.batcher.incoming() as ticket:
        svc = service_for(state, model)
        _check_top_k(state, top_k)
        lab = svc.labels_for(labels, "labels") if labels else None
        query = await _decode(state, svc, image)
        query.labels, query.top_k = lab, top_k
        t_pre = time.perf_counter() - t0
        result = await state.batcher.submit((svc.name, "encode", None, None), query, ticket)
    return _finish(result, t0, t_pre)
