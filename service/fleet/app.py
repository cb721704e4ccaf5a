"""The fleet as one Serve application: :func:`build_app` (the Serve config's ``import_path:
service.fleet.app:build_app``) binds the ingress to the model deployment with options from the settings;
:func:`run` starts Ray, Serve and the application (``supermask serve --ray``). See :mod:`service.fleet`."""

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from service.fleet import APP_NAME
from service.fleet.ingress import SupermaskIngress
from service.fleet.replica import model_deployment
from service.settings import Settings

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHUTDOWN_TIMEOUT_S = 15.0
"""Longest wait for the fleet's clean-up on Ctrl-C / SIGTERM (deleting the app, stopping Serve and Ray): when
the signal went to the whole process group, Ray's own processes are gone and every call would wait ~60 s for
them; past this the process exits without it."""


def settings_args(settings: Settings) -> dict[str, Any]:
    """``settings`` as plain values that rebuild it in a replica (``Settings(**args)``), the admin token
    included in clear (pydantic's JSON dump would mask it) and local paths made absolute; fields left at their
    defaults are left out, so a replica's own ``SUPERMASK_*`` environment still applies to them."""
    args = settings.model_dump(mode="json", exclude_unset=True)
    args["store_url"] = settings.store_location()  # absolute: a replica's working directory is not the driver's
    if settings.examples_dir is not None:
        args["examples_dir"] = str(settings.examples_dir.resolve())
    if settings.backbone_path is not None and Path(settings.backbone_path).exists():
        args["backbone_path"] = str(Path(settings.backbone_path).resolve())
    if settings.admin_token is not None:
        args["admin_token"] = settings.admin_token.get_secret_value()
    return args


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
    """Serve application builder (``import_path: service.fleet.app:build_app`` in a Serve config): the ingress
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
