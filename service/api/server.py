"""Running the app under uvicorn: a request-head timeout and a concurrency limit.

uvicorn times out idle keep-alive connections but not a connection that never completes its first
request head: 5,000 half-open connections all stayed open for 30 s. :class:`HeadTimeoutProtocol` is
uvicorn's own HTTP protocol (httptools where installed, else h11: uvicorn's "auto") that closes a
connection whose request head is not complete within ``SUPERMASK_HEADER_TIMEOUT_S`` seconds. Select it
with ``uvicorn --http service.api.server:HeadTimeoutProtocol`` (the Docker image does) or through
:func:`run` (``supermask serve``).
"""

from __future__ import annotations

import asyncio
import functools

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.settings import Settings


@functools.cache
def _head_timeout_s() -> float:
    """``SUPERMASK_HEADER_TIMEOUT_S``, read once per process (uvicorn's worker processes import this anew)."""
    return Settings().header_timeout_s


class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, closing a connection that has not sent a complete request head within
    the header timeout. A request whose head arrived is never cut (its body and response take as
    long as they take); keep-alive idling afterwards stays uvicorn's ``timeout_keep_alive``."""

    head_timeout_s: float | None = None  # None: SUPERMASK_HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        timeout = self.head_timeout_s if self.head_timeout_s is not None else _head_timeout_s()
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(timeout, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None:  # the first request head is complete
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


def run(settings: Settings) -> None:
    """Serve :func:`service.api.main.create_app` with ``settings`` on ``settings.host:port``, with the
    request-head timeout and ``settings.limit_concurrency``."""
    import uvicorn

    from service.api.main import create_app

    HeadTimeoutProtocol.head_timeout_s = settings.header_timeout_s
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                http=HeadTimeoutProtocol, limit_concurrency=settings.limit_concurrency)
