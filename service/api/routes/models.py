"""GET /models, /models/{name} and gallery thumbnails."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from service.api.deps import get_state, require_api_key, service_for
from service.api.responses import JSON
from service.api.schemas import ERRORS, ModelList, ModelSummary

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelList, responses=ERRORS,
            summary="Served bundles with their attacks and figures")
async def list_models(request: Request) -> JSON:
    state = get_state(request)
    return JSON({"default": state.settings.default_bundle,
                 "models": [s.summary() for _, s in sorted(state.services.items())],
                 "failed": state.load_errors})


@router.get("/models/{name}", response_model=ModelSummary, responses=ERRORS,
            summary="One bundle's manifest summary")
async def get_model(request: Request,
                    name: str = Path(examples=["fmnist-dpsh-32"])) -> JSON:
    return JSON(service_for(get_state(request), name).summary(detail=True))


@router.get("/gallery/{model}/{item_id}.png", responses={
    200: {"content": {"image/png": {}}, "description": "the gallery item's thumbnail"},
    **ERRORS}, response_class=Response, summary="A gallery thumbnail")
async def thumbnail(request: Request, model: str = Path(examples=["fmnist-dpsh-32"]),
                    item_id: int = Path(ge=0, examples=[810])) -> Response:
    png = service_for(get_state(request), model).thumbnail_png(item_id)
    return Response(png, media_type="image/png",
                    headers={"Cache-Control": "public, max-age=86400"})
