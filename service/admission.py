"""Admission: at most ``SUPERMASK_MAX_QUEUED_REQUESTS`` predict calls queued or running at once, each answered
within ``SUPERMASK_REQUEST_TIMEOUT_S`` (the stage between a checked request and the batcher); and each request's
count, latency and rows in the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from service.errors import Overloaded, RequestTimedOut
from service.metrics import Metrics

T = TypeVar("T")


class Admission:
    """Counts the predict calls in progress (queued or running) on one event loop.

    Args:
        metrics: ``supermask_admitted_requests`` and ``supermask_overloaded_total`` are recorded here.
        max_queued: the limit (None: unbounded, for library use; the server sets it).
        timeout_s: seconds a call may take before it is answered 503 (None: no limit).
    """

    def __init__(self, metrics: Metrics, max_queued: int | None = None, timeout_s: float | None = None):
        self.metrics = metrics
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.in_progress = 0

    async def run(self, work: Awaitable[T]) -> T:
        """Run ``work`` (a predict call) under admission control. A call that times out is answered at once, but
        its slot stays taken until its work has really finished (the pass it joined still runs), so the bound
        holds for the work in progress, not only for the waiting clients. Runs on the event loop (no lock: one
        thread).

        Raises:
            Overloaded: the limit is reached (``work`` is closed unrun). RequestTimedOut: no answer in time.
        """
        if self.max_queued is not None and self.in_progress >= self.max_queued:
            self.metrics.overloaded.inc()
            if inspect.iscoroutine(work):
                work.close()
            raise Overloaded(f"{self.in_progress} predict requests are in progress, the limit "
                             f"(SUPERMASK_MAX_QUEUED_REQUESTS) is {self.max_queued}: retry shortly")
        self.in_progress += 1
        self.metrics.admitted.set(self.in_progress)
        task = asyncio.ensure_future(work)

        def release(done: asyncio.Future) -> None:
            self.in_progress -= 1
            self.metrics.admitted.set(self.in_progress)
            if not done.cancelled():
                done.exception()  # retrieved: a timed-out call's late error is not logged as never retrieved

        task.add_done_callback(release)
        # asyncio.wait leaves the work running when the wait ends (as shield would) and costs one waiter, not the
        # two extra futures of wait_for(shield(...))
        done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        if not done:
            raise RequestTimedOut(f"no answer within {self.timeout_s:g} s (SUPERMASK_REQUEST_TIMEOUT_S)")
        return task.result()


@contextlib.contextmanager
def observed(metrics: Metrics, task: str, rows: int, known: Callable[[], bool]) -> Iterator[None]:
    """Count and time one predict request of ``task`` (``rows`` inputs) around the block it wraps.

    When the block completes: ``requests{task, "ok"}`` +1 and its latency (seconds, from entering the block) and row
    count observed, unless ``known()`` says the task is gone (deleted meanwhile); when it raises an ``Exception``: ``requests{task, "error"}`` +1 — under ``_unknown`` unless
    ``known()`` (the task is stored), so that a scan of bad names cannot grow the label set — and the exception
    propagates unchanged.
    """
    t0 = time.perf_counter()
    try:
        yield
    except Exception:
        metrics.requests.labels(metrics.task(task) if known() else "_unknown", "error").inc()
        raise
    if not known():  # deleted while it was answered: its series were removed with it, and stay removed
        return
    metrics.request_seconds.labels(metrics.task(task)).observe(time.perf_counter() - t0)
    metrics.requests.labels(metrics.task(task), "ok").inc()
    metrics.rows.labels(metrics.task(task)).observe(rows)
