"""Running the app under uvicorn: request head and body timeouts on every request, a concurrency limit with
slots kept for health probes.

uvicorn times out idle keep-alive connections (no byte at all) but not a request whose head or body stalls
part-way: 5,000 half-open connections all stayed open for 30 s, and after one complete request a partial
second head, or a complete head whose body stalls, held its connection for a minute (511 of them made every
new request 503). :class:`HeadTimeoutProtocol` is uvicorn's own HTTP protocol (httptools where installed,
else h11: uvicorn's "auto") that

* closes a connection whose next request head is not complete within ``SUPERMASK_HEADER_TIMEOUT_S`` seconds,
  counted from the connection's start and, on keep-alive, from the end of the previous response;
* answers 408 and closes a connection whose request body receives no byte for ``SUPERMASK_BODY_TIMEOUT_S``
  seconds while the server waits for it (not while the app has paused reading: flow control);
* admits requests for ``/healthz``, ``/readyz`` and ``/v2/health/*`` up to ``SUPERMASK_HEALTH_RESERVED_SLOTS``
  connections beyond ``SUPERMASK_LIMIT_CONCURRENCY`` (uvicorn's ``limit_concurrency``; any other request over
  it gets uvicorn's 503), so that probes are answered while every ordinary slot is held.

Select it with ``uvicorn --http service.api.server:HeadTimeoutProtocol`` (the Docker image does; uvicorn's
``--limit-concurrency`` is then the total, probes' slots included) or through :func:`run` (``supermask serve``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import threading
from pathlib import Path

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service.settings import Settings

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
"""Paths that may use the slots kept beyond the concurrency limit."""


@functools.cache
def _settings() -> Settings:
    """The settings, read once per process (uvicorn's worker processes import this anew)."""
    return Settings()


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"type": "RequestTimeout", "message": f"the request body sent no byte for "
                                 f"{seconds:g} s (SUPERMASK_BODY_TIMEOUT_S)"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with a head timeout on every request, a body idle timeout, and concurrency
    slots kept for health probes (see the module docstring). A request whose head and body arrived is never
    cut (its response takes as long as it takes)."""

    head_timeout_s: float | None = None  # None: SUPERMASK_HEADER_TIMEOUT_S
    body_timeout_s: float | None = None  # None: SUPERMASK_BODY_TIMEOUT_S
    health_reserved_slots: int | None = None  # None: SUPERMASK_HEALTH_RESERVED_SLOTS

    # uvicorn's __init__ sets limit_concurrency from its config (the total, probes' slots included) and reads
    # it once a request's path is known: the property gives ordinary paths the total less the reserved slots
    @property
    def limit_concurrency(self) -> int | None:
        total = self._total_limit
        if total is None:
            return None
        scope = getattr(self, "scope", None)
        path = scope.get("path", "") if isinstance(scope, dict) else ""
        if path.removeprefix(scope.get("root_path", "") if isinstance(scope, dict) else "") in HEALTH_PATHS:
            return total
        return max(1, total - self._reserved())

    @limit_concurrency.setter
    def limit_concurrency(self, value: int | None) -> None:
        self._total_limit = value

    def _reserved(self) -> int:
        n = self.health_reserved_slots
        return _settings().health_reserved_slots if n is None else n

    def _head_s(self) -> float:
        return self.head_timeout_s if self.head_timeout_s is not None else _settings().header_timeout_s

    def _body_s(self) -> float:
        return self.body_timeout_s if self.body_timeout_s is not None else _settings().body_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._seen_cycle = None  # the request whose head is the latest complete one
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:  # a new request head is complete
            self._seen_cycle = cycle
            self._cancel("_head_timer")
        if cycle is not None and cycle.more_body and not cycle.response_complete:
            self._arm_body_timer()  # body bytes are awaited: the idle clock restarts with every chunk
        else:
            self._cancel("_body_timer")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel("_body_timer")
        if not self.transport.is_closing():
            self._arm_head_timer()  # keep-alive: the next head has its own timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel("_head_timer")
        self._cancel("_body_timer")
        super().connection_lost(exc)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name, None)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _arm_head_timer(self) -> None:
        self._cancel("_head_timer")
        self._head_timer = self.loop.call_later(self._head_s(), self._head_timed_out, self.cycle)

    def _arm_body_timer(self) -> None:
        self._cancel("_body_timer")
        self._body_timer = self.loop.call_later(self._body_s(), self._body_timed_out, self.cycle)

    def _head_timed_out(self, armed_for) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete  # no request in progress (pipelining)
        if self.cycle is armed_for and waiting and not self.transport.is_closing():
            self.transport.close()

    def _body_timed_out(self, armed_for) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is not armed_for or cycle is None or not cycle.more_body or cycle.response_complete:
            return
        if self.flow.read_paused:  # the app has not read what came: the client is not the one stalling
            self._arm_body_timer()
            return
        if not self.transport.is_closing():
            if not cycle.response_started:
                self.transport.write(_timeout_response(self._body_s()))
            self.transport.close()


class BackgroundStreamHandler(logging.Handler):
    """A ``logging.StreamHandler`` whose formatting and writing run in a thread of its own, in batches, for the
    access log. The thread that logs (the event loop) only makes the record, runs the handler's filters (so the
    request-id filter reads the request's context) and queues it: ~5 µs a line, where formatting and writing it
    there took ~35 µs on a 2-core host. The writing thread wakes every ``interval_s`` seconds (not once per line:
    a wake-up per request cost as much as the line itself) and writes what is queued with one ``write`` and one
    ``flush``. Lines keep their order and appear at most ``interval_s`` late; what is still queued is written by
    :meth:`flush` and :meth:`close` (logging's shutdown at exit calls both).

    A record's message is formatted later, in the writing thread: log through it only what does not change
    afterwards (uvicorn's access lines: strings and an int).

    Args:
        stream: where lines go; default ``sys.stderr`` (as ``logging.StreamHandler``).
        interval_s: seconds between two writes of the queued lines (> 0).
    Raises:
        ValueError: ``interval_s`` is not positive.
    """

    def __init__(self, stream=None, interval_s: float = 0.05):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        super().__init__()
        self.target = logging.StreamHandler(stream)
        self.interval_s = interval_s
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._drain_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(target=self._write_forever, daemon=True,
                                                                 name="supermask-access-log")
        self._thread.start()

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        self.target.setFormatter(fmt)  # used by the writing thread

    def emit(self, record: logging.LogRecord) -> None:
        self._queue.put(record)

    def flush(self) -> None:
        """Write what is queued now."""
        self._drain()

    def close(self) -> None:
        """Write what is queued, then stop the writing thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        self._drain()
        super().close()

    def _write_forever(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain()

    def _drain(self) -> None:
        with self._drain_lock:
            lines = []
            while True:
                try:
                    record = self._queue.get_nowait()
                except queue.Empty:
                    break
                try:
                    lines.append(self.target.format(record) + self.target.terminator)
                except Exception:  # noqa: BLE001 - logging's own policy: report it, never raise
                    self.target.handleError(record)
            if lines:
                try:
                    self.target.stream.write("".join(lines))
                    self.target.flush()
                except Exception:  # noqa: BLE001
                    self.target.handleError(record)


LOG_CONFIG = Path(__file__).with_name("logging.json")
"""Logging of the server (``logging.config.dictConfig`` schema): every line carries the request id
(``X-Request-ID``, accepted or generated by asgi-correlation-id's middleware; ``-`` outside a request);
access lines are formatted and written off the event loop (:class:`BackgroundStreamHandler`).
``uvicorn --log-config service/api/logging.json`` (the Docker image) or :func:`run` apply it."""


def log_config(level: str = "INFO") -> dict:
    """:data:`LOG_CONFIG` with every logger at ``level``."""
    config = json.loads(LOG_CONFIG.read_text())
    for logger in config["loggers"].values():
        logger["level"] = level.upper()
    return config


def run(settings: Settings) -> None:
    """Serve :func:`service.api.main.create_app` with ``settings`` on ``settings.host:port``, with the
    request head and body timeouts, ``settings.limit_concurrency`` and the health probes' reserved slots."""
    import uvicorn

    from service.api.main import create_app

    HeadTimeoutProtocol.head_timeout_s = settings.header_timeout_s
    HeadTimeoutProtocol.body_timeout_s = settings.body_timeout_s
    HeadTimeoutProtocol.health_reserved_slots = settings.health_reserved_slots
    limit = settings.limit_concurrency
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                log_config=log_config(settings.log_level), http=HeadTimeoutProtocol,
                limit_concurrency=None if limit is None else limit + settings.health_reserved_slots)
