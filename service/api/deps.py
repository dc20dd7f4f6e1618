"""Dependencies: app state, API keys, model lookup."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from service.api.state import AppState
from service.errors import BundleError, Busy, UnknownName
from service.inference import BundleService
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
    """401 unless no keys are configured or one of them is presented."""
    keys = get_state(request).settings.api_key_list
    if not keys:
        return
    given = key or (bearer.credentials if bearer is not None else None)
    if given and any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        return
    raise HTTPException(
        401, "missing or invalid API key: send 'Authorization: Bearer <key>' or "
             "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})


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
