"""Routes: tasks (list, get, upload, delete), predict, health and metrics."""

from __future__ import annotations

import os

import logging

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from mask_store.errors import BundleTooLarge, MaskStoreError
from mask_store.format import BundleHeader
from service.api.deps import Admin, State
from service.api.errors import error_response
from service.api.inputs import request_rows
from service.api.openapi import TaskName, errors, upload_body
from service.api.schemas import (
    HealthPublic,
    PredictIn,
    PredictPublic,
    ReadyPublic,
    TaskPublic,
    TasksPublic,
)
from service.engine import PredictOptions, PredictRequest
from service.metrics import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)
router = APIRouter()


def _task_public(state, task: str, header: BundleHeader, detail: bool, size: int | None = None) -> TaskPublic:
    """``task``'s public description from ``header``; ``size``: its stored bytes when known (an upload's own size:
    a delete that lands right after the upload must not turn its answer into a 404), else read from the store."""
    return TaskPublic(
        name=task,
        problem_type=header.problem_type,
        labels=header.labels,
        text_pairs=header.text_pairs,
        max_seq_length=header.max_seq_length,
        format_version=header.format_version,
        sparsity=header.sparsity,
        masked_matrices=len(header.masks),
        masked_weights=header.masked_weights,
        bytes=size if size is not None else state.store.size_bytes(task),
        resident=state.engine.is_resident(task),
        tier=state.engine.tier(task),
        backbone_fingerprint=header.backbone_fingerprint,
        metrics=header.metrics,
        training=header.training if detail else None,
        created_at=header.created_at,
    )


@router.post("/v1/tasks/{task}/predict", response_model=PredictPublic, response_model_exclude_none=True,
             responses=errors(404, 409, 413, 422, 429, 500, 503, 507))
async def predict(task: TaskName, body: PredictIn, state: State) -> PredictPublic:
    """Predict with a task's supermask; the task is loaded on first use."""
    s = state.settings
    req = PredictRequest(task=task, inputs=request_rows(body, s.max_inputs_per_request, s.max_input_chars),
                         options=PredictOptions(**body.option_kwargs()))
    return PredictPublic(task=task, predictions=await state.engine.predict_async(req))


def _list(state) -> TasksPublic:
    tasks = []
    for t in state.store.tasks():
        try:
            tasks.append(_task_public(state, t, state.store.header(t), detail=False))
        except MaskStoreError as exc:  # TaskNotFound too: deleted since the listing; corrupt: quarantined
            log.warning("task %s left out of the list: %s", t, exc)
    return TasksPublic(tasks=tasks, count=len(tasks))


@router.get("/v1/tasks", response_model=TasksPublic, response_model_exclude_none=True, responses=errors(503))
async def list_tasks(state: State) -> TasksPublic:
    """Every task in the store; a bundle whose header cannot be read (a corrupt file, another format
    version) is left out of the list with a warning in the log rather than failing the whole list.
    Store I/O runs in a worker thread, off the event loop."""
    return await run_in_threadpool(_list, state)


@router.get("/v1/tasks/{task}", response_model=TaskPublic, response_model_exclude_none=True,
            responses=errors(404, 422, 500, 503))
async def get_task(task: TaskName, state: State) -> TaskPublic:
    """A stored task's header facts (with its training record), and whether and where it is resident."""
    return await run_in_threadpool(lambda: _task_public(state, task, state.store.header(task), detail=True))


async def _spool_body(request: Request, fh, limit: int) -> int:
    """Stream the request body into ``fh`` (the store's spool file), at most ``limit`` bytes: the
    declared ``Content-Length`` is checked first, then the bytes as they arrive. Returns the size."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BundleTooLarge(int(declared), limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BundleTooLarge(size, limit)
        fh.write(chunk)
    fh.flush()
    return size


@router.put("/v1/tasks/{task}", response_model=TaskPublic, response_model_exclude_none=True,
            dependencies=[Admin], status_code=200, openapi_extra=upload_body(),
            responses={201: {"model": TaskPublic, "description": "Created: the task is new."},
                       **errors(401, 403, 409, 413, 422, 500, 503, 507)})
async def upload_task(task: TaskName, request: Request, response: Response, state: State) -> TaskPublic:
    """Upload a bundle (raw bytes). 201 when new, 200 when it replaced a task.

    The body streams into a temporary file in the store (never whole in memory), under the size limit;
    the bundle is then fully validated from that file and built against the running backbone before it
    is renamed into place; on any error the store and the cache are unchanged.
    """
    with state.store.spool() as (fh, path):
        await _spool_body(request, fh, state.settings.max_bundle_bytes)
        size = os.path.getsize(path)  # the bundle stored is these bytes
        header, created = await run_in_threadpool(state.engine.register, task, path)
    response.status_code = 201 if created else 200
    return _task_public(state, task, header, detail=True, size=size)


@router.delete("/v1/tasks/{task}", status_code=204, dependencies=[Admin], response_class=Response,
               responses=errors(401, 403, 404, 422, 503))
async def delete_task(task: TaskName, state: State) -> Response:
    """Remove a task from the store and the cache (a forward pass using it finishes first)."""
    await run_in_threadpool(state.engine.delete, task)  # a worker thread: it may wait for a forward pass
    return Response(status_code=204)


def _health(state) -> HealthPublic:
    quarantined = state.store.quarantined()
    return HealthPublic(status="degraded" if quarantined else "ok", backbone=state.backbone.name,
                        backbone_fingerprint=state.backbone.fingerprint, tasks=len(state.store.tasks()),
                        quarantined=quarantined, **state.engine.status())


@router.get("/healthz", response_model=HealthPublic, responses=errors(503))
async def healthz(state: State) -> HealthPublic:
    """Liveness, and what the server holds: "degraded" (still 200) when a corrupt stored bundle has been
    quarantined, naming its tasks (re-upload them; remove the ``*.smask.corrupt-*`` files when done)."""
    return await run_in_threadpool(_health, state)


@router.get("/readyz", response_model=ReadyPublic, responses=errors(503))
async def readyz(request: Request, state: State):
    """Readiness: 200 once start-up is complete (backbone loaded, examples preloaded) and while the store
    can be listed; 503 before that, during shutdown, or when the store cannot be read."""
    if not getattr(request.app.state, "ready", False):
        return error_response(503, "NotReady", "the server is starting or shutting down")
    try:
        await run_in_threadpool(state.store.tasks)
    except MaskStoreError as exc:
        return error_response(503, "NotReady", str(exc))
    return ReadyPublic(status="ready")


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format 0.0.4.",
    "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
async def metrics(state: State) -> Response:
    """Prometheus metrics of this process (latency, requests, cache, tiers, memory)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
