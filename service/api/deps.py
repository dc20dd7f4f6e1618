"""Dependencies: app state, API keys, model lookup."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from service.api.state import AppState
from service.errors import BundleError, Busy, UnknownName
from service.serving import BundleService
from service.store.modelstore import check_bundle_name

_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                           description="API key (when the server sets HASHAUDIT_API_KEYS)")
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


def get_state(request: Request) -> AppState:
    return request.app.state.hashaudit


async def require_api_key(
    request: Request,
    key: str | None = Depends(_key_header),
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """401 unless no keys are configured, or at least one credential is presented and every
    credential presented is valid.

    Credentials are ``X-API-Key: <key>`` and ``Authorization: Bearer <key>``. When a request
    carries both, both must be valid keys: a wrong one is never outvoted by a right one (and an
    ``Authorization`` header of another scheme counts as a wrong credential). The two
    dependencies above only document the schemes in OpenAPI; the raw headers decide.
    """
    keys = get_state(request).settings.api_key_list
    if not keys:
        return
    presented: list[str | None] = []
    header_key = request.headers.get("x-api-key")
    if header_key is not None:
        presented.append(header_key.strip())
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, cred = auth.strip().partition(" ")
        presented.append(cred.strip() if scheme.lower() == "bearer" else None)
    if presented and all(p and _known(p, keys) for p in presented):
        return
    raise HTTPException(
        401, "missing or invalid API key: send 'Authorization: Bearer <key>' or "
             "'X-API-Key: <key>' (when both are sent, both must be valid)",
        headers={"WWW-Authenticate": "Bearer"})


def _known(given: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key."""
    found = False
    for k in keys:
        found |= hmac.compare_digest(given.encode(), k.encode())
    return found


def service_for(state: AppState, model: str | None, field: str = "model") -> BundleService:
    """The loaded bundle ``model`` (default bundle when empty); 404 lists what is served."""
    name = model or state.settings.default_bundle
    check_bundle_name(name, field=field)
    svc = state.services.get(name)
    if svc is not None:
        return svc
    if state.loading:
        raise Busy("bundles are still loading; retry shortly", field=field, retry_after=2)
    if name in state.load_errors:
        raise BundleError(f"model {name!r} failed to load: {state.load_errors[name]}",
                          field=field)
    served = ", ".join(sorted(state.services)) or "(none)"
    raise UnknownName(f"{field}: unknown model {name!r}; served models: {served}", field=field)
