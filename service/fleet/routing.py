"""Where the fleet's ingress may send a request and what it may retry: the multiplexed model id a path names
(:func:`route`), the headers that cross to a replica (:func:`raw_headers`), the body limits checked before a
body crosses Ray (:func:`read_limited`), and the errors that mean a replica went away
(:func:`retryable_errors`). Needs no Ray to import (Ray's exceptions are imported on first use)."""

import re

from fastapi import Request

_TASK_ROUTE = re.compile(r"v1/tasks/([^/]+)(/predict)?")
_V2_ROUTE = re.compile(r"v2/models/([^/]+)(?:/versions/[^/]+)?(/infer|/ready)?")
HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "host"})
"""Hop-by-hop headers (lower case): never forwarded to a replica nor back from one."""


def route(method: str, path: str) -> tuple[str | None, bool]:
    """How the ingress forwards ``method /path``: ``(task, read)``. ``task``: the multiplexed model id (the one
    task the path names, for the methods that use it), else None (any replica). ``read``: the request changes
    nothing, so it may be re-sent to another replica when its replica dies (GET, HEAD, OPTIONS, and the predict
    and inference POSTs: ``/v1/tasks/{task}/predict``, ``/v1/predict``, ``/v2/models/{task}/infer``)."""
    path = path.lstrip("/")
    task, predict = None, False
    if m := _TASK_ROUTE.fullmatch(path):
        predict = bool(m.group(2))
        task = m.group(1) if predict and method == "POST" or not predict and method in ("GET", "HEAD") else None
    elif m := _V2_ROUTE.fullmatch(path):
        predict = m.group(2) == "/infer"
        task = m.group(1) if (method == "POST") == predict else None
    elif path == "v1/predict":
        predict = True
    read = method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and predict)
    return task, read


def raw_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The request headers to forward, as bytes (hop-by-hop ones dropped): any byte a client sent (latin-1, as
    HTTP/1.1 carries headers) reaches the replica's app unchanged, where a decoded ``str`` would fail httpx's
    ASCII encoding (a 500 on every route)."""
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in HOP_HEADERS]


class BodyTooLarge(Exception):
    """A request body (not an upload) over ``SUPERMASK_MAX_REQUEST_BYTES`` at the ingress (413 ``RequestTooLarge``)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"request body is {size} bytes, larger than the limit of {limit} bytes "
                         f"(SUPERMASK_MAX_REQUEST_BYTES)")


async def read_limited(request: Request, limit: int, upload: bool = True) -> bytes:
    """The request body, at most ``limit`` bytes, checked by the declared length before a byte is read, then as it
    streams (a chunked body).

    Raises:
        mask_store.errors.BundleTooLarge: ``upload`` and the body is over ``limit`` (the upload limit, checked
            again by the replica's app).
        BodyTooLarge: not ``upload`` and the body is over ``limit``.
    """
    from mask_store.errors import BundleTooLarge

    too_large = BundleTooLarge if upload else BodyTooLarge
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large(len(data), limit)
    return bytes(data)


_RETRYABLE: tuple[type[BaseException], ...] = ()


def retryable_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the replica died or could not take the request (the request was not answered)."""
    global _RETRYABLE
    if not _RETRYABLE:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        _RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
    return _RETRYABLE
