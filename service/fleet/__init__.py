"""The server as a Ray Serve application: a fleet of model replicas behind one FastAPI ingress.

Deployments (routing and scaling are Serve's; nothing here routes or schedules):

``SupermaskIngress`` (one replica, no CPU reserved; :mod:`service.fleet.ingress`)
    The public REST API, the same paths, bodies and errors as the single server (``/v1/tasks...``,
    ``/v1/predict``, ``/v2/...``, ``/healthz``, ``/metrics``). It forwards each request to a model replica
    through a Serve deployment handle; for a path that names one task (``/v1/tasks/{task}/predict``,
    ``GET /v1/tasks/{task}``, ``/v2/models/{task}[/versions/1][/infer|/ready]``: :func:`service.fleet.routing.route`)
    the handle carries the task name as the *multiplexed model id*, so Serve routes the request to a replica
    that already holds that task (else to the replica holding the fewest tasks); a fan-out (``/v1/predict``)
    names several and goes to any replica. A read (GET, and every predict or inference POST) whose replica
    dies mid-request is retried on another (``SUPERMASK_RAY_RETRIES``); a write, or a read out of retries,
    answers 503 ``ReplicaUnavailable`` with ``Retry-After``: never a wrong answer. ``/metrics`` merges the
    metrics every live replica published (:mod:`service.fleet.metrics_hub`), each series labelled
    ``replica="<id>"``. A body over its limit (``SUPERMASK_MAX_REQUEST_BYTES``; uploads
    ``SUPERMASK_MAX_BUNDLE_BYTES``) is refused with 413 by its ``Content-Length`` before a byte is read, or as
    soon as the bytes read pass it; header bytes travel as bytes (latin-1, as HTTP carries them), so a
    non-ASCII header is answered as the single server does.

``SupermaskModel`` (``SUPERMASK_RAY_REPLICAS`` replicas, or autoscaled up to ``SUPERMASK_RAY_MAX_REPLICAS``;
:mod:`service.fleet.replica`)
    Each replica loads the backbone once and runs the single server's app in process
    (:func:`service.api.main.create_app`: engine, tiers, batcher), over the mask store that every replica
    shares (``SUPERMASK_STORE_URL``). Its ``@serve.multiplexed(max_num_models_per_replica=
    SUPERMASK_RAY_TASKS_PER_REPLICA)`` loader loads a task into the replica's engine and returns a
    ``ResidentTask``; when Serve evicts it (least recently used beyond the budget) the engine drops it
    too. Every response names the replica in the ``x-supermask-replica`` header.

Freshness needs no messages between replicas: each one compares the store's version token (file identity,
or object ETag) on every use of a resident task, so an upload or delete through any replica is served in
its new state by all of them from the next request on.

Modules, top-down: :mod:`~service.fleet.app` (the Serve application builder and :func:`~service.fleet.app.run`)
→ :mod:`~service.fleet.ingress` → :mod:`~service.fleet.replica` → :mod:`~service.fleet.routing` (which replica
a request may go to, what may be retried, body limits; no Ray needed) and :mod:`~service.fleet.metrics_hub`.
This package imports nothing from its modules, so :mod:`~service.fleet.routing` loads without Ray.

Start it with ``supermask serve --ray`` (a local Ray instance) or ``serve run deploy/ray/serve.yaml``
(``import_path: service.fleet.app:build_app``).
"""

APP_NAME = "supermask"
"""The Serve application's name, and the Ray namespace of the fleet's actors."""
REPLICA_HEADER = "x-supermask-replica"
"""Response header naming the model replica (its Serve replica id) that answered."""
