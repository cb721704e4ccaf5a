"""The one table from typed errors to HTTP status codes, and the JSON error body.

Lower layers raise typed errors and know nothing of HTTP; the status is
chosen here by the error's class (most specific class in its MRO wins).
"""

from __future__ import annotations

import difflib
import logging

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from mask_store.errors import (
    BackboneMismatch,
    BundleInvalid,
    BundleTooLarge,
    InvalidTaskName,
    MaskStoreError,
    StoredBundleCorrupt,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
)
from mask_store.local import check_task_name
from service.batcher import ClientGone
from service.errors import (AdminDisabled, Forbidden, InputInvalid, Overloaded, ReplicaUnavailable, RequestTimedOut,
                            ServiceError, TaskTooLarge, Unauthorized)

log = logging.getLogger(__name__)

STATUS: dict[type[Exception], int] = {
    TaskNotFound: 404,
    InvalidTaskName: 422,
    BundleInvalid: 422,
    BundleTooLarge: 413,
    BackboneMismatch: 409,
    StoredBundleCorrupt: 500,  # a server fault: the stored file went bad (it is quarantined)
    StoreFull: 507,
    StoreUnavailable: 503,
    InputInvalid: 422,
    TaskTooLarge: 507,
    Unauthorized: 401,
    Forbidden: 403,
    AdminDisabled: 403,
    Overloaded: 429,
    RequestTimedOut: 503,
    ReplicaUnavailable: 503,
}


def status_for(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


OIP_PREFIX = "/v2"
"""Paths under this prefix are the Open Inference Protocol's (:mod:`service.api.v2`): errors in its shape."""


TEI_PATHS = frozenset({"/predict", "/embed", "/info", "/health"})
"""text-embeddings-inference's routes (:mod:`service.api.tei`): errors in TEI's shape."""


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                   path: str = "") -> JSONResponse:
    """The documented error body ``{"error": {"type": kind, "message": message}}``; under ``/v2`` (``path``)
    the Open Inference Protocol's ``{"error": message}`` instead; on text-embeddings-inference's routes TEI's
    ``ErrorResponse`` ``{"error": message, "error_type": ...}`` (:func:`tei_error_type`)."""
    if is_oip(path):
        body = {"error": message}
    elif path in TEI_PATHS:
        body = {"error": message, "error_type": tei_error_type(status)}
    else:
        body = {"error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def is_oip(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def tei_error_type(status: int) -> str:
    """TEI's ``ErrorType`` of a status, as TEI maps them (its ``docs/openapi.json``): 429 ``overloaded``, 503
    ``unhealthy``, another 5xx ``backend``, a 4xx ``validation``."""
    if status == 429:
        return "overloaded"
    if status == 503:
        return "unhealthy"
    return "backend" if status >= 500 else "validation"


def error_headers(exc: Exception, status: int) -> dict[str, str] | None:
    """Headers an error answer carries: ``WWW-Authenticate`` on 401, ``Retry-After`` on overload / timeout."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if getattr(exc, "retry_after_s", None):
        return {"Retry-After": str(exc.retry_after_s)}
    return None


class InternalErrors:
    """ASGI middleware turning any unhandled exception into the documented 500 body, *inside* the other
    middlewares (a handler for ``Exception`` would run in Starlette's outermost ``ServerErrorMiddleware``,
    where the response misses the request id and CORS headers). Logged with its traceback; the client
    sees no path or trace."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_started(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except (ClientGone, ClientDisconnect) as exc:  # nobody to answer: the client left (or its body stalled)
            log.info("%s %s: the client went away (%s)", scope.get("method"), scope.get("path"),
                     exc or type(exc).__name__)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled %s on %s %s", type(exc).__name__, scope.get("method"), scope.get("path"))
            await error_response(500, "InternalError", "internal server error (logged on the server)",
                                 path=scope.get("path", ""))(scope, receive, send)


def typed_response(exc: Exception, path: str = "") -> JSONResponse:
    """The JSON error response of a typed error: status from :data:`STATUS`, headers from :func:`error_headers`,
    the body as :func:`error_response` gives it for ``path``."""
    status = status_for(exc)
    return error_response(status, type(exc).__name__, str(exc), error_headers(exc, status), path)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers in full at this request's path (Starlette's 405 names only
    the first route whose path matched). Asked of each route through Starlette's public ``matches``."""
    base = {"type": "http", "path": request.url.path, "root_path": request.scope.get("root_path", ""),
            "headers": [], "query_string": b""}
    return [m for m in _METHODS
            if any(route.matches(base | {"method": m})[0] == Match.FULL for route in request.app.router.routes)]


def similar_task(store, name: str) -> str | None:
    """The stored task ``name`` most likely meant: the one equal to it ignoring case, else the closest by
    ``difflib.get_close_matches`` (ratio ≥ 0.8); None when there is none or the store cannot be listed."""
    try:
        names = [t for t in store.tasks() if t != name]
    except Exception:  # a hint only: a store that cannot be listed gives none  # noqa: BLE001
        return None
    same = [t for t in names if t.casefold() == name.casefold()]
    if same:
        return same[0]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
    return close[0] if close else None


def content_type_hint(request: Request, exc: RequestValidationError) -> str | None:
    """A hint when a JSON body was refused as a whole and the request did not say it is JSON: FastAPI parses a body
    as JSON only under ``Content-Type: application/json`` (or ``+json``); curl's ``-d`` sends
    ``application/x-www-form-urlencoded``, which reaches the model as bytes ("body: Input should be a valid
    dictionary"). None when the header says JSON or the errors are about fields."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    if not any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
        return None
    got = f"it sent {media!r}" if media else "it sent none"
    return f"hint: send the header 'Content-Type: application/json' with a JSON body ({got})"


def install(app: FastAPI) -> None:
    """Register the handlers that turn typed errors into JSON error bodies."""

    async def typed(request: Request, exc: Exception) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        state = getattr(request.app.state, "supermask", None)
        if isinstance(exc, TaskNotFound) and state is not None:
            near = await run_in_threadpool(similar_task, state.store, exc.task)
            if near is not None:  # e.g. 'sst-2' for 'SST-2': the same answer, saying which name was meant
                return error_response(status, type(exc).__name__, f"{exc}; did you mean {near!r}? (task names are "
                                      "case-sensitive)", error_headers(exc, status), request.url.path)
        return typed_response(exc, request.url.path)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        for err in exc.errors():  # a malformed task name in the path: the store's own error and message
            if tuple(err.get("loc", ())) == ("path", "task"):
                try:
                    check_task_name(str(err.get("input", "")))
                except InvalidTaskName as bad:
                    return typed_response(bad, path)
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg')}")
        hint = content_type_hint(request, exc)
        if hint:
            parts.append(hint)
        return error_response(422, "RequestInvalid", "; ".join(parts), path=path)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route 404, 405, a body over the size limit 413, a body FastAPI
        could not parse, e.g. nested too deeply, 400) in the documented body; the body-parse 400 becomes
        the 422 that malformed JSON already gets."""
        status, kind, message = exc.status_code, _HTTP_KINDS.get(exc.status_code, "HTTPError"), str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 400:
            status, kind, message = 422, "RequestInvalid", f"the body could not be parsed as JSON ({exc.detail})"
        elif status == 413:
            limit = request.app.state.supermask.settings.max_request_bytes
            message = f"request body is larger than the limit of {limit} bytes (SUPERMASK_MAX_REQUEST_BYTES)"
        elif status == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
            message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        return error_response(status, kind, message, headers or None, request.url.path)

    app.add_exception_handler(MaskStoreError, typed)
    app.add_exception_handler(ServiceError, typed)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(InternalErrors)  # added first: the innermost middleware


_HTTP_KINDS = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}

