"""The API documentation pages, served without internet access.

``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) are FastAPI's own page builders pointed at the
copies of the Swagger UI and ReDoc bundles in ``service/api/static/`` (versions and licences:
``static/README.md``) instead of a CDN. The OpenAPI schema names the API-key security
schemes only when the server has keys, so the lock icons and the **Authorize** button appear
exactly when a key is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_URL = "/static"
DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
REDOC_URL = "/redoc"

# Swagger UI otherwise sends the schema URL to validator.swagger.io for its "valid" badge.
SWAGGER_PARAMETERS = {"validatorUrl": None}


def install_docs(app: FastAPI, with_api_keys: bool) -> None:
    """Mount the vendored assets and add ``/docs``, its OAuth2 redirect page and ``/redoc``.

    Build the app with ``docs_url=None, redoc_url=None`` so FastAPI adds no CDN pages."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    if not with_api_keys:
        _drop_security_from_schema(app)

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return root, root + (app.openapi_url or "/openapi.json")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root, openapi_url = urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/swagger-ui/favicon-32x32.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            swagger_ui_parameters=SWAGGER_PARAMETERS)

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root, openapi_url = urls(request)
        return get_redoc_html(
            openapi_url=openapi_url, title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False)


def _drop_security_from_schema(app: FastAPI) -> None:
    """Without API keys nothing is checked: the schema names no security schemes, so the
    pages show no lock icons and no Authorize button."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # cached by FastAPI after the first call; stripping is idempotent
        schema.get("components", {}).pop("securitySchemes", None)
        for operations in schema.get("paths", {}).values():
            for op in operations.values():
                if isinstance(op, dict):
                    op.pop("security", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
