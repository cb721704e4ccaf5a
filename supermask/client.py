"""Python client of the supermask REST API: sync (:class:`Client`) and async (:class:`AsyncClient`), over httpx.

Results are the server's own pydantic models (:mod:`service.api.schemas`, which needs no torch). A call
answered 429 (overloaded) or 503 (unavailable), or that could not connect, is retried with tenacity:
after the server's ``Retry-After`` (seconds, or an HTTP date) when it sends one, else with exponential
back-off and jitter, up to ``retries`` more attempts; any other error response raises :class:`ApiError`
with the server's error type and message.

    from supermask.client import Client

    with Client("http://127.0.0.1:8000") as c:
        c.predict("SST-2", ["a charming and often affecting journey"], top_k=None).predictions[0].top

The server URL and admin token default to ``$SUPERMASK_URL`` (else ``http://127.0.0.1:8000``) and
``$SUPERMASK_ADMIN_TOKEN``.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from service.api.schemas import FanOutPublic, HealthPublic, PredictPublic, TaskPublic, TasksPublic

__all__ = ["ApiError", "AsyncClient", "Client", "DEFAULT_URL"]

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER_S = 60.0
"""A ``Retry-After`` longer than this is waited only this long before the next try."""

Inputs = Sequence[str | Sequence[str]]


class ApiError(RuntimeError):
    """An error response: ``status`` (HTTP), ``type`` (the server's error type, e.g. ``TaskNotFound``),
    ``message``; ``retry_after`` (seconds) when the server sent ``Retry-After``."""

    def __init__(self, status: int, type: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message, self.retry_after = status, type, message, retry_after


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (RFC 9110: delay-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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
    return (isinstance(exc, ApiError) and exc.status in RETRY_STATUSES) or isinstance(exc, httpx.ConnectError)


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
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        #: how the client waits between attempts (None: tenacity's time.sleep / asyncio.sleep)
        self.sleep = None

    def _retry_kwargs(self) -> dict:
        kw = {"retry": retry_if_exception(_retryable), "stop": stop_after_attempt(self.retries + 1),
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
        timeout: seconds per HTTP request.
        retries: further attempts after a 429 / 503 / connection failure (0: none).
        backoff_s: base of the exponential back-off when the server sends no ``Retry-After``.
        transport: an httpx transport (tests).

    Every method raises :class:`ApiError` for an error response (after retries) and ``httpx.TransportError``
    when the server cannot be reached.
    """

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None):
        super().__init__(url, token, timeout, retries, backoff_s)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in Retrying(**self._retry_kwargs()):
            with attempt:
                return _raise_for(self._http.request(method, path, **kw))
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

    def upload(self, task: str, bundle: bytes | str | os.PathLike) -> tuple[TaskPublic, bool]:
        """``PUT /v1/tasks/{task}`` with a bundle's bytes (or a path to read). Returns ``(task, created)``:
        created is False when it replaced a task. Needs the admin token."""
        data = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
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
        async for attempt in AsyncRetrying(**self._retry_kwargs()):
            with attempt:
                return _raise_for(await self._http.request(method, path, **kw))
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

    async def upload(self, task: str, bundle: bytes | str | os.PathLike) -> tuple[TaskPublic, bool]:
        data = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
        r = await self._request("PUT", f"/v1/tasks/{task}", content=data,
                                headers={**self.headers, "Content-Type": "application/octet-stream"})
        return TaskPublic.model_validate(r.json()), r.status_code == 201

    async def delete(self, task: str) -> None:
        await self._request("DELETE", f"/v1/tasks/{task}", headers=self.headers)

    async def health(self) -> HealthPublic:
        return HealthPublic.model_validate((await self._request("GET", "/healthz")).json())
