"""Shared state of a running server and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mask_store.store import MaskStore
from backbone import Backbone
from service.engine import Engine
from service.errors import AdminDisabled, Forbidden, Unauthorized
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    backbone: Backbone
    store: MaskStore
    engine: Engine
    metrics: Metrics


async def get_state(request: Request) -> AppState:
    """The app's :class:`AppState`. A coroutine on purpose: FastAPI runs a plain ``def`` dependency in its thread
    pool, a thread hop (~0.2-0.3 ms on a 2-core host) on every request for an attribute read."""
    return request.app.state.supermask


State = Annotated[AppState, Depends(get_state)]


admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", bearerFormat="opaque",
                          description="The server's SUPERMASK_ADMIN_TOKEN, as `Authorization: Bearer <token>`: "
                                      "uploads and deletes only.")
"""FastAPI's bearer scheme: it reads the header and puts the security scheme in the OpenAPI document; the
token is checked by :func:`require_admin` (``auto_error=False``: our own typed errors, not FastAPI's 403)."""


async def require_admin(state: State,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)]) -> None:
    """Check ``Authorization: Bearer <SUPERMASK_ADMIN_TOKEN>``, in constant time (``secrets.compare_digest``), on the
    event loop (a string comparison: no thread hop).

    Raises:
        AdminDisabled: no token is configured. Unauthorized: header missing or not Bearer.
        Forbidden: wrong token.
    """
    token = state.settings.admin_token
    if token is None or not token.get_secret_value():
        raise AdminDisabled("admin routes are disabled: set SUPERMASK_ADMIN_TOKEN to enable uploads and deletes")
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("this route needs 'Authorization: Bearer <admin token>'")
    if not secrets.compare_digest(credentials.credentials.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("the admin token is wrong")


Admin = Depends(require_admin)
