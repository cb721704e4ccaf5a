"""Dynamic batching of concurrent predict requests, across tasks.

Concurrent requests are gathered into one call of the engine's mixed-task
forward (:meth:`service.engine.Engine.predict_mixed`), which sorts their rows
into per-task segments and runs them as few forward passes as
``max_batch_size`` allows: rows of different tasks share one pass over the
backbone (CPU fp32: the dense product ``x·Wᵀ`` of every masked layer is shared
and each task's pruned-entry correction is applied to its own rows; CPU
bf16 / int8: each segment multiplies with its task's hot weights; CUDA: one
segmented kernel launch per layer). This is the serving side of Punica-style
multi-adapter batching (Chen et al. 2023, SGMV) for supermasks.

Continuous batching: requests that arrive while a forward pass runs are
queued and taken together (up to ``max_rows`` rows) as soon as it ends, with
no further wait. A request that arrives while the batcher is idle runs at
once when ``max_wait_s`` is 0 (the default: no latency added to a lone
request); with ``max_wait_s`` > 0 it first waits for company until its
batch holds ``max_rows`` rows or ``max_wait_s`` has passed.

Clients that leave: a request whose :data:`client_gone` event is set (the API layer sets it on the ASGI
``http.disconnect``) while its rows are still queued is taken out of the queue and never computed
(:class:`ClientGone`); rows already in a running pass finish with it and their answer is dropped.

Errors stay with their request: when a gathered batch fails (an unknown or
corrupt task among them), each of its requests is run again on its own, so
only the request that caused the error receives it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

from concurrent.futures import Executor

from service import tracing
from service.forward import Rows

log = logging.getLogger(__name__)

client_gone: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("supermask_client_gone",
                                                                                  default=None)
"""The current request's "client disconnected" event, set by the API layer (:class:`service.api.limits.BodyLimit`);
None outside a request. Tasks started for the request (the engine's admitted work) inherit it."""


class ClientGone(Exception):
    """The client disconnected while its rows waited in the batcher's queue: they were dropped, not computed."""

#: ``[(task, rows), ...]`` → one result per item, in order: ``engine.predict_mixed`` (a list of prediction
#: dicts per item, what the server uses) or ``engine.logits_mixed`` (a float32 ``[len(rows), num_outputs]`` tensor).
#: When a gathered batch holds a submission with options, it is called as ``forward(items, options)`` with one
#: option object (or None) per item.
MixedForward = Callable[..., list[Any]]


@dataclass(eq=False)  # compared by identity (queue removal)
class _Pending:
    task: str
    rows: Rows
    future: asyncio.Future = field(repr=False)
    options: Any = None
    trace: Any = field(default=None, repr=False)  # the request's trace context (tracing on), and when it queued
    queued_ns: int = 0


class MicroBatcher:
    """Gathers concurrent ``(task, rows)`` submissions into mixed-task forward passes.

    Args:
        forward: the mixed-task forward, normally ``engine.predict_mixed``.
        executor: where ``forward`` runs; None: the event loop's default executor (a thread pool).
        max_rows: close a gathered batch once it holds this many rows (> 0).
        max_wait_s: an idle batcher's first submission waits this many seconds for company (>= 0; 0: none).

    Use from one asyncio event loop; the gathering task starts with the first :meth:`submit`.
    """

    def __init__(self, forward: MixedForward, max_rows: int, max_wait_s: float, executor: Executor | None = None):
        self._executor = executor
        if max_rows <= 0:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._forward = forward
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._queue: list[_Pending] = []
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog = False  # the queue filled while a forward pass ran: take it without a wait
        self.batches = 0  # forward calls made (for tests and logs)
        self.dropped = 0  # submissions dropped from the queue because their client left

    async def submit(self, task: str, rows: Rows, options: Any = None) -> Any:
        """``forward``'s result for ``rows`` of ``task`` (predictions, or head outputs float32 ``[len(rows), num_outputs]``).

        ``options`` (opaque here, e.g. :class:`service.forward.PredictOptions`) travels with the rows to ``forward``.

        Raises whatever ``forward`` raises for this request alone (TaskNotFound, BundleInvalid, ...);
        :class:`ClientGone` when the request's :data:`client_gone` event is set while its rows are still queued
        (they are removed from the queue; a pass never sees them).
        """
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            # first use, or the event loop changed (a test client that starts one per call): start afresh
            self._arrived, self._full, self._loop = asyncio.Event(), asyncio.Event(), loop
            self._backlog = False
            self._queue = [p for p in self._queue if p.future.get_loop() is loop]
            self._queued_rows = sum(len(p.rows) for p in self._queue)
            # an empty context: the long-lived worker must not carry the first request's (its trace span, its
            # request id in log lines)
            self._worker = loop.create_task(self._gather_forever(), name="supermask-batcher",
                                            context=contextvars.Context())
        item = _Pending(task, rows, loop.create_future(), options)
        if tracing.enabled():
            item.trace, item.queued_ns = tracing.current(), tracing.now_ns()
        self._queue.append(item)
        self._queued_rows += len(rows)
        self._arrived.set()
        if self._queued_rows >= self.max_rows:
            self._full.set()
        gone = client_gone.get()
        if gone is None:
            return await item.future
        waiter = loop.create_task(gone.wait())
        try:
            await asyncio.wait({item.future, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            item.future.cancel()
            raise
        finally:
            waiter.cancel()
        if item.future.done():
            return item.future.result()
        self._drop(item)
        raise ClientGone(f"the client left; its {len(rows)} row(s) of task {task!r} were dropped from the queue")

    def _drop(self, item: _Pending) -> None:
        """Take ``item`` out of the queue (if a pass has not taken it yet) and cancel its future."""
        if item in self._queue:
            self._queue.remove(item)
            self._queued_rows -= len(item.rows)
            self.dropped += 1
            if not self._queue and self._arrived is not None:
                self._arrived.clear()
            if self._queued_rows < self.max_rows and self._full is not None:
                self._full.clear()
        item.future.cancel()

    async def close(self) -> None:
        """Stop the gathering task; submissions still queued fail with ``RuntimeError``."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self._queue, self._queued_rows = [], 0

    async def _gather_forever(self) -> None:
        assert self._arrived is not None and self._full is not None
        while True:
            await self._arrived.wait()
            if self._queued_rows < self.max_rows and self.max_wait_s > 0 and not self._backlog:
                try:
                    await asyncio.wait_for(self._full.wait(), self.max_wait_s)
                except asyncio.TimeoutError:
                    pass
            batch = self._take()
            if not self._queue:
                self._arrived.clear()
            if self._queued_rows < self.max_rows:
                self._full.clear()
            live = [p for p in batch if not p.future.done()]  # a cancelled client needs no answer
            if live:
                await self._run(live)
            self._backlog = bool(self._queue)  # arrived during the pass: they go next, without a window

    def _take(self) -> list[_Pending]:
        """Pop the oldest submissions holding at most ``max_rows`` rows (always at least one)."""
        batch, rows = [], 0
        while self._queue and (not batch or rows + len(self._queue[0].rows) <= self.max_rows):
            item = self._queue.pop(0)
            batch.append(item)
            rows += len(item.rows)
        self._queued_rows -= rows
        return batch

    async def _call(self, batch: list[_Pending]) -> list[Any]:
        items = [(p.task, p.rows) for p in batch]
        args = (items,) if all(p.options is None for p in batch) else (items, [p.options for p in batch])
        if not tracing.enabled():
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._forward, *args)
        started = tracing.now_ns()
        for p in batch:  # each request's wait for this pass, under its own span
            tracing.record("supermask.queue", p.trace, p.queued_ns, started, task=p.task, rows=len(p.rows))
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: tracing.linked("supermask.batch", [p.trace for p in batch], self._forward, *args,
                                                   requests=len(batch), rows=sum(len(p.rows) for p in batch)))

    async def _run(self, batch: list[_Pending]) -> None:
        self.batches += 1
        try:
            outs = await self._call(batch)
        except Exception as exc:  # noqa: BLE001 - handed to the request(s) that caused it
            if len(batch) == 1:
                _settle(batch[0], exc=exc)
                return
            log.debug("mixed batch of %d requests failed (%s); running them one by one", len(batch), exc)
            for p in batch:
                try:
                    out = (await self._call([p]))[0]
                except Exception as one_exc:  # noqa: BLE001
                    _settle(p, exc=one_exc)
                else:
                    _settle(p, out=out)
            return
        for p, out in zip(batch, outs):
            _settle(p, out=out)


def _settle(p: _Pending, out: Any = None, exc: BaseException | None = None) -> None:
    if p.future.done():  # the client went away
        return
    if exc is not None:
        p.future.set_exception(exc)
    else:
        p.future.set_result(out)


async def run_unless_gone(executor: Executor | None, fn: Callable[..., list], items: list, prepared: list) -> list:
    """``fn(items, prepared, gone)`` on ``executor`` (None: the loop's default pool), dropped unrun if the request's
    client leaves while it waits there (:data:`client_gone`): a call already running finishes, its answer unused
    (``gone()`` tells a pass waiting for the lock to skip itself).

    Raises:
        ClientGone: the client left first.
    """
    loop = asyncio.get_running_loop()
    run = contextvars.copy_context().run  # the request's trace context in the executor's thread
    left = threading.Event()
    work = loop.run_in_executor(executor, run, fn, items, prepared, left.is_set)
    gone = client_gone.get()
    if gone is None:
        return await work
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if work.done():
        return work.result()
    left.set()  # a pass waiting for the lock skips itself (one already running finishes, its answer unused)
    work.cancel()  # not yet started on the executor: never runs
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late error is not logged as lost
    raise ClientGone(f"the client left while {sum(len(r) for _, r in items)} rows waited for a pass")
