"""The fleet's model replicas (the ``SupermaskModel`` deployment): the single server's app in process, over the
store every replica shares, with a multiplexed loader that keeps at most ``SUPERMASK_RAY_TASKS_PER_REPLICA``
tasks resident (see :mod:`service.fleet`)."""

import logging
import threading
from typing import Any

from fastapi.concurrency import run_in_threadpool
from ray import serve

from mask_store.errors import MaskStoreError
from service.errors import ServiceError
from service.fleet import REPLICA_HEADER
from service.fleet.metrics_hub import metrics_hub
from service.fleet.routing import HOP_HEADERS
from service.settings import Settings

log = logging.getLogger(__name__)


class ResidentTask:
    """What the multiplexed loader returns: a task loaded into this replica's engine.

    Serve keeps these in its per-replica LRU of models and calls :meth:`__del__` on the one it evicts; the
    engine then drops the task (its warm entry, hot weights, device slot), so a replica holds at most
    ``SUPERMASK_RAY_TASKS_PER_REPLICA`` tasks. Dropping twice is harmless, but a task re-loaded since is not
    dropped by its old handle's release.

    Raises:
        TaskNotFound, BundleInvalid, ...: as a predict of ``task`` would (from ``engine.warm``).
    """

    def __init__(self, engine, task: str):
        self.engine = engine
        self.task = task
        self.entry = engine.warm(task)
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
    """One model replica: the single server's app in process, over the shared store (see :mod:`service.fleet`).

    Args:
        args: :func:`service.fleet.app.settings_args` of the fleet's settings.
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
        with :data:`~service.fleet.REPLICA_HEADER` added. A predict first loads its task through the multiplexed
        loader."""
        task = serve.get_multiplexed_model_id()
        if task and method == "POST":
            try:
                await self.load_task(task)
            except (MaskStoreError, ServiceError):
                pass  # not loadable: the app below answers with the typed error (404, 422, ...)
        resp = await self.client.request(method, "/" + path, params=query or None, headers=headers, content=body)
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.headers.raw
               if k.decode("latin-1").lower() not in HOP_HEADERS]
        out.append((REPLICA_HEADER, self.replica))
        return resp.status_code, out, resp.content

    def metrics_text(self) -> str:
        return self.app.state.supermask.metrics.render().decode()

    def _publish_metrics(self) -> None:
        import ray

        hub = None
        while not self._stop.wait(self.settings.ray_metrics_push_s):
            try:
                hub = hub or metrics_hub()
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
