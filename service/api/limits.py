"""Request body limit: Starlette's ``RequestBodyLimitResponder`` with ``SUPERMASK_MAX_REQUEST_BYTES``.

Applied to every route but uploads (``PUT /v1/tasks/{task}``), which stream their body under their own
limit (``SUPERMASK_MAX_BUNDLE_BYTES``). The limit is checked against ``Content-Length`` before anything
is read, and against the bytes received while the body streams in (a chunked body has no length), so
an oversized body is refused with 413 before it is buffered whole or parsed. The 413 is raised as
Starlette's ``HTTPException`` inside the app and rendered by :mod:`service.api.errors`.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import error_response


class BodyLimit:
    """ASGI middleware: ``max_bytes`` on request bodies, uploads (PUT) excepted.

    Args:
        app: the wrapped ASGI app.
        max_bytes: largest body in bytes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "PUT":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:  # refused before a byte is read
            response = error_response(413, "RequestTooLarge", f"request body is {int(declared)} bytes, larger than "
                                      f"the limit of {self.max_bytes} bytes (SUPERMASK_MAX_REQUEST_BYTES)",
                                      path=scope.get("path", ""))
            await response(scope, receive, send)
            return
        # a body without a length (chunked): counted as it streams; Starlette raises its 413 HTTPException
        await RequestBodyLimitResponder(self.app, self.max_bytes)(scope, receive, send)
