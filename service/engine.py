"""Engine: the façade the API calls — predict (request metrics, admission, batching or not), register and delete
tasks, status for health — over one tier chosen once (:mod:`service.tiers`).

A request is followed top-down: the route calls :meth:`Engine.predict_async`; the request is prepared once
(:mod:`service.passes`: checked against its task, the task loaded and promoted, its rows tokenized; a hot task
without a thread hop), admitted (:mod:`service.admission`), then handed to the micro-batcher
(:mod:`service.batcher`, which gathers concurrent requests of any task into one call of
:meth:`service.passes.Passes.run_prepared`) or run alone; the rows run as length-classed mixed-task passes
(:mod:`service.forward`) on the tier, whose ``pooled`` pass applies each segment's task mask (torch tiers through
:mod:`service.masked_linear` and :mod:`service.dispatch` to :mod:`service.kernels`; ONNX Runtime through each
task's session), and are decoded per protocol.

Passes are serialised by the pass lock; task loads, promotions, the store's freshness checks and tokenization
run outside it.
"""

from __future__ import annotations

import contextlib
import os
import logging
import threading
from collections.abc import Awaitable, Sequence
from typing import TypeVar
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi.concurrency import run_in_threadpool

from backbone import Backbone
from mask_store.format import BundleHeader
from mask_store.local import LocalMaskStore
from mask_store.store import MaskStore
from service.admission import Admission, observed
from service.batcher import MicroBatcher, run_unless_gone
from service.forward import Forward, PredictOptions, PredictRequest, Rows
from service.passes import Passes, Prepared, check_request
from service.masked_linear import MaskedLinear, wrap_backbone
from service.metrics import Metrics
from service import tracing
from service.tasks import LoadedTask, TaskBuilder, TaskCache, TaskTable
from service.tiers.select import needs_model_forward, resolve_precision, select_tier

__all__ = ["Engine", "PredictOptions", "PredictRequest", "needs_model_forward", "resolve_precision"]

T = TypeVar("T")

INLINE_PREPARE_CHARS = 2048
"""A hot task's request of at most this many characters is prepared on the event loop (no thread hop); a longer
one in a worker thread (tokenizing 64 inputs of 10,000 characters took ~350 ms here)."""
log = logging.getLogger(__name__)

class Engine:
    """Serves predictions for any stored task over one shared backbone.

    Args:
        backbone: the loaded, quantized backbone (its modules are wrapped in place; on CUDA
            its model is moved to the GPU in float16).
        store: where bundles live.
        metrics: collectors to record into.
        cache_bytes: byte budget of the host task cache.
        max_batch_size: rows per forward pass.
        kernel_path: "auto" or a forced path (see :class:`service.settings.Settings`).
        device: "auto", "cpu" or "cuda" (see :func:`service.dispatch.resolve_device`).
        device_slots: GPU mask slots of the device tier (CUDA only); ``cache_bytes`` must hold
            at least this many tasks.
        precision: CPU compute precision: "fp32" (the reference: float32 over the shared de-quantized
            weights and sparse corrections), "bf16" or "int8" (the hot tier, :mod:`service.hot_tier`),
            or "auto" (:func:`service.kernels.cpu_features.auto_precision` by the CPU's features). Ignored
            on the device tier.
        hot_cache_bytes: byte budget of the CPU hot tier (bf16 / int8 only).
        runtime: what runs a CPU hot tier: "torch", "onnxruntime" (int8 only: :mod:`service.tiers.onnxruntime`)
            or "auto" (:func:`service.tiers.select.resolve_runtime`).
        pinned_tasks: tasks never evicted from the host cache or the hot tier.
        hot_promote_after, hot_promote_window_s: a task is kept in the hot tier from its ``hot_promote_after``-th
            request within that many seconds (before: served through its sparse form, or built for its pass only;
            see :class:`service.hot_tier.HotCache`).
        hot_promote_background: promote a task that earned its place on a background thread while its sparse form
            serves it (sparse forms on); False (here the default: a call returns with its promotion done) promotes
            on the request path. The server sets it from ``SUPERMASK_HOT_PROMOTE_BACKGROUND`` (default true).
        sparse_cache_bytes: byte budget of the sparse forms that serve a task not hot (:mod:`service.sparse_forms`;
            0: off).
        batching: cross-request micro-batching (:class:`service.batcher.MicroBatcher`) for
            :meth:`predict_async`; False runs each request alone.
        batch_wait_ms: with batching, how long a request arriving at an idle server waits for company.
        emulate_device_path: TEST-ONLY hook. With ``device="cpu"``, serve through the device
            tier (host tier of packed masks, :class:`DeviceTaskCache` on the CPU, segmented
            kernels) with this path forced: "triton_fused" (needs ``TRITON_INTERPRET=1`` set
            before triton is imported; tests/conftest.py does so without CUDA), "gpu_complement"
            (torch CPU sparse ops) or "reference". Lets the CUDA serving logic be tested on a
            machine without a GPU; never set by the server.

    Raises:
        ValueError: a kernel path or device that cannot run here, an unknown precision, a forced CPU
            kernel path with a precision other than fp32, or (device tier) a host cache too small for
            ``device_slots`` tasks.
    """

    def __init__(self, backbone: Backbone, store: MaskStore, metrics: Metrics, cache_bytes: int,
                 max_batch_size: int = 32, kernel_path: str = "auto", device: str = "auto",
                 device_slots: int = 16, batching: bool = False, batch_wait_ms: float = 0.0, precision: str = "fp32",
                 hot_cache_bytes: int = 256 * 1024 * 1024, *, runtime: str = "auto",
                 pinned_tasks: Sequence[str] = (), hot_promote_after: int = 1, hot_promote_window_s: float = 60.0,
                 hot_promote_background: bool = False, sparse_cache_bytes: int = 128 * 1024 * 1024,
                 emulate_device_path: str | None = None,
                 max_queued_requests: int | None = None, request_timeout_s: float | None = None):
        self.backbone = backbone
        self.admission = Admission(metrics, max_queued_requests, request_timeout_s)  # None: unbounded (library use)
        self.store = store
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.kernel_path = kernel_path
        self.layers: dict[str, MaskedLinear] = {}
        #: the tier every pass runs on (:mod:`service.tiers`), chosen once from these settings
        self.compute_tier = select_tier(backbone, self._wrap, metrics, cache_bytes=cache_bytes, kernel_path=kernel_path,
                                device=device, device_slots=device_slots, precision=precision, runtime=runtime,
                                hot_cache_bytes=hot_cache_bytes, emulate_device_path=emulate_device_path,
                                hot_policy=dict(pinned=tuple(pinned_tasks), promote_after=hot_promote_after,
                                                window_s=hot_promote_window_s, background=hot_promote_background,
                                                sparse_bytes=sparse_cache_bytes))
        self.device = self.compute_tier.device
        #: CPU compute precision ("fp32", "bf16", "int8"); "device" on the device tier
        self.precision = self.compute_tier.precision
        self.hot = self.compute_tier.hot
        log.info("serving tier: precision %s on %s (runtime %s)", self.precision, self.device, self.compute_tier.runtime)
        metrics.cpu_precision.labels(self.precision).set(1)
        metrics.tier.labels(self.precision, self.compute_tier.runtime).set(1)
        self.builder = TaskBuilder(backbone, self.compute_tier.weights, cache_bytes, kernel_path=kernel_path,
                                   device=self.device if self.compute_tier.warm_form == "device" else None,
                                   packed=self.compute_tier.warm_form == "packed")
        self.tasks = TaskTable(store, self.builder, metrics, on_drop=self._forget, pinned=pinned_tasks)
        self.forward = Forward(backbone, self.compute_tier, max_batch_size)
        self.passes = Passes(backbone, self.tasks, self.compute_tier, self.forward, max_batch_size)
        #: where the passes of predict_async run. The hot tier: one dedicated thread (its passes, mostly small
        #: and run on one intra-op thread, measured b32 66 vs 85 ms on a pool thread); fp32: the event loop's
        #: default pool (a dedicated thread measured b32 275 vs 225 ms there). 2-core AMD EPYC, torch 2.13.
        self._forward_thread = (ThreadPoolExecutor(1, thread_name_prefix="supermask-forward")
                                if self.compute_tier.dedicated_thread else None)
        self.batcher = (MicroBatcher(self._predict_prepared, max_rows=max_batch_size, max_wait_s=batch_wait_ms / 1e3,
                                     executor=self._forward_thread) if batching else None)
        metrics.backbone_bytes.set(backbone.parameter_bytes())
        metrics.cache_capacity_bytes.set(cache_bytes)
        metrics.resident_tasks.set(0)
        metrics.cache_bytes.set(0)

    def _wrap(self) -> dict[str, MaskedLinear]:
        """:func:`service.masked_linear.wrap_backbone`, kept as the engine's layers."""
        self.layers = wrap_backbone(self.backbone)
        return self.layers

    # ---- state --------------------------------------------------------------------------------
    @property
    def device_tier(self) -> bool:
        """Whether passes run on the device tier (GPU slots, or their CPU emulation in tests)."""
        return self.compute_tier.warm_form == "device"

    @property
    def cache(self) -> TaskCache:
        """The host task cache (read-only use: the task table guards it)."""
        return self.tasks.cache

    @property
    def device_cache(self):
        """The device tier's :class:`service.device_cache.DeviceTaskCache`, or None on the CPU tier."""
        return self.compute_tier.cache if self.device_tier else None

    def is_resident(self, task: str) -> bool:
        return self.tasks.is_resident(task)

    def status(self) -> dict:
        """For health checks: ``{"device", "precision", "runtime", "resident_tasks", "hot_tasks", "tiers"}``;
        ``tiers`` has ``{"tasks", "bytes", "capacity_bytes", "evictions"}`` per tier ("warm", and "hot" where the
        tier has one, with its pinned tasks, and "sparse" where it has sparse forms)."""
        cache = self.tasks.cache
        tiers = {"warm": {"tasks": len(cache.tasks), "bytes": cache.used_bytes, "capacity_bytes": cache.capacity_bytes,
                          "evictions": self.tasks.evictions}}
        if self.hot is not None:
            tiers["hot"] = self.hot.status()
        sparse = getattr(self.compute_tier, "sparse", None)
        if sparse is not None:
            tiers["sparse"] = sparse.status()
        return {"device": str(self.device), "precision": self.precision, "runtime": self.compute_tier.runtime,
                "resident_tasks": len(self.tasks.resident()),
                "hot_tasks": len(self.hot.tasks) if self.hot is not None else None, "tiers": tiers}

    def header(self, task: str) -> BundleHeader:
        """The header of ``task`` (the resident one, else read from the store; no torch work).

        Raises:
            TaskNotFound, InvalidTaskName, BundleInvalid: as :meth:`service.tasks.TaskTable.header`.
        """
        return self.tasks.header(task)

    def tier(self, task: str) -> str:
        """Where ``task`` is now: "hot" (CPU hot tier), "warm" (host cache; on the fp32 CPU path and the
        device tier every resident task is "warm") or "cold" (only in the store)."""
        if self.hot is not None and task in self.hot.tasks:
            return "hot"
        return "warm" if self.tasks.is_resident(task) else "cold"

    # ---- tasks --------------------------------------------------------------------------------
    def build_task(self, bundle) -> LoadedTask:
        """The resident form of a validated bundle (raises as :meth:`service.tasks.TaskBuilder.build`)."""
        return self.builder.build(bundle)

    def warm(self, task: str) -> LoadedTask:
        """Load ``task`` into the cache now (raises as :meth:`predict`)."""
        return self.tasks.get(task)

    def register(self, task: str, data: bytes | os.PathLike) -> tuple[BundleHeader, bool]:
        """Store an uploaded bundle for ``task``: decode and validate it once, build its resident form
        (the checks the first predict would make), write it atomically, drop the old resident form.
        ``data``: the bytes, or the path of the store's spool file holding them (:meth:`LocalMaskStore.spool`).

        Returns:
            ``(header, created)``; ``created`` False when it replaced a task.
        Raises:
            InvalidTaskName, BundleTooLarge, BundleInvalid, BackboneMismatch, TaskTooLarge; on any
            error the store and the cache are unchanged.
        """
        bundle, created = self.store.put(task, data, self.backbone.fingerprint, check=self.builder.build)
        self.invalidate(task)
        return bundle.header, created

    def delete(self, task: str) -> None:
        """Remove ``task`` from the store, the caches and the metrics' label sets.

        Raises TaskNotFound, InvalidTaskName, StoreUnavailable."""
        self.store.delete(task)
        self.invalidate(task)
        self.metrics.forget(task)

    def invalidate(self, task: str) -> None:
        """Drop ``task`` from the caches now (after an upload replaced it or a delete); optional for correctness (a
        cache hit compares the store's :meth:`MaskStore.version` and reloads a replaced task), it frees the memory."""
        self.tasks.drop(task)  # calls _forget

    def _forget(self, task: str) -> None:
        """Free ``task``'s hot weights and device slot (the task table dropped it: invalidated, deleted or
        replaced in the store). Never called with the pass lock or the task table's lock held."""
        self.compute_tier.forget(task, self._lock)

    # ---- inference ------------------------------------------------------------------------------
    def logits_mixed(self, items: Sequence[tuple[str, Rows]]) -> list[torch.Tensor]:
        """Head outputs, one float32 ``[len(rows), num_outputs]`` per ``(task, rows)`` item, in order, from as few
        mixed-task passes as possible (:meth:`service.passes.Passes.mixed`, which says how and what it raises)."""
        return self.passes.mixed(items)[0]

    def predict_mixed(self, items: Sequence[tuple[str, Rows]],
                      options: Sequence[PredictOptions | None] | None = None) -> list[list[dict]]:
        """:meth:`logits_mixed` decoded into predictions (as :meth:`predict`), one list per item, each with the
        header of the bundle its pass used (:meth:`service.passes.Passes.predict_mixed`)."""
        return self.passes.predict_mixed(items, options=options)

    def _predict_prepared(self, items: Sequence[tuple[str, Rows]], prepared: Sequence[Prepared],
                          cancelled=None) -> list[list[dict]]:
        """The batcher's forward: :meth:`service.passes.Passes.run_prepared`."""
        return self.passes.run_prepared(items, prepared, cancelled)

    def logits(self, task: str, rows: list[tuple[str, str | None]]) -> torch.Tensor:
        """Head outputs ``[len(rows), num_outputs]`` float32 for ``task`` (a mixed batch of one task).

        Raises:
            TaskNotFound, BundleInvalid, BackboneMismatch, TaskTooLarge. InputInvalid: pairs for a
            single-sentence task or the reverse.
        """
        return self.passes.mixed([(task, rows)])[0][0]

    def check_inputs(self, req: PredictRequest) -> BundleHeader:
        """The header of ``req.task`` after checking that the inputs fit it (single texts or pairs) and that a
        regression task is not asked for classification-only options (a cheap early check on the resident or stored
        header; the pass checks again against the bundle it uses).

        Raises:
            TaskNotFound: no such task. InputInvalid: pairs for a single-sentence task or the reverse;
            ``top_k``, ``raw_scores`` or ``function_to_apply`` for a regression task.
            BundleInvalid: the stored header cannot be read.
        """
        header = self.tasks.header(req.task)
        check_request(req, header)
        return header

    def observed(self, req: PredictRequest) -> contextlib.AbstractContextManager:
        """Count and time ``req`` around the block it wraps (:func:`service.admission.observed`)."""
        return observed(self.metrics, req.task, len(req.inputs),
                        lambda: self.tasks.is_resident(req.task) or self.store.exists(req.task))

    def predict(self, req: PredictRequest) -> list[dict]:
        """Predictions for a request, in input order, from forward passes of this request alone.

        Classification: ``{"label", "score", "scores": {label: probability}}``;
        regression: ``{"value"}``.

        Raises:
            TaskNotFound: no such task. InputInvalid: inputs do not fit the task
            (pairs for a single-sentence task or the reverse). BundleInvalid,
            BackboneMismatch, TaskTooLarge: the stored bundle cannot be served.
        """
        with self.observed(req):
            self.check_inputs(req)
            return self.predict_mixed([(req.task, req.inputs)], [req.options])[0]

    async def admitted(self, work: Awaitable[T]) -> T:
        """Run ``work`` (a predict call) under admission control (:meth:`service.admission.Admission.run`).

        Raises:
            Overloaded, RequestTimedOut: as :meth:`service.admission.Admission.run`.
        """
        return await self.admission.run(work)

    @property
    def _admitted(self) -> int:
        """Predict calls in progress (queued or running) now."""
        return self.admission.in_progress

    async def predict_async(self, req: PredictRequest) -> list[dict]:
        """:meth:`predict` from the event loop (same result, errors and metrics), under :meth:`admitted`.

        The request's inputs are checked and its task loaded and promoted first, in a worker thread
        (a bad request fails here, not in a gathered batch; a cold task stalls no other request). Then,
        with micro-batching on, its rows join concurrent requests of any task in the next pass; else they
        run alone, in a worker thread (see ``_forward_thread``).
        """
        return await self.admitted(self._predict_async(req))

    async def _predict_async(self, req: PredictRequest) -> list[dict]:
        with self.observed(req):
            with tracing.span("supermask.prepare", task=req.task, rows=len(req.inputs)):
                if self._is_hot(req):  # nothing to load or promote, small: no thread hop
                    prepared = self.prepare(req)
                else:
                    prepared = await run_in_threadpool(self.prepare, req)
            if self.batcher is not None:
                return await self.batcher.submit(req.task, req.inputs, prepared)
            return (await self._run_unless_gone([(req.task, req.inputs)], [prepared]))[0]

    async def _run_unless_gone(self, items: Sequence[tuple[str, Rows]], prepared: Sequence[Prepared]) -> list:
        """:meth:`_predict_prepared` on the forward thread unless the client leaves first
        (:func:`service.batcher.run_unless_gone`)."""
        return await run_unless_gone(self._forward_thread, self._predict_prepared, items, prepared)

    def _is_hot(self, req: PredictRequest) -> bool:
        """Whether preparing ``req`` can run on the event loop: its task resident and, where the tier has a hot
        cache, hot or with its sparse form held and promotions in the background (nothing to load or build), the
        store local (its freshness check is
        one ``stat``, not a network call), and the request small (its tokenization takes well under a millisecond).
        A bundle replaced by another worker since is still reloaded there, once."""
        if not isinstance(self.store, LocalMaskStore):
            return False
        if sum(len(a) + len(b or "") for a, b in req.inputs) > INLINE_PREPARE_CHARS:
            return False
        sparse = getattr(self.compute_tier, "sparse", None)
        # a held sparse form only when promotions run in the background: else this request may promote, here
        held = sparse is not None and self.hot.background and req.task in sparse.tasks
        return self.tasks.is_resident(req.task) and (self.hot is None or req.task in self.hot.tasks or held)

    async def predict_fanout_async(self, reqs: Sequence[PredictRequest]) -> list[list[dict]]:
        """Predictions for several requests (a fan-out: the same inputs for several tasks) from ONE call
        of the mixed-task forward (:meth:`predict_mixed`): the rows of every task share each length class's
        passes (1 input x 6 tasks: one pass of 6 rows), instead of one pass per task.

        Each request is checked, loaded and counted as :meth:`predict_async` does (metrics per task); the
        call does not join the micro-batcher's gathered passes, it is one of its own.

        Returns:
            One prediction list per request, in order.
        Raises:
            as :meth:`predict` for the first request that fails (nothing is answered then).
        """
        return await self.admitted(self._fanout_async(reqs))

    async def _fanout_async(self, reqs: Sequence[PredictRequest]) -> list[list[dict]]:
        with contextlib.ExitStack() as stack:
            for req in reqs:
                stack.enter_context(self.observed(req))
            with tracing.span("supermask.prepare", tasks=len(reqs), rows=sum(len(r.inputs) for r in reqs)):
                prepared = await run_in_threadpool(self._prepare_fanout, reqs)
            return await self._run_unless_gone([(r.task, r.inputs) for r in reqs], prepared)

    def prepare(self, req: PredictRequest) -> Prepared:
        """:meth:`service.passes.Passes.prepare`: ``req`` checked, its task loaded and promoted, its rows tokenized."""
        return self.passes.prepare(req)

    def _prepare_fanout(self, reqs: Sequence[PredictRequest]) -> list[Prepared]:
        """Each request prepared; tasks beyond what the hot tier holds beside the others built for this pass only
        (:meth:`service.passes.Passes.fanout_plan`)."""
        plan = self.passes.fanout_plan([r.task for r in reqs]) if len(reqs) > 1 else {}
        return [self.passes.prepare(req, plan.get(req.task)) for req in reqs]

    async def close(self) -> None:
        """Stop the micro-batcher (queued requests fail with ``RuntimeError``)."""
        if self.batcher is not None:
            await self.batcher.close()

    def embed(self, task: str | None, rows: Rows, *, truncate: bool = True,
              truncation_direction: str = "right") -> torch.Tensor:
        """Sentence embeddings float32 ``[len(rows), hidden]``: :meth:`service.passes.Passes.embed`."""
        return self.passes.embed(task, rows, truncate=truncate, truncation_direction=truncation_direction)

    @property
    def _lock(self) -> threading.Lock:
        """The pass lock (:attr:`service.passes.Passes.lock`)."""
        return self.passes.lock
