"""The server as a Ray Serve application: a fleet of model replicas behind one FastAPI ingress.

Deployments (routing and scaling are Serve's; nothing here routes or schedules):

``SupermaskIngress`` (one replica, no CPU reserved)
    The public REST API, the same paths, bodies and errors as the single server (``/v1/tasks...``,
    ``/v1/predict``, ``/v2/...``, ``/healthz``, ``/metrics``). It forwards each request to a model replica
    through a Serve deployment handle; for a path that names one task (``/v1/tasks/{task}/predict``,
    ``GET /v1/tasks/{task}``, ``/v2/models/{task}[/versions/1][/infer|/ready]``: :func:`route`) the handle
    carries the task name as the *multiplexed model id*, so Serve routes the request to a replica that
    already holds that task (else to the replica holding the fewest tasks); a fan-out (``/v1/predict``)
    names several and goes to any replica. A read (GET, and every predict or inference POST) whose replica
    dies mid-request is retried on another (``SUPERMASK_RAY_RETRIES``); a write, or a read out of retries,
    answers 503 ``ReplicaUnavailable`` with ``Retry-After``: never a wrong answer. ``/metrics`` merges the
    metrics every live replica published, each series labelled ``replica="<id>"``. A body over its limit
    (``SUPERMASK_MAX_REQUEST_BYTES``; uploads ``SUPERMASK_MAX_BUNDLE_BYTES``) is refused with 413 by its
    ``Content-Length`` before a byte is read, or as soon as the bytes read pass it; header bytes travel
    as bytes (latin-1, as HTTP carries them), so a non-ASCII header is answered as the single server does.

``SupermaskModel`` (``SUPERMASK_RAY_REPLICAS`` replicas, or autoscaled up to ``SUPERMASK_RAY_MAX_REPLICAS``)
    Each replica loads the backbone once and runs the single server's app in process
    (:func:`service.api.main.create_app`: engine, tiers, batcher), over the mask store that every replica
    shares (``SUPERMASK_STORE_URL``). Its ``@serve.multiplexed(max_num_models_per_replica=
    SUPERMASK_RAY_TASKS_PER_REPLICA)`` loader loads a task into the replica's engine and returns a
    :class:`ResidentTask`; when Serve evicts it (least recently used beyond the budget) the engine drops it
    too. Every response names the replica in the ``x-supermask-replica`` header.

Freshness needs no messages between replicas: each one compares the store's version token (file identity,
or object ETag) on every use of a resident task, so an upload or delete through any replica is served in
its new state by all of them from the next request on.

Start it with ``supermask serve --ray`` (a local Ray instance) or ``serve run deploy/ray/serve.yaml``.
"""


import asyncio
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve
from ray.serve.handle import DeploymentHandle

from mask_store.errors import MaskStoreError
from service.api.errors import error_response, typed_response
from service.errors import ReplicaUnavailable, ServiceError
from service.metrics import CONTENT_TYPE_LATEST
from service.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "supermask"
REPLICA_HEADER = "x-supermask-replica"
"""Response header naming the model replica (its Serve replica id) that answered."""
METRICS_HUB_NAME = "supermask-metrics-hub"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_TASK_ROUTE = re.compile(r"v1/tasks/([^/]+)(/predict)?")
_V2_ROUTE = re.compile(r"v2/models/([^/]+)(?:/versions/[^/]+)?(/infer|/ready)?")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}
SHUTDOWN_TIMEOUT_S = 15.0
"""Longest wait for the fleet's clean-up on Ctrl-C / SIGTERM (deleting the app, stopping Serve and Ray): when
the signal went to the whole process group, Ray's own processes are gone and every call would wait ~60 s for
them; past this the process exits without it."""


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
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in _HOP_HEADERS]


def settings_args(settings: Settings) -> dict[str, Any]:
    """``settings`` as plain values that rebuild it in a replica (``Settings(**args)``), the admin token
    included in clear (pydantic's JSON dump would mask it) and local paths made absolute; fields left at their defaults are left out, so a
    replica's own ``SUPERMASK_*`` environment still applies to them."""
    args = settings.model_dump(mode="json", exclude_unset=True)
    args["store_url"] = settings.store_location()  # absolute: a replica's working directory is not the driver's
    if settings.examples_dir is not None:
        args["examples_dir"] = str(settings.examples_dir.resolve())
    if settings.backbone_path is not None and Path(settings.backbone_path).exists():
        args["backbone_path"] = str(Path(settings.backbone_path).resolve())
    if settings.admin_token is not None:
        args["admin_token"] = settings.admin_token.get_secret_value()
    return args


# ---- metrics ------------------------------------------------------------------------------------
def merge_metrics(texts: dict[str, str]) -> bytes:
    """Merge Prometheus text expositions of several replicas into one, adding ``replica="<id>"`` to every
    sample (families of the same name are merged, so HELP/TYPE appear once).

    Args:
        texts: replica id -> that replica's ``/metrics`` text.
    Returns:
        The merged exposition (Prometheus text format 0.0.4, as ``prometheus_client.generate_latest``).
    """
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples.extend(Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                                  for s in fam.samples)

    class _Collected:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    return generate_latest(registry)


def _metrics_hub():
    """The fleet's metrics hub actor: created by whichever replica asks first, detached (it outlives the replica
    that created it: killing that one must not lose the others' metrics), 0 CPUs."""
    import ray

    @ray.remote(num_cpus=0)
    class MetricsHub:
        """Latest ``/metrics`` text of each model replica, with the time it arrived."""

        def __init__(self):
            self.texts: dict[str, tuple[float, str]] = {}

        def publish(self, replica: str, text: str) -> None:
            self.texts[replica] = (time.time(), text)

        def collect(self, max_age_s: float) -> dict[str, str]:
            now = time.time()
            self.texts = {r: v for r, v in self.texts.items() if now - v[0] <= max_age_s}
            return {r: t for r, (_, t) in self.texts.items()}

    return MetricsHub.options(name=METRICS_HUB_NAME, namespace=APP_NAME, get_if_exists=True,
                              lifetime="detached").remote()


# ---- model replicas -------------------------------------------------------------------------------
class ResidentTask:
    """What the multiplexed loader returns: a task loaded into this replica's engine.

    Serve keeps these in its per-replica LRU of models and calls :meth:`__del__` on the one it evicts; the
    engine then drops the task (its warm entry, hot weights, device slot), so a replica holds at most
    ``SUPERMASK_RAY_TASKS_PER_REPLICA`` tasks. Dropping twice is harmless, but a task re-loaded since is not
    dropped by its old handle's release.
    """

    def __init__(self, engine, task: str):
        self.engine = engine
        self.task = task
        self.entry = engine.warm(task)  # raises TaskNotFound, BundleInvalid, ... as a predict would
        self._released = False

    @property
    def header(self):
        return self.entry.header

    def __del__(self):
        if getattr(self, "_released", True):
            return
        self._released = True
        current = self.engine.cache.tasks.get(self.task)
        if current is None or current is self.entry:
            self.engine.invalidate(self.task)


class ModelReplica:
    """One model replica: the single server's app in process, over the shared store (see the module docstring).

    Args:
        args: :func:`settings_args` of the fleet's settings.
    """

    def __init__(self, args: dict[str, Any]):
        import httpx

        from service.api.main import create_app

        self.settings = Settings(**args)
        self.app = create_app(self.settings)
        # the app is called in process (httpx's ASGI transport runs no lifespan): it is ready once built, the
        # backbone loaded (replicas seed no examples; build_app did, once)
        self.app.state.ready = True
        self.engine = self.app.state.supermask.engine
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica")
        self._stop = threading.Event()
        threading.Thread(target=self._publish_metrics, name="supermask-metrics-push", daemon=True).start()
        log.info("model replica %s ready (store %s)", self.replica, self.settings.store_location())

    async def _load(self, task: str) -> ResidentTask:
        return await run_in_threadpool(ResidentTask, self.engine, task)

    async def serve_http(self, method: str, path: str, query: str, headers: list[tuple[bytes, bytes]],
                         body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Run one HTTP request through this replica's app; ``(status, headers, body)`` of its response,
        with :data:`REPLICA_HEADER` added. A predict first loads its task through the multiplexed loader."""
        task = serve.get_multiplexed_model_id()
        if task and method == "POST":
            try:
                await self.load_task(task)
            except (MaskStoreError, ServiceError):
                pass  # not loadable: the app below answers with the typed error (404, 422, ...)
        resp = await self.client.request(method, "/" + path, params=query or None, headers=headers, content=body)
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.headers.raw
               if k.decode("latin-1").lower() not in _HOP_HEADERS]
        out.append((REPLICA_HEADER, self.replica))
        return resp.status_code, out, resp.content

    def metrics_text(self) -> str:
        return self.app.state.supermask.metrics.render().decode()

    def _publish_metrics(self) -> None:
        import ray

        hub = None
        while not self._stop.wait(self.settings.ray_metrics_push_s):
            try:
                hub = hub or _metrics_hub()
                ray.get(hub.publish.remote(self.replica, self.metrics_text()), timeout=10)
            except Exception as exc:  # noqa: BLE001 - the hub died or is restarting: look it up again
                log.debug("metrics publish failed: %s", exc)
                hub = None

    def __del__(self):
        self._stop.set()


def model_deployment(tasks_per_replica: int):
    """The ``SupermaskModel`` deployment, its multiplexed loader bounded to ``tasks_per_replica`` tasks
    (Serve takes the bound when the loader is decorated, hence a class made per bound)."""

    class SupermaskModel(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=tasks_per_replica)
        async def load_task(self, task: str) -> ResidentTask:
            return await self._load(task)

    SupermaskModel.__qualname__ = SupermaskModel.__name__
    return serve.deployment(name="SupermaskModel")(SupermaskModel)


# ---- ingress --------------------------------------------------------------------------------------
class BodyTooLarge(Exception):
    """A request body (not an upload) over ``SUPERMASK_MAX_REQUEST_BYTES`` at the ingress (413 ``RequestTooLarge``)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"request body is {size} bytes, larger than the limit of {limit} bytes "
                         f"(SUPERMASK_MAX_REQUEST_BYTES)")


async def _read_limited(request: Request, limit: int, upload: bool = True) -> bytes:
    """The request body, at most ``limit`` bytes, checked by the declared length before a byte is read, then as it
    streams (a chunked body). Raises BundleTooLarge (``upload``: the upload limit, checked again by the replica's
    app) or :class:`BodyTooLarge` as soon as either exceeds it."""
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


ingress_app = FastAPI(title="supermask (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
_RETRYABLE: tuple[type[BaseException], ...] = ()


def _retryable() -> tuple[type[BaseException], ...]:
    """Errors that mean the replica died or could not take the request (the request was not answered)."""
    global _RETRYABLE
    if not _RETRYABLE:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        _RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
    return _RETRYABLE


@serve.deployment(name="SupermaskIngress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class SupermaskIngress:
    """The fleet's REST front (see the module docstring)."""

    def __init__(self, model: DeploymentHandle, args: dict[str, Any]):
        self.model = model
        self.settings = Settings(**args)
        self._hub = None
        self.registry = CollectorRegistry()
        self.retries = Counter("supermask_fleet_retries", "Requests the ingress re-sent after their replica died.",
                               ["method"], registry=self.registry)
        self.unavailable = Counter("supermask_fleet_unavailable", "Requests answered 503 ReplicaUnavailable.",
                                   ["method"], registry=self.registry)
        self.reporting = Gauge("supermask_fleet_replicas_reporting",
                               "Model replicas whose metrics the last scrape merged.", registry=self.registry)

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        """Every live model replica's metrics, each series with ``replica="<id>"`` (published every
        ``SUPERMASK_RAY_METRICS_PUSH_S``; a replica silent for three periods is left out), then the ingress's own
        ``supermask_fleet_*`` series (retries, 503s, replicas reporting)."""
        try:
            self._hub = self._hub or _metrics_hub()
            texts = await self._hub.collect.remote(3 * self.settings.ray_metrics_push_s)
        except Exception as exc:  # noqa: BLE001 - the hub is being re-created: an empty scrape, not an error
            log.warning("metrics hub unavailable: %s", exc)
            self._hub, texts = None, {}
        self.reporting.set(len(texts))
        return Response(merge_metrics(texts) + generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"])
    async def forward(self, path: str, request: Request) -> Response:
        """Forward one request to a model replica (the task as multiplexed model id where the path names one)."""
        method = request.method
        task, reads = route(method, path)
        try:  # the body limits are checked here too: an oversized body is never read whole, nor crosses Ray
            if method == "PUT":
                body = await _read_limited(request, self.settings.max_bundle_bytes)
            else:
                body = await _read_limited(request, self.settings.max_request_bytes, upload=False)
        except (MaskStoreError, ServiceError) as exc:
            return typed_response(exc, "/" + path)
        except BodyTooLarge as exc:
            return error_response(413, "RequestTooLarge", str(exc), path="/" + path)
        headers = raw_headers(request.headers.raw)
        handle = self.model.options(multiplexed_model_id=task) if task else self.model
        attempts = 1 + (self.settings.ray_retries if reads else 0)
        for attempt in range(1, attempts + 1):
            try:
                status, out, content = await handle.serve_http.remote(method, path, request.url.query, headers, body)
                return Response(content, status_code=status, headers=dict(out))
            except _retryable() as exc:
                log.warning("replica lost during %s /%s (attempt %d of %d): %s", method, path, attempt, attempts,
                            type(exc).__name__)
                last = exc
                if attempt < attempts:
                    self.retries.labels(method).inc()
                    await asyncio.sleep(0.05 * attempt)
            except Exception as exc:  # noqa: BLE001 - the replica raised: the documented JSON 500, not Serve's text
                log.exception("replica failed on %s /%s", method, path)
                return error_response(500, "InternalError", f"internal server error ({type(exc).__name__}; logged "
                                      f"on the server)", path="/" + path)
        self.unavailable.labels(method).inc()
        what = "the request was retried on other replicas" if attempts > 1 else \
            "a write is not retried: it may or may not have been applied; repeat it (uploads are idempotent)"
        return typed_response(ReplicaUnavailable(f"the replica serving this request went away "
                                                 f"({type(last).__name__}); {what}"), "/" + path)


def seed_examples(settings: Settings) -> list[str]:
    """Copy ``settings.examples_dir``'s bundles into the shared store if it holds no task (as the single server
    does at start-up); the names copied."""
    from mask_store.store import open_store

    if settings.examples_dir is None or not settings.examples_dir.is_dir():
        return []
    store = open_store(settings.store_location(), max_bundle_bytes=settings.max_bundle_bytes,
                       options=settings.store_options)
    seeded = store.seed_from(settings.examples_dir)
    if seeded:
        log.info("preloaded example tasks into %s: %s", settings.store_location(), ", ".join(seeded))
    return seeded


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (``import_path: service.ray_app:build_app`` in a Serve config): the ingress
    bound to the model deployment, options from :class:`Settings` (``args`` as its fields, over the
    ``SUPERMASK_*`` environment). A Serve config's ``deployments:`` section overrides them by name. An empty
    shared store is seeded with the example tasks here, once (:func:`seed_examples`).

    Raises:
        pydantic.ValidationError: ``args`` are not valid settings.
    """
    settings = args if isinstance(args, Settings) else Settings(**(args or {}))
    seed_examples(settings)
    sargs = settings_args(settings)
    sargs["examples_dir"] = None  # seeded once, here: replicas starting at once would race to seed an empty store
    # Serve's per-request access log line costs each hop CPU time: kept only at SUPERMASK_LOG_LEVEL=DEBUG
    logging_config = {"log_level": settings.log_level, "enable_access_log": settings.log_level == "DEBUG"}
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": settings.ray_replica_cpus},
                               "max_ongoing_requests": settings.ray_max_ongoing_requests,
                               "logging_config": logging_config}
    if settings.ray_max_replicas is not None and settings.ray_max_replicas > settings.ray_replicas:
        options["autoscaling_config"] = {"min_replicas": settings.ray_replicas,
                                         "max_replicas": settings.ray_max_replicas,
                                         "target_ongoing_requests": settings.ray_target_ongoing_requests}
    else:
        options["num_replicas"] = settings.ray_replicas
    model = model_deployment(settings.ray_tasks_per_replica).options(**options).bind(sargs)
    # the ingress only awaits replicas: it must never be what limits the requests in flight
    replicas = max(settings.ray_replicas, settings.ray_max_replicas or 0)
    ingress_ongoing = max(256, 2 * replicas * settings.ray_max_ongoing_requests)
    return SupermaskIngress.options(logging_config=logging_config,
                                    max_ongoing_requests=ingress_ongoing).bind(model, sargs)


def run(settings: Settings, blocking: bool = True) -> None:
    """Start the fleet: connect to Ray (``settings.ray_address``; None starts a local instance, or joins the one
    ``RAY_ADDRESS`` names), start Serve's HTTP proxy on ``settings.host:port`` and deploy :func:`build_app` as
    application ``supermask`` at ``/``. With ``blocking``, serve until Ctrl-C or SIGTERM, then delete the
    application (and stop the local Ray instance this call started).

    Raises:
        ConnectionError: ``settings.ray_address`` cannot be reached.
    """
    import signal

    import ray

    started = False  # a local instance of our own: stopped on exit (a cluster's Serve is left running)
    if not ray.is_initialized():
        local = settings.ray_address is None and not os.environ.get("RAY_ADDRESS")
        # replicas import this very checkout (not another install of the package) on a local instance
        runtime_env = {"env_vars": {"PYTHONPATH": str(PROJECT_ROOT)}} if local else None
        # "local": always a new instance of our own (a bare ray.init joins a cluster `ray start` left on this host,
        # whose Serve the shutdown below must not tear down)
        ray.init(address="local" if local else settings.ray_address, namespace=APP_NAME, runtime_env=runtime_env)
        started = local

    def deploy() -> None:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("supermask fleet ready at http://%s:%d/ (%d model replica(s))", settings.host, settings.port,
                 settings.ray_replicas)

    if not blocking:
        deploy()
        return

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # after ray.init (which installs a SIGTERM handler of its own) and before the deployment: a SIGTERM that
    # comes while Serve starts stops the fleet as cleanly as one that comes later
    signal.signal(signal.SIGTERM, _stop)
    deployed = False
    try:
        deploy()
        deployed = True  # only an app this call deployed is deleted (not one already running on a cluster)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("shutting down the fleet")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

        def clean_up() -> None:
            if deployed:
                serve.delete(APP_NAME)
            if started:
                serve.shutdown()
                ray.shutdown()

        # a signal to the whole process group (Ctrl-C, `timeout`) has already stopped Ray's own processes: each
        # call would wait ~60 s for the GCS; bounded here, then the process leaves without it
        cleaner = threading.Thread(target=clean_up, name="supermask-fleet-shutdown", daemon=True)
        cleaner.start()
        cleaner.join(SHUTDOWN_TIMEOUT_S)
        if cleaner.is_alive():
            log.warning("the fleet's clean-up did not finish within %g s (Ray's processes are gone?); exiting "
                        "without it", SHUTDOWN_TIMEOUT_S)
            logging.shutdown()
            os._exit(143)
