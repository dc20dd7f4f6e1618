"""Response models: they document the JSON in /docs (routes return pre-built JSON)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["validation_error"])
    message: str = Field(examples=["labels: '12' is neither a class index 0..9 nor a class name"])
    field: str | None = Field(None, examples=["labels"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelRef(BaseModel):
    name: str
    version: str
    sha: str = Field(description="sha256 of the bundle's SHA256SUMS: its exact contents")


class Code(BaseModel):
    hex: str = Field(description="first bit is the most significant; +1 -> 1")
    bits: str = Field(description="'1' for +1, '0' for -1, bit 0 first")


class Codes(BaseModel):
    clean: Code
    adversarial: Code


class Hit(BaseModel):
    id: int = Field(description="gallery id (index in the source split)")
    labels: list[str]
    hamming: int
    relevant: bool | None = Field(None, description="shares a label with the query")
    matches_target: bool | None = Field(None, description="shares a label with the target")
    thumbnail_url: str


class Hits(BaseModel):
    clean: list[Hit]
    adversarial: list[Hit]


class Precision(BaseModel):
    clean: float | None
    adversarial: float | None


class Hamming(BaseModel):
    clean_vs_adversarial: int
    clean_vs_prototype: int | None = Field(
        description="clean code vs the query label's prototype code (null without labels)")
    adversarial_vs_prototype: int | None
    adversarial_vs_target_prototype: int | None = None
    prototype_source: str | None = Field(
        description="prototype_net, or database_vote without one; null without labels")


class Perturbation(BaseModel):
    linf: float = Field(description="max |adv - input| in [0, 1] units (uint8 / 255)")
    linf_levels: int = Field(description="the same in grey levels (0..255)")
    rmse: float
    psnr_db: float | None = Field(description="null when the image is unchanged")
    png_scale: float | None = Field(
        description="stretch of perturbation_png: pixel = round(128 + (adv - input) * "
                    "png_scale), adv and input in grey levels; 127 / linf_levels, so the "
                    "largest change maps to 1 or 255. null when the image is unchanged "
                    "(perturbation_png is then plain 128)")


class Preprocess(BaseModel):
    format: str
    received_size: list[int] = Field(description="[width, height] of the upload")
    received_mode: str
    converted_to: str | None
    resized: bool
    resize: str | None
    model_input: dict[str, int]


class AttackResponse(BaseModel):
    model: ModelRef
    method: str
    eps: float
    eps_levels: int = Field(description="allowed change in grey levels: floor(eps * 255)")
    seed: int
    labels: list[str] | None
    target: list[str] | None
    preprocess: Preprocess
    changed: bool = Field(description="the adversarial code differs from the clean code")
    hits_changed: bool = Field(description="the top-k hits (ids, in order) differ")
    note: str | None = Field(
        description="set when the attack shows no effect (code or top-k unchanged): says that "
                    "this is not evidence of robustness and names a stronger method and/or a "
                    "larger eps to try; null when the hits changed",
        examples=["The adversarial code equals the clean code: untargeted_gan at eps 8/255 did "
                  "not move this image, so the hits are the same. That alone does not show "
                  "robustness: try method=dhta or method=pgd, or a larger eps (e.g. 16/255; "
                  "this bundle allows up to 25.5/255)."])
    adversarial_png: str = Field(description="base64 PNG at the model's input size and mode")
    perturbation_png: str = Field(
        description="base64 PNG of adv - input at the model's input size and mode, stretched "
                    "to full range around mid-grey 128 (see perturbation.png_scale)")
    codes: Codes
    bits: int
    hamming: Hamming
    top_k: int
    hits: Hits
    precision_at_k: Precision
    perturbation: Perturbation
    batch_size: int = Field(description="requests served by the same forward pass")
    timings_ms: dict[str, float] = Field(
        description="preprocess, wait (queue), attack, hash, search (the batch's), total")


class EncodeResponse(BaseModel):
    model: ModelRef
    labels: list[str] | None
    preprocess: Preprocess
    code: Code
    bits: int
    top_k: int
    hits: list[Hit]
    precision_at_k: float | None
    batch_size: int
    timings_ms: dict[str, float]


class AttackInfo(BaseModel):
    name: str
    kind: str
    targeted: bool
    needs_labels: bool
    description: str
    max_eps: float
    trained_eps: list[float] | None = None
    eps_range: list[Any] | None = None


class ModelSummary(BaseModel):
    name: str
    version: str
    sha: str
    created_at: str
    bits: int
    hasher: dict[str, Any]
    classes: list[str]
    input: dict[str, Any]
    dataset: Any
    gallery_size: int
    query_size: int
    default_method: str = Field(description="run when a request names no method")
    default_method_source: str = Field(
        description="manifest (the bundle declares it in extra.default_method) or rule "
                    "(pgd: needs no labels or trained generator)")
    label_free_method: str = Field(description="default when a request gives no labels")
    max_eps: float
    attacks: list[AttackInfo]
    evaluation: dict[str, Any]
    provenance: dict[str, Any] | None = Field(
        None, description="where an imported bundle came from (hashaudit import or POST "
                          "/models): format, upstream layout and the commit its names were "
                          "matched against, the checkpoint's file name and sha256; null for a "
                          "bundle trained here")


class ModelList(BaseModel):
    default: str
    models: list[ModelSummary]
    failed: dict[str, str] = Field(description="bundles that did not load, with the reason")


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d} for s, d in {
        401: "Missing or invalid API key", 404: "Unknown model",
        413: "Upload or image too large", 415: "Not a PNG or JPEG",
        422: "Invalid field (named in error.field)",
        503: "Busy, loading, shutting down, or audit queue unreachable (Retry-After)",
    }.items()
}
