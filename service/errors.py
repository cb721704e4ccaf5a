"""Typed errors of the serving layer (the API maps them, and the store's, to HTTP in one table)."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the serving layer's errors."""


class InputInvalid(ServiceError):
    """The request's inputs are empty, too many, too long, or of the wrong kind for the task."""


class TaskTooLarge(ServiceError):
    """A task's resident form does not fit the cache's byte budget."""

    def __init__(self, task: str, nbytes: int, capacity_bytes: int):
        super().__init__(f"task {task!r} needs {nbytes} resident bytes, more than the cache budget of "
                         f"{capacity_bytes} bytes (raise SUPERMASK_CACHE_BYTES)")


class AdminDisabled(ServiceError):
    """An admin route was called but no admin token is configured."""


class Unauthorized(ServiceError):
    """An admin route was called without a bearer token."""


class Forbidden(ServiceError):
    """An admin route was called with a wrong bearer token."""


class Overloaded(ServiceError):
    """More predict requests are queued or running than ``SUPERMASK_MAX_QUEUED_REQUESTS``: retry later
    (the API answers 429 with ``Retry-After``)."""

    retry_after_s = 1


class RequestTimedOut(ServiceError):
    """A predict request did not finish within ``SUPERMASK_REQUEST_TIMEOUT_S`` (503 with ``Retry-After``)."""

    retry_after_s = 1


class ReplicaUnavailable(ServiceError):
    """A fleet replica died or could not be reached while it held the request (Ray Serve); the request may be
    retried (the ingress has already retried reads). Answered 503 with ``Retry-After``."""

    retry_after_s = 1
