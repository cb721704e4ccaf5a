"""Shared state of a running server and the FastAPI dependencies that hand it to routes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

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


def get_state(request: Request) -> AppState:
    return request.app.state.supermask


State = Annotated[AppState, Depends(get_state)]


def require_admin(request: Request, state: State) -> None:
    """Check ``Authorization: Bearer <SUPERMASK_ADMIN_TOKEN>``.

    Raises:
        AdminDisabled: no token is configured. Unauthorized: header missing or not Bearer.
        Forbidden: wrong token.
    """
    token = state.settings.admin_token
    if token is None or not token.get_secret_value():
        raise AdminDisabled("admin routes are disabled: set SUPERMASK_ADMIN_TOKEN to enable uploads and deletes")
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("this route needs 'Authorization: Bearer <admin token>'")
    if not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden("the admin token is wrong")


Admin = Depends(require_admin)
