"""Application factory: load the backbone once, open the store, build the engine, wire the routes.

Run with ``supermask serve`` or ``uvicorn service.api.main:create_app --factory``.
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import torch
from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

from mask_store.store import open_store
from service import __version__
from service.api import errors
from service.api.deps import AppState
from service.api.limits import BodyLimit
from service.api.routes import router
from service.api import fanout, openapi, tei, v2
from backbone import Backbone, load_backbone
from service.engine import Engine, needs_model_forward
from service import tracing
from service.kernels.cpu_features import bound_onednn_caches
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
"""The longest client ``X-Request-ID`` kept (service/api/logging.json logs up to this many characters)."""


def request_id_ok(value: str) -> bool:
    """asgi-correlation-id's validator: keep the client's ``X-Request-ID`` when it is 1 to
    :data:`MAX_REQUEST_ID_CHARS` printable ASCII characters (space included; no control characters, so no
    CR/LF or NUL reaches a log line); any other value is replaced by a generated id (32 hex digits)."""
    return 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable()


def freeze_startup_objects() -> int:
    """Move every object alive now (torch, transformers, the backbone, the engine: ~250,000 in the default server) to
    the garbage collector's permanent generation (``gc.freeze``, after a ``gc.collect``), so that its full
    collections no longer traverse them: one took ~100 ms with the GIL held, a pause of every request in flight
    whenever task loads' allocations triggered one. Frozen objects that later become cyclic garbage are freed only
    after shutdown's ``gc.unfreeze``; in one process, every app's start-up freezes and every shutdown unfreezes all
    (tests that start many apps). Returns how many objects are frozen (``gc.get_freeze_count``)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def create_app(settings: Settings | None = None, backbone: Backbone | None = None) -> FastAPI:
    """Build the server.

    Args:
        settings: defaults to ``Settings()`` (environment variables ``SUPERMASK_*``).
        backbone: an already-loaded backbone (tests); default loads ``settings.backbone_path``.
    Raises:
        BackboneLoadError: the backbone cannot be loaded.
    """
    settings = settings or Settings()
    bound_onednn_caches(settings.onednn_cache_capacity)  # before the first oneDNN primitive of this process
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if backbone is None:
        # the CPU hot tier never runs the model's own forward: its tensors suffice (~190 MiB less memory)
        lean = not needs_model_forward(settings.device, settings.kernel_path, settings.cpu_precision,
                                       settings.cpu_runtime)
        backbone = load_backbone(settings.backbone_path, bits=settings.backbone_bits, weights_only=lean)
    metrics = Metrics(max_task_labels=settings.metrics_max_task_labels)
    store = open_store(settings.store_location(), max_bundle_bytes=settings.max_bundle_bytes,
                       options=settings.store_options,
                       on_quarantine=lambda task, reason: metrics.quarantined.inc())
    store.max_labels, store.max_label_chars = settings.max_labels, settings.max_label_chars  # upload bounds
    if settings.examples_dir is not None and not settings.examples_dir.is_dir():
        log.warning("SUPERMASK_EXAMPLES_DIR %s is not a directory: no example tasks preloaded", settings.examples_dir)
    elif settings.examples_dir is not None:
        seeded = store.seed_from(settings.examples_dir)
        if seeded:
            log.info("preloaded example tasks into %s: %s", settings.store_location(), ", ".join(seeded))
    engine = Engine(backbone, store, metrics, cache_bytes=settings.cache_bytes,
                    max_batch_size=settings.max_batch_size, kernel_path=settings.kernel_path,
                    device=settings.device, device_slots=settings.device_slots, batching=settings.batching, batch_wait_ms=settings.batch_wait_ms,
                    precision=settings.cpu_precision, hot_cache_bytes=settings.hot_cache_bytes,
                    runtime=settings.cpu_runtime, pinned_tasks=settings.pinned_tasks,
                    hot_promote_after=settings.hot_promote_after, hot_promote_window_s=settings.hot_promote_window_s,
                    hot_promote_background=settings.hot_promote_background,
                    sparse_cache_bytes=settings.sparse_cache_bytes,
                    max_queued_requests=settings.max_queued_requests, request_timeout_s=settings.request_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        freeze_startup_objects()
        app.state.ready = True  # the backbone is loaded and the examples preloaded (above)
        yield
        app.state.ready = False  # /readyz answers 503 while shutting down
        try:
            await engine.close()
        finally:
            gc.unfreeze()  # what start-up froze is collectable again (shutdown, or the next app of a test process)

    # /docs with local assets: service.api.openapi.install (FastAPI's default pages load theirs from a CDN)
    # FastAPI's own OpenTelemetry (spans per request and stage, metrics, logs) is on whenever the process has a
    # global provider, whatever SUPERMASK_OTEL_TRACING says: off with it, so tracing off costs no OTel work
    telemetry = None if settings.otel_tracing else {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="supermask", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  telemetry=telemetry, description="Multi-task server for supermask-fine-tuned BERT: one int8 "
                  "backbone, one bit-packed mask + head per task.")
    app.state.supermask = AppState(settings=settings, backbone=backbone, store=store, engine=engine, metrics=metrics)
    app.state.ready = False
    errors.install(app)
    openapi.install(app, settings)
    if settings.otel_tracing:
        tracing.enable(settings.otel_exporter)
        tracing.instrument(app)
    app.include_router(router)
    app.include_router(fanout.router)
    app.include_router(v2.router)
    app.include_router(tei.router)  # text-embeddings-inference's /predict, /embed, /info
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    if settings.gzip_min_bytes is not None:
        app.add_middleware(GZipMiddleware, minimum_size=settings.gzip_min_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])
    # outermost: every response, errors and 413s included, carries the request's id
    app.add_middleware(CorrelationIdMiddleware, header_name="X-Request-ID", validator=request_id_ok)
    if settings.admin_token is None:
        log.warning("SUPERMASK_ADMIN_TOKEN is not set: uploads and deletes are disabled")
    return app
