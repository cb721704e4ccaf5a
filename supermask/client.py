"""Python client of the supermask REST API: sync (:class:`Client`) and async (:class:`AsyncClient`), over httpx.

Results are the server's own pydantic models (:mod:`service.api.schemas`, which needs no torch). A call
answered 429 (overloaded) or 503 (unavailable), or that could not connect, is retried with tenacity:
after the server's ``Retry-After`` (seconds, or an HTTP date) when it sends one, else with exponential
back-off and jitter, up to ``retries`` more attempts; any other error response raises :class:`ApiError`
with the server's error type and message.

``timeout`` bounds the whole call, retries and waits included: every connect, socket read and write of
the sync client waits at most until the call's deadline (a server that trickles its answer a byte at a time
cannot hold it; httpx's own timeouts are per read), the async client's call is cancelled at the deadline.
Every failure is one of the client's own errors, :class:`ClientError`: :class:`ApiError` (an error
response), :class:`ServerUnreachable` (no connection, or it broke), :class:`CallTimedOut` (the deadline).

    from supermask.client import Client

    with Client("http://127.0.0.1:8000") as c:
        c.predict("SST-2", ["a charming and often affecting journey"], top_k=None).predictions[0].top

The server URL and admin token default to ``$SUPERMASK_URL`` (else ``http://127.0.0.1:8000``) and
``$SUPERMASK_ADMIN_TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import json
import os
import re
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpcore
import httpx
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from service.api.schemas import FanOutPublic, HealthPublic, PredictPublic, TaskPublic, TasksPublic

__all__ = ["ApiError", "AsyncClient", "CallTimedOut", "Client", "ClientError", "DEFAULT_URL", "ServerUnreachable",
           "renamed_bundle"]

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER_S = 60.0
"""A ``Retry-After`` longer than this is waited only this long before the next try."""

Inputs = Sequence[str | Sequence[str]]


class ClientError(RuntimeError):
    """Any failure of a client call (the base of :class:`ApiError`, :class:`ServerUnreachable`,
    :class:`CallTimedOut`): one ``except`` catches them all."""


class ApiError(ClientError):
    """An error response: ``status`` (HTTP), ``type`` (the server's error type, e.g. ``TaskNotFound``),
    ``message``; ``retry_after`` (seconds) when the server sent a readable ``Retry-After``."""

    def __init__(self, status: int, type: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message, self.retry_after = status, type, message, retry_after


class ServerUnreachable(ClientError):
    """No connection to the server at ``url`` (refused, unknown host: ``connect`` is True, the request was
    not sent and is retried), or the connection broke during the call. ``__cause__`` is httpx's error."""

    def __init__(self, url: str, reason: str, connect: bool):
        super().__init__(f"cannot reach the server at {url}: {reason}")
        self.url, self.reason, self.connect = url, reason, connect


class CallTimedOut(ClientError):
    """The call did not complete within ``timeout_s`` seconds (retries and waits included)."""

    def __init__(self, url: str, timeout_s: float):
        super().__init__(f"no complete answer from {url} within the timeout of {timeout_s:g} s "
                         "(--timeout / timeout=, the whole call)")
        self.url, self.timeout_s = url, timeout_s


_DELAY_SECONDS = re.compile(r"[0-9]{1,12}")  # RFC 9110 delay-seconds: ASCII digits only (str.isdigit takes '²')


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (RFC 9110: delay-seconds or an HTTP date), None when absent or unreadable
    (a value that is neither is ignored: the call then backs off exponentially)."""
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def _raise_for(r: httpx.Response) -> httpx.Response:
    if r.is_success:
        return r
    try:
        err = r.json()["error"]
        kind, message = (err["type"], err["message"]) if isinstance(err, dict) else ("Error", str(err))
    except (ValueError, KeyError, TypeError):
        kind, message = "HTTPError", r.text[:500] or r.reason_phrase
    raise ApiError(r.status_code, kind, message, _retry_after(r.headers.get("retry-after")))


def _retryable(exc: BaseException) -> bool:
    return (isinstance(exc, ApiError) and exc.status in RETRY_STATUSES) or \
        (isinstance(exc, ServerUnreachable) and exc.connect)


def _typed(exc: httpx.TransportError, url: str, timeout_s: float) -> ClientError:
    """httpx's transport error as the client's own."""
    if isinstance(exc, httpx.TimeoutException):
        return CallTimedOut(url, timeout_s)
    return ServerUnreachable(url, str(exc) or type(exc).__name__, connect=isinstance(exc, httpx.ConnectError))


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("supermask_client_deadline", default=None)
"""``time.monotonic()`` by which the sync call in progress in this context must end (None: no call)."""


def _clamp(timeout: float | None, error: type[Exception]) -> float | None:
    """A socket operation's timeout cut to the time left before the call's deadline; ``error`` (an httpcore
    timeout, which httpx maps to its own) when none is left."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the call's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read / write / TLS handshake ends by the call's deadline."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _clamp(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync network backend, its connections wrapped in :class:`_DeadlineStream`."""

    def __init__(self):
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_tcp(host, port, _clamp(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _DeadlineStream(self._backend.connect_unix_socket(path, _clamp(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _deadline_transport() -> httpx.HTTPTransport:
    """httpx's default transport over :class:`_DeadlineBackend` (httpx takes no network backend argument:
    its connection pool is rebuilt with one, as httpx builds it for a direct connection)."""
    transport = httpx.HTTPTransport()
    if isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        limits = httpx.Limits()
        transport._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend())
    return transport


def renamed_bundle(data: bytes, task: str) -> bytes:
    """``data`` (a bundle's bytes) with the task name in its header set to ``task``: the same masks and
    head, re-framed (:func:`mask_store.format.frame`, v2 header checksum recomputed) and fully validated.
    A server serves a bundle only under the name its header declares; this is how ``upload --task`` renames.

    Raises:
        BundleInvalid: ``data`` is not a valid bundle. InvalidTaskName: ``task`` is not a valid name.
    """
    from mask_store.format import MAGIC, decode_bundle, decode_header, frame
    from mask_store.local import check_task_name

    check_task_name(task)
    decode_bundle(data)  # validates everything first
    header, start = decode_header(data)  # start: where the payload begins, after any header digest
    if header.task == task:
        return data
    prefix = len(MAGIC) + 4  # magic, uint32 header length (the layout in mask_store.format's docstring)
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    raw = json.loads(data[prefix:prefix + hlen])
    raw["task"] = task
    out = frame(json.dumps(raw, separators=(",", ":")).encode("utf-8"), data[start:], header.format_version)
    decode_bundle(out)
    return out


class _Wait:
    """tenacity wait: the server's ``Retry-After`` when it gave one (at most :data:`MAX_RETRY_AFTER_S`), else
    random exponential back-off (``backoff_s`` doubling, at most 10 s)."""

    def __init__(self, backoff_s: float):
        self.backoff = wait_random_exponential(multiplier=backoff_s, max=10)

    def __call__(self, state) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER_S)
        return self.backoff(state)


def _predict_body(inputs: Inputs, options: dict[str, Any]) -> dict:
    if isinstance(inputs, str):
        raise TypeError("inputs is a list of texts (or of [text_a, text_b] pairs), not one string")
    body: dict[str, Any] = {"inputs": [x if isinstance(x, str) else list(x) for x in inputs]}
    for k, v in options.items():
        if k == "top_k" or v is not None:  # top_k=None means every label; leave it out with top_k=...
            body[k] = v
    return body


class _Base:
    def __init__(self, url: str | None, token: str | None, timeout: float, retries: int, backoff_s: float):
        self.url = (url or os.environ.get("SUPERMASK_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("SUPERMASK_ADMIN_TOKEN")
        self.headers = {"Authorization": f"Bearer {token.strip()}"} if token and token.strip() else {}
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        #: how the client waits between attempts (None: tenacity's time.sleep / asyncio.sleep)
        self.sleep = None

    def _retry_kwargs(self, deadline: float) -> dict:
        """tenacity's arguments: retry 429 / 503 / refused connections, at most ``retries`` more times, and
        never wait past ``deadline`` (``time.monotonic()``): the last error is raised instead."""
        def past_deadline(state) -> bool:
            return time.monotonic() + (state.upcoming_sleep or 0.0) >= deadline

        kw = {"retry": retry_if_exception(_retryable), "stop": stop_after_attempt(self.retries + 1) | past_deadline,
              "wait": _Wait(self.backoff_s), "reraise": True}
        if self.sleep is not None:
            kw["sleep"] = self.sleep
        return kw

    @staticmethod
    def _options(top_k, raw_scores, function_to_apply, truncate, truncation_direction) -> dict[str, Any]:
        opts: dict[str, Any] = {"raw_scores": raw_scores or None, "function_to_apply": function_to_apply,
                                "truncate": None if truncate else False, "truncation_direction": truncation_direction}
        if top_k is not ...:
            opts["top_k"] = top_k
        return opts


class Client(_Base):
    """Synchronous client.

    Args:
        url: server base URL (default ``$SUPERMASK_URL`` or ``http://127.0.0.1:8000``).
        token: admin bearer token for :meth:`upload` / :meth:`delete` (default ``$SUPERMASK_ADMIN_TOKEN``).
        timeout: seconds the whole call may take, retries and waits included (every socket operation
            ends by then).
        retries: further attempts after a 429 / 503 / connection failure (0: none).
        backoff_s: base of the exponential back-off when the server sends no ``Retry-After``.
        transport: an httpx transport (tests; the deadline then bounds only the retries and waits).

    Every method raises :class:`ApiError` for an error response (after retries), :class:`ServerUnreachable`
    when the server cannot be reached, :class:`CallTimedOut` past ``timeout``: all :class:`ClientError`.
    """

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        super().__init__(url, token, timeout, retries, backoff_s)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport or _deadline_transport())

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        deadline = time.monotonic() + self.timeout
        token = _DEADLINE.set(deadline)
        try:
            for attempt in Retrying(**self._retry_kwargs(deadline)):
                with attempt:
                    try:
                        r = self._http.request(method, path, **kw)
                    except httpx.TransportError as exc:
                        raise _typed(exc, self.url, self.timeout) from exc
                    return _raise_for(r)
        finally:
            _DEADLINE.reset(token)
        raise AssertionError("unreachable")  # tenacity re-raises the last error

    def predict(self, task: str, inputs: Inputs, *, top_k: int | None = ..., raw_scores: bool = False,
                function_to_apply: str | None = None, truncate: bool = True,
                truncation_direction: str | None = None) -> PredictPublic:
        """``POST /v1/tasks/{task}/predict``. Options as the server documents them; ``top_k=None`` asks for
        every label ranked, leaving ``top_k`` out asks for none."""
        body = _predict_body(inputs, self._options(top_k, raw_scores, function_to_apply, truncate,
                                                   truncation_direction))
        return PredictPublic.model_validate(self._request("POST", f"/v1/tasks/{task}/predict", json=body).json())

    def predict_tasks(self, tasks: Sequence[str] | str, inputs: Inputs, *, top_k: int | None = ...,
                      raw_scores: bool = False, function_to_apply: str | None = None, truncate: bool = True,
                      truncation_direction: str | None = None) -> FanOutPublic:
        """Fan-out, ``POST /v1/predict``: every task of ``tasks`` (or ``"*"``) for every input, in one call."""
        body = _predict_body(inputs, self._options(top_k, raw_scores, function_to_apply, truncate,
                                                   truncation_direction))
        body["tasks"] = tasks if isinstance(tasks, str) else list(tasks)
        return FanOutPublic.model_validate(self._request("POST", "/v1/predict", json=body).json())

    def tasks(self) -> TasksPublic:
        """``GET /v1/tasks``."""
        return TasksPublic.model_validate(self._request("GET", "/v1/tasks").json())

    def task(self, task: str) -> TaskPublic:
        """``GET /v1/tasks/{task}``."""
        return TaskPublic.model_validate(self._request("GET", f"/v1/tasks/{task}").json())

    def upload(self, task: str, bundle: bytes | str | os.PathLike, *, rename: bool = False) -> tuple[TaskPublic, bool]:
        """``PUT /v1/tasks/{task}`` with a bundle's bytes (or a path to read). Returns ``(task, created)``:
        created is False when it replaced a task. Needs the admin token. The server refuses (422) a bundle
        whose header declares another task than ``task``; ``rename=True`` first rewrites the header's name to
        ``task`` (:func:`renamed_bundle`)."""
        data = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
        if rename:
            data = renamed_bundle(data, task)
        r = self._request("PUT", f"/v1/tasks/{task}", content=data,
                          headers={**self.headers, "Content-Type": "application/octet-stream"})
        return TaskPublic.model_validate(r.json()), r.status_code == 201

    def delete(self, task: str) -> None:
        """``DELETE /v1/tasks/{task}``. Needs the admin token."""
        self._request("DELETE", f"/v1/tasks/{task}", headers=self.headers)

    def health(self) -> HealthPublic:
        """``GET /healthz``."""
        return HealthPublic.model_validate(self._request("GET", "/healthz").json())


class AsyncClient(_Base):
    """Asynchronous client: the methods of :class:`Client`, as coroutines (``async with AsyncClient() as c``)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(url, token, timeout, retries, backoff_s)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return await asyncio.wait_for(self._attempts(method, path, time.monotonic() + self.timeout, **kw),
                                          self.timeout)
        except asyncio.TimeoutError:
            raise CallTimedOut(self.url, self.timeout) from None

    async def _attempts(self, method: str, path: str, deadline: float, **kw) -> httpx.Response:
        async for attempt in AsyncRetrying(**self._retry_kwargs(deadline)):
            with attempt:
                try:
                    r = await self._http.request(method, path, **kw)
                except httpx.TransportError as exc:
                    raise _typed(exc, self.url, self.timeout) from exc
                return _raise_for(r)
        raise AssertionError("unreachable")

    async def predict(self, task: str, inputs: Inputs, *, top_k: int | None = ..., raw_scores: bool = False,
                      function_to_apply: str | None = None, truncate: bool = True,
                      truncation_direction: str | None = None) -> PredictPublic:
        body = _predict_body(inputs, self._options(top_k, raw_scores, function_to_apply, truncate,
                                                   truncation_direction))
        r = await self._request("POST", f"/v1/tasks/{task}/predict", json=body)
        return PredictPublic.model_validate(r.json())

    async def predict_tasks(self, tasks: Sequence[str] | str, inputs: Inputs, *, top_k: int | None = ...,
                            raw_scores: bool = False, function_to_apply: str | None = None, truncate: bool = True,
                            truncation_direction: str | None = None) -> FanOutPublic:
        body = _predict_body(inputs, self._options(top_k, raw_scores, function_to_apply, truncate,
                                                   truncation_direction))
        body["tasks"] = tasks if isinstance(tasks, str) else list(tasks)
        return FanOutPublic.model_validate((await self._request("POST", "/v1/predict", json=body)).json())

    async def tasks(self) -> TasksPublic:
        return TasksPublic.model_validate((await self._request("GET", "/v1/tasks")).json())

    async def task(self, task: str) -> TaskPublic:
        return TaskPublic.model_validate((await self._request("GET", f"/v1/tasks/{task}")).json())

    async def upload(self, task: str, bundle: bytes | str | os.PathLike, *,
                     rename: bool = False) -> tuple[TaskPublic, bool]:
        data = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
        if rename:
            data = renamed_bundle(data, task)
        r = await self._request("PUT", f"/v1/tasks/{task}", content=data,
                                headers={**self.headers, "Content-Type": "application/octet-stream"})
        return TaskPublic.model_validate(r.json()), r.status_code == 201

    async def delete(self, task: str) -> None:
        await self._request("DELETE", f"/v1/tasks/{task}", headers=self.headers)

    async def health(self) -> HealthPublic:
        return HealthPublic.model_validate((await self._request("GET", "/healthz")).json())
