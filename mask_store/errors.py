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

    def __init__(self, size_bytes: int, limit_bytes: int):
        super().__init__(f"bundle is {size_bytes} bytes, larger than the limit of {limit_bytes} bytes")
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
