"""Typed errors raised by the bundle format and the stores.

The API layer maps each class to one HTTP status in a single table
(``service/api/errors.py``); nothing here knows about HTTP.
"""

from __future__ import annotations


class MaskStoreError(Exception):
    """Base class of every error raised by :mod:`mask_store`."""


class BundleInvalid(MaskStoreError):
    """The bytes are not a valid bundle: malformed, truncated, corrupted,
    an unknown format version, or inconsistent with the name it was stored under.
    The message says which check failed and quotes the offending values."""


class BundleTooLarge(MaskStoreError):
    """The bundle is larger than the configured limit."""

    def __init__(self, size_bytes: int, limit_bytes: int, what: str = "bundle"):
        super().__init__(f"{what} is {size_bytes} bytes, larger than the limit of {limit_bytes} bytes")
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class BackboneMismatch(MaskStoreError):
    """The bundle was trained for a different backbone (fingerprints differ)."""

    def __init__(self, bundle_fingerprint: str, backbone_fingerprint: str):
        super().__init__(
            f"bundle was trained for backbone {bundle_fingerprint[:16]}…, "
            f"but this server runs backbone {backbone_fingerprint[:16]}…"
        )
        self.bundle_fingerprint = bundle_fingerprint
        self.backbone_fingerprint = backbone_fingerprint


class TaskNotFound(MaskStoreError):
    """No bundle is stored under this task name."""

    def __init__(self, task: str):
        super().__init__(f"no task named {task!r} in the mask store")
        self.task = task


class InvalidTaskName(MaskStoreError):
    """The task name is not allowed (see :data:`mask_store.format.TASK_NAME_PATTERN`)."""


class BundleUnsupported(BundleInvalid):
    """A bundle of a format version this reader does not know (a newer writer's): refused, but a
    stored one is left in place (another, newer server sharing the store may serve it)."""


class StoredBundleCorrupt(MaskStoreError):
    """A bundle already in the store fails validation (corrupted on disk): a server fault, not the
    client's. The file has been moved aside (quarantined) so that it breaks nothing else."""

    def __init__(self, task: str, reason: str, moved_to: str | None):
        where = f"moved aside to {moved_to}" if moved_to else "left in place (it changed meanwhile)"
        super().__init__(f"the stored bundle of task {task!r} is corrupt ({reason}); {where}; re-upload it")
        self.task = task
        self.reason = reason


class StoreUnavailable(MaskStoreError):
    """The store's storage failed (read-only file system, permissions, I/O error); nothing was changed."""


class StoreFull(StoreUnavailable):
    """The store's storage is out of space or quota; nothing was changed."""
