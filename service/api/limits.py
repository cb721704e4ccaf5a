"""Request body limit: Starlette's ``RequestBodyLimitResponder`` with ``SUPERMASK_MAX_REQUEST_BYTES``.

Applied to every route but uploads (``PUT /v1/tasks/{task}``), which stream their body under their own
limit (``SUPERMASK_MAX_BUNDLE_BYTES``). The limit is checked against ``Content-Length`` before anything
is read, and against the bytes received while the body streams in (a chunked body has no length), so
an oversized body is refused with 413 before it is buffered whole or parsed. The 413 is raised as
Starlette's ``HTTPException`` inside the app and rendered by :mod:`service.api.errors`.

The same middleware marks a request whose client has gone: once the body is read it watches for the
ASGI ``http.disconnect`` and sets the request's :data:`service.batcher.client_gone` event, so that work the
request still has queued in the micro-batcher is dropped (:meth:`service.batcher.MicroBatcher.submit`).

Reply and work bounds (:func:`check_reply`, :func:`check_work`): a request is refused with 422 before any
work when the reply it asks for would exceed ``SUPERMASK_MAX_RESPONSE_BYTES`` (estimated from the rows, the
options and each task's label set; an upper bound of the JSON ``json.dumps`` writes), or its rows x tasks
exceed ``SUPERMASK_MAX_WORK_ROWS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mask_store.format import BundleHeader
from service.api.errors import error_response
from service.batcher import client_gone
from service.errors import InputInvalid

FLOAT_CHARS = 24
"""Longest JSON number a float32 / float64 score takes (``repr``: ``-1.2345678901234567e-308``)."""


class ReplyTooLarge(InputInvalid):
    """The reply a request asks for would be larger than ``SUPERMASK_MAX_RESPONSE_BYTES`` (422)."""


class WorkTooLarge(InputInvalid):
    """A request asks for more rows x tasks than ``SUPERMASK_MAX_WORK_ROWS`` (422)."""


def _json_len(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


def prediction_bytes(header: BundleHeader, ranked: bool, top_k: int | None, truncated: bool = True) -> int:
    """Upper bound, in bytes, of one ``/v1`` prediction's JSON for a task with ``header``'s labels.

    Classification: ``label`` (the longest), ``score``, ``scores`` (every label) and, when ``ranked``, ``top``
    (the ``top_k`` longest labels; None: all); regression: ``value``. Numbers count :data:`FLOAT_CHARS`.
    """
    extra = len(',"truncated":true') if truncated else 0
    if header.problem_type == "regression" or not header.labels:
        return len('{"value":}') + FLOAT_CHARS + extra
    sizes = sorted((_json_len(label) for label in header.labels), reverse=True)
    n = len(sizes) if top_k is None else min(top_k, len(sizes))
    total = len('{"label":,"score":,"scores":{}}') + sizes[0] + FLOAT_CHARS
    total += sum(s + 2 + FLOAT_CHARS for s in sizes)  # "label":score,
    if ranked:
        total += len(',"top":[]') + sum(s + len('{"label":,"score":},') + FLOAT_CHARS for s in sizes[:n])
    return total + extra


def predict_reply_bytes(task: str, header: BundleHeader, rows: int, ranked: bool, top_k: int | None) -> int:
    """Upper bound of a ``/v1`` predict reply (``{"task", "predictions"}``) of ``rows`` rows, bytes."""
    return len('{"task":,"predictions":[]},') + _json_len(task) + rows * (prediction_bytes(header, ranked, top_k) + 1)


def v2_reply_bytes(task: str, header: BundleHeader, rows: int, outputs: Iterable[str]) -> int:
    """Upper bound of an OIP v2 inference reply with the named outputs (``label``, ``score``, ``logits``), bytes."""
    per_row = {"label": (max(map(_json_len, header.labels)) if header.labels else 4) + 1,
               "score": FLOAT_CHARS + 1, "logits": header.num_outputs * (FLOAT_CHARS + 1)}
    head = len('{"model_name":,"model_version":"1","outputs":[],"id":}') + _json_len(task)  # the id: the caller's
    return head + sum(len('{"name":"logits","datatype":"BYTES","shape":[,],"data":[]},') + 40 + rows * per_row[o]
                      for o in outputs)


def check_reply(estimate: int, limit: int, what: str) -> None:
    """Raise :class:`ReplyTooLarge` when ``estimate`` (bytes) exceeds ``limit`` (``SUPERMASK_MAX_RESPONSE_BYTES``)."""
    if estimate > limit:
        raise ReplyTooLarge(f"{what} would answer up to {estimate} bytes, more than the reply limit of {limit} "
                            f"bytes (SUPERMASK_MAX_RESPONSE_BYTES): send fewer inputs or tasks, a smaller top_k, "
                            f"or fewer outputs")


def check_work(rows: int, tasks: int, limit: int) -> None:
    """Raise :class:`WorkTooLarge` when ``rows`` x ``tasks`` exceeds ``limit`` (``SUPERMASK_MAX_WORK_ROWS``)."""
    if rows * tasks > limit:
        raise WorkTooLarge(f"{rows} inputs x {tasks} tasks = {rows * tasks} rows of work, more than the limit of "
                           f"{limit} per request (SUPERMASK_MAX_WORK_ROWS): send fewer inputs or tasks")


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
        gone = asyncio.Event()
        token = client_gone.set(gone)
        watcher: asyncio.Task | None = None
        answered = False

        async def watch() -> None:  # after the body: the next message is the disconnect (or the answer's end)
            while not answered:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not answered:
                        gone.set()
                    return

        async def receive_body() -> Message:
            nonlocal watcher
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False) and watcher is None:
                watcher = asyncio.get_running_loop().create_task(watch())
            return message

        async def send_watched(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await self._limited(scope, receive_body, send_watched)
        finally:
            client_gone.reset(token)
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = Headers(scope=scope).get("content-length", "")
        # refused before a byte is read (ASCII digits: str.isdigit() also takes "²", which int() refuses)
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "RequestTooLarge", f"request body is {int(declared)} bytes, larger than "
                                      f"the limit of {self.max_bytes} bytes (SUPERMASK_MAX_REQUEST_BYTES)",
                                      path=scope.get("path", ""))
            await response(scope, receive, send)
            return
        # a body without a length (chunked): counted as it streams; Starlette raises its 413 HTTPException
        await RequestBodyLimitResponder(self.app, self.max_bytes)(scope, receive, send)
