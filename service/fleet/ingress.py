"""The fleet's REST front (the ``SupermaskIngress`` deployment): every request forwarded to a model replica
through a Serve handle, the task as multiplexed model id where the path names one, reads retried when their
replica dies, ``/metrics`` merged from every replica (see :mod:`service.fleet`)."""

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from mask_store.errors import MaskStoreError
from service.api.errors import error_response, typed_response
from service.errors import ReplicaUnavailable, ServiceError
from service.fleet.metrics_hub import merge_metrics, metrics_hub
from service.fleet.routing import BodyTooLarge, raw_headers, read_limited, retryable_errors, route
from service.metrics import CONTENT_TYPE_LATEST
from service.settings import Settings

log = logging.getLogger(__name__)

ingress_app = FastAPI(title="supermask (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="SupermaskIngress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class SupermaskIngress:
    """The fleet's REST front (see :mod:`service.fleet`).

    Args:
        model: the handle of the ``SupermaskModel`` deployment.
        args: :func:`service.fleet.app.settings_args` of the fleet's settings.
    """

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
            self._hub = self._hub or metrics_hub()
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
                body = await read_limited(request, self.settings.max_bundle_bytes)
            else:
                body = await read_limited(request, self.settings.max_request_bytes, upload=False)
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
            except retryable_errors() as exc:
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
