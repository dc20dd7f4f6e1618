"""GET /models, /models/{name}, gallery thumbnails, and POST /models (imports)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api.deps import get_state, require_api_key, service_for
from service.api.responses import JSON
from service.api.schemas import ERRORS, ErrorResponse, ModelList, ModelSummary
from service.errors import BadInput

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


IMPORT_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS, 403: {"model": ErrorResponse,
                    "description": "Model uploads are off on this server"}}


def _floats(text: str | None, field: str) -> list[float] | None:
    if text is None or not text.strip():
        return None
    try:
        vals = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise BadInput(f"{field}: three numbers, e.g. 0.485,0.456,0.406", field=field) from None
    if len(vals) != 3:
        raise BadInput(f"{field}: three numbers (R, G, B), got {len(vals)}", field=field)
    return vals


@router.post("/models", status_code=202, responses=IMPORT_ERRORS,
             summary="Import a model: a checkpoint and its database (off unless "
                     "HASHAUDIT_MODEL_UPLOADS)")
async def upload_model(
    request: Request,
    checkpoint: Annotated[UploadFile, File(description="the state dict: a torch.save("
                                           "model.state_dict()) file (read with torch.load("
                                           "weights_only=True)) or .safetensors")],
    archive: Annotated[UploadFile, File(description="zip or tar(.gz): database.txt at the "
                                        "root (DeepHash list: 'path l1 ... lC', paths relative "
                                        "to the root), the images, and optionally test.txt "
                                        "(queries)")],
    name: Annotated[str, Form(max_length=64, description="bundle name")],
    arch: Annotated[str, Form(max_length=100, description="deephash: AlexNet, ResNet50, "
                                                          "VGG16 ...; torchvision: resnet50, "
                                                          "vgg16_bn ...")],
    format: Annotated[str, Form(max_length=20,
                                description="deephash or torchvision")] = "deephash",
    bits: Annotated[int | None, Form(ge=1, le=4096)] = None,
    hash_layer: Annotated[str | None, Form(max_length=100, description="torchvision: "
                                           "module path of the hash layer")] = None,
    resize: Annotated[int | None, Form(ge=1, le=4096)] = None,
    crop: Annotated[int | None, Form(ge=1, le=4096)] = None,
    resize_mode: Annotated[str | None, Form(max_length=20,
                                            description="shorter or stretch")] = None,
    interpolation: Annotated[str | None, Form(max_length=20,
                                              description="bilinear or bicubic")] = None,
    mean: Annotated[str | None, Form(max_length=200,
                                     description="R,G,B (default ImageNet's)")] = None,
    std: Annotated[str | None, Form(max_length=200,
                                    description="R,G,B (default ImageNet's)")] = None,
    class_names: Annotated[str | None, Form(max_length=100_000,
                                            description="comma separated")] = None,
    num_query: Annotated[int | None, Form(ge=1, le=10_000_000)] = None,
) -> JSON:
    """Checks the request (name, checkpoint, archive) before answering 202; indexing then
    runs in the background: follow it at ``GET /models/imports/{name}``."""
    from service.importers.importer import ImportSpec

    state = get_state(request)
    spec = ImportSpec(format, arch, name, bits=bits, hash_layer=hash_layer,
                      resize=resize, crop=crop, interpolation=interpolation,
                      resize_mode=resize_mode, mean=_floats(mean, "mean"),
                      std=_floats(std, "std"))
    names = None if class_names is None else [c.strip() for c in class_names.split(",")
                                              if c.strip()]
    status = await run_in_threadpool(
        state.imports.start, spec, checkpoint.file, checkpoint.filename or "", archive.file,
        names, num_query)
    return JSON(status, status_code=202,
                headers={"Location": f"/models/imports/{status['name']}"})


@router.get("/models/imports/{name}", responses=ERRORS,
            summary="State of a POST /models import: indexing, loading, done or failed")
async def model_import_status(request: Request, name: str = Path(examples=["my-model"])
                              ) -> JSON:
    return JSON(get_state(request).imports.get(name))
