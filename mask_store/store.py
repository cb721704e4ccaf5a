"""The mask store interface the server uses, and :func:`open_store`, which picks a backend by URL.

Two backends implement :class:`MaskStore`:

- ``file://<dir>`` (or a plain path): :class:`mask_store.local.LocalMaskStore`, one ``<task>.smask``
  file per task in a directory (local, or a network directory every replica mounts);
- any other fsspec URL (``s3://bucket/prefix``, ``gs://``, ``az://``, ``memory://`` ...):
  :class:`mask_store.remote.ObjectMaskStore`, one object per task, read and written through fsspec
  (s3fs for ``s3://``). Replicas that open the same URL share one store.

The server calls only the methods of :class:`MaskStore`, so a replica never knows which one it has.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Hashable, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from mask_store.format import Bundle, BundleHeader
from mask_store.local import LocalMaskStore

log = logging.getLogger(__name__)


@runtime_checkable
class MaskStore(Protocol):
    """What the engine and the API call on a store. Every method raises
    :class:`~mask_store.errors.InvalidTaskName` for a name outside ``TASK_NAME_PATTERN``."""

    max_bundle_bytes: int | None

    def tasks(self) -> list[str]:
        """Names of the stored tasks, sorted."""

    def exists(self, task: str) -> bool:
        """Whether a bundle is stored for ``task``."""

    def header(self, task: str) -> BundleHeader:
        """The stored bundle's header. Raises TaskNotFound, BundleUnsupported, StoredBundleCorrupt."""

    def version(self, task: str) -> Hashable:
        """A token that changes whenever the stored bundle is replaced (by any process sharing the store).
        Compared for equality only. Raises TaskNotFound."""

    def size_bytes(self, task: str) -> int:
        """Size of the stored bundle in bytes. Raises TaskNotFound."""

    def get(self, task: str) -> Bundle:
        """Read and fully validate the stored bundle. Raises TaskNotFound, BundleUnsupported,
        StoredBundleCorrupt (the corrupt bundle is moved aside), StoreUnavailable."""

    def validate(self, task: str, data: bytes, backbone_fingerprint: str | None = None) -> Bundle:
        """Validate an upload without storing it. Raises BundleTooLarge, BundleInvalid, BackboneMismatch."""

    def spool(self) -> contextlib.AbstractContextManager[tuple[object, Path]]:
        """A temporary file to stream an upload into: ``(file open for writing, its path)``, for :meth:`put`."""

    def put(self, task: str, data: bytes | os.PathLike, backbone_fingerprint: str | None = None,
            check: Callable[[Bundle], object] | None = None) -> tuple[Bundle, bool]:
        """Validate ``data`` (bytes, or a :meth:`spool` file's path), run ``check`` on the decoded bundle, then
        store atomically; ``(bundle, created)``."""

    def quarantined(self) -> list[str]:
        """Tasks whose corrupt stored bundle was moved aside, sorted."""

    def delete(self, task: str) -> None:
        """Remove a task's bundle. Raises TaskNotFound."""

    def seed_from(self, directory: str | os.PathLike) -> list[str]:
        """Copy the bundles of ``directory`` into the store if it holds no task; the names copied."""


def open_store(url: str, max_bundle_bytes: int | None = None, options: Mapping[str, Any] | None = None,
               on_quarantine: Callable[[str, str], object] | None = None) -> MaskStore:
    """Open the mask store at ``url``.

    Args:
        url: ``file:///abs/dir`` or a plain path (a :class:`LocalMaskStore`, directory created if
            missing); any other fsspec URL, e.g. ``s3://bucket/prefix`` (an :class:`ObjectMaskStore`).
        max_bundle_bytes: uploads larger than this raise ``BundleTooLarge``.
        options: fsspec storage options for object stores (for s3fs: ``endpoint_url``, ``key``,
            ``secret``, ``client_kwargs`` ...; credentials default to the usual AWS environment variables
            and files, which botocore reads). Not allowed with ``file://``.
        on_quarantine: called with ``(task, reason)`` after a corrupt stored bundle was moved aside.
    Raises:
        ValueError: an unknown URL scheme (no fsspec implementation), a ``file://`` URL with a host, or
            options given for a local directory.
        ImportError: the scheme's fsspec implementation (s3fs for ``s3://``) is not installed.
        StoreUnavailable: the directory or bucket cannot be created or reached.
    """
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
            raise ValueError(f"store URL {url!r}: a file:// URL names a local path (file:///dir), not host "
                             f"{parts.netloc!r}")
        if options:
            raise ValueError("store options are for object stores; a file:// store takes none")
        return LocalMaskStore(unquote(parts.path) if parts.scheme else url, max_bundle_bytes=max_bundle_bytes,
                              on_quarantine=on_quarantine)
    from mask_store.remote import ObjectMaskStore  # fsspec is imported only for object stores

    return ObjectMaskStore(url, max_bundle_bytes=max_bundle_bytes, options=options, on_quarantine=on_quarantine)
