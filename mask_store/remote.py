"""Object-storage mask store (``s3://bucket/prefix`` and any other fsspec URL): one object per task.

Layout: ``<root>/<task>.smask`` holds a task's bundle, byte for byte the local store's file;
``<root>/.tmp/`` holds uploads in progress.

Writes are atomic. A bundle is uploaded whole to a fresh temporary key ``.tmp/<task>.<random>``,
then server-side copied onto ``<task>.smask`` (S3 ``CopyObject``: the new object becomes visible
whole, in one step; a reader sees the old bytes or the new ones, never a mix), then the temporary key
is removed. An upload that fails part-way leaves only a temporary key, which readers never list and
:class:`ObjectMaskStore` removes once it is older than :data:`STALE_TMP_SECONDS`.

Freshness: :meth:`ObjectMaskStore.version` is the object's ETag (S3, Azure), generation (GCS) or
version id where the backend reports one, read with one ``HEAD`` request and never cached: every
replica opening the same URL compares it on each use of a resident task (see
:class:`service.tasks.TaskTable`), so a task replaced or deleted through any replica is served in its
new state by all of them from the next request on.

A stored object is validated on every read exactly as a local file is (:func:`decode_bundle`): a
truncated or corrupted object is moved aside to ``<root>/.quarantine/`` (if it is still the object that was
read) and raises :class:`~mask_store.errors.StoredBundleCorrupt`, the local store's error for a corrupt file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Hashable

from mask_store.errors import BundleInvalid, BundleUnsupported, StoredBundleCorrupt, StoreUnavailable, TaskNotFound
from mask_store.format import BUNDLE_SUFFIX, HEADER_DIGEST_BYTES, MAX_HEADER_BYTES, TASK_NAME_PATTERN, Bundle, BundleHeader
from mask_store.format import decode_bundle, decode_header
from mask_store.local import QUARANTINE_MARK, check_task_name, storage_error
from mask_store.local import seed_store, spool_file, validate_spooled, validate_upload

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
QUARANTINE_DIR = ".quarantine"
STALE_TMP_SECONDS = 3600.0
"""A temporary upload key older than this (seconds) is taken for the leftover of a crashed writer and removed
when a store is opened (younger ones may belong to another replica's upload in progress)."""
_HEADER_PROBE_BYTES = 64 * 1024  # first ranged read of a header; most headers are a few KiB
_HEADER_LIMIT = 12 + MAX_HEADER_BYTES + HEADER_DIGEST_BYTES  # prefix, the largest header allowed, its digest
_VERSION_KEYS = ("ETag", "etag", "generation", "VersionId", "version_id")


class ObjectMaskStore:
    """Bundles as objects under an fsspec URL.

    Args:
        url: e.g. ``s3://bucket/masks``; the bucket (or root folder) is created when missing and the
            credentials allow it.
        max_bundle_bytes: uploads larger than this raise ``BundleTooLarge``.
        options: fsspec storage options (s3fs: ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``,
            ...). fsspec's listing cache and instance cache are turned off here (``use_listings_cache=False``,
            ``skip_instance_cache=True``): a cached listing or ``info`` would hide another replica's write.
    Raises:
        ValueError: no fsspec implementation for the URL's scheme. ImportError: the implementation's package
        (s3fs, gcsfs, adlfs) is missing. OSError: the store cannot be reached.
    """

    def __init__(self, url: str, max_bundle_bytes: int | None = None, options: Mapping[str, Any] | None = None,
                 on_quarantine: Callable[[str, str], object] | None = None):
        import fsspec

        opts = dict(options or {})
        opts.setdefault("use_listings_cache", False)
        opts.setdefault("skip_instance_cache", True)
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **opts)
        self.root = root.rstrip("/")
        self.max_bundle_bytes = max_bundle_bytes
        self.on_quarantine = on_quarantine
        self._lock = threading.Lock()  # serialises this process's writes (like LocalMaskStore's)
        try:
            if not self.fs.exists(self.root):
                self.fs.makedirs(self.root, exist_ok=True)
        except PermissionError:
            log.warning("cannot create %s (no permission); assuming it exists", url)
        except OSError as exc:
            raise storage_error(exc, f"reach the store {url}") from None
        self._remove_stale_temporaries()

    # ---- paths --------------------------------------------------------------------------------
    def path(self, task: str) -> str:
        """The object key of ``task``'s bundle. Raises InvalidTaskName."""
        return f"{self.root}/{check_task_name(task)}{BUNDLE_SUFFIX}"

    def _info(self, task: str) -> dict:
        try:
            info = self.fs.info(self.path(task))
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        except OSError as exc:
            raise storage_error(exc, f"stat task {task!r}") from None
        if info.get("type") == "directory":
            raise TaskNotFound(task)
        return info

    # ---- reads --------------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Names of the stored tasks, sorted (keys whose stem is not a valid task name are ignored)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise storage_error(exc, f"list the store {self.url}") from None
        names = (e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n[: -len(BUNDLE_SUFFIX)] for n in names
                      if n.endswith(BUNDLE_SUFFIX) and re.fullmatch(TASK_NAME_PATTERN, n[: -len(BUNDLE_SUFFIX)]))

    def exists(self, task: str) -> bool:
        try:
            self._info(task)
        except TaskNotFound:
            return False
        return True

    def version(self, task: str) -> Hashable:
        """The stored object's ETag / generation / version id (one ``HEAD`` request), else
        ``(size, modification time)`` on a backend that reports none of them.

        Raises:
            TaskNotFound: no object for ``task``. InvalidTaskName: ``task`` is not a valid name.
        """
        return self._token(self._info(task))

    @staticmethod
    def _token(info: dict) -> Hashable:
        for key in _VERSION_KEYS:
            if info.get(key):
                return str(info[key])
        return (info.get("size"), str(info.get("LastModified") or info.get("mtime") or info.get("created")))

    def size_bytes(self, task: str) -> int:
        return int(self._info(task)["size"])

    def _read(self, task: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            return self.fs.cat_file(self.path(task), start=start, end=end)
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        except OSError as exc:
            raise storage_error(exc, f"read task {task!r}") from None

    def header(self, task: str) -> BundleHeader:
        """Header of a stored bundle, from one ranged read (two for a header over 64 KiB).

        Raises:
            TaskNotFound, InvalidTaskName, StoreUnavailable. BundleUnsupported: a newer format version (left
            in place). StoredBundleCorrupt: the object is too short or its header corrupt (it is quarantined).
        """
        info = self._info(task)
        size = int(info["size"])
        prefix = self._read(task, 0, min(size, _HEADER_PROBE_BYTES)) if size else b""
        if len(prefix) >= 12 and len(prefix) < min(size, _HEADER_LIMIT):
            hlen = int.from_bytes(prefix[8:12], "little")
            need = min(size, 12 + hlen + HEADER_DIGEST_BYTES, _HEADER_LIMIT)  # the header and its digest (v2)
            if need > len(prefix):
                prefix = self._read(task, 0, need)
        try:
            return decode_header(prefix)[0]
        except BundleUnsupported:
            raise
        except BundleInvalid as exc:
            raise self._quarantine(task, info, str(exc)) from None

    def get(self, task: str) -> Bundle:
        """Read and fully validate a stored bundle, as :meth:`LocalMaskStore.get` does a file.

        Raises:
            TaskNotFound, InvalidTaskName, StoreUnavailable, BundleUnsupported (left in place);
            StoredBundleCorrupt: a truncated or corrupted object (it is quarantined).
        """
        info = self._info(task)
        data = self._read(task)
        try:
            return decode_bundle(data)
        except BundleUnsupported:
            raise
        except BundleInvalid as exc:
            raise self._quarantine(task, info, str(exc)) from None

    def _quarantine(self, task: str, info: dict, reason: str) -> StoredBundleCorrupt:
        """Move the corrupt object to ``.quarantine/`` if it is still the object that was read (same version
        token); the error to raise."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{self.root}/{QUARANTINE_DIR}/{task}{BUNDLE_SUFFIX}{QUARANTINE_MARK}{stamp}-{secrets.token_hex(3)}"
        moved = None
        with self._lock:
            try:
                if self._token(self._info(task)) == self._token(info):  # not replaced by a valid upload meanwhile
                    self.fs.cp_file(self.path(task), target)
                    self.fs.rm_file(self.path(task))
                    moved = target.rsplit("/", 1)[-1]
            except (OSError, StoreUnavailable, TaskNotFound) as exc:
                log.error("could not quarantine task %s in %s: %s", task, self.url, exc)
        log.error("stored bundle of task %s in %s is corrupt (%s); %s", task, self.url, reason,
                  f"moved to {QUARANTINE_DIR}/{moved}" if moved else "not moved")
        if moved and self.on_quarantine is not None:
            self.on_quarantine(task, reason)
        return StoredBundleCorrupt(task, reason, moved)

    def quarantined(self) -> list[str]:
        """Tasks with a quarantined (corrupt) object, moved aside by any replica sharing the store, sorted."""
        try:
            names = [e.rsplit("/", 1)[-1] for e in self.fs.ls(f"{self.root}/{QUARANTINE_DIR}", detail=False)]
        except OSError:
            return []
        return sorted({n.split(BUNDLE_SUFFIX + QUARANTINE_MARK)[0] for n in names if BUNDLE_SUFFIX + QUARANTINE_MARK in n})

    # ---- writes -------------------------------------------------------------------------------
    def validate(self, task: str, data: bytes, backbone_fingerprint: str | None = None) -> Bundle:
        """Validate an upload for ``task`` without storing it (as :meth:`LocalMaskStore.validate`)."""
        return validate_upload(task, data, self.max_bundle_bytes, backbone_fingerprint)

    def spool(self) -> contextlib.AbstractContextManager[tuple[object, Path]]:
        """A new local temporary file to stream an upload into (as :meth:`LocalMaskStore.spool`): yields
        ``(binary file object open for writing, its path)``; pass the path to :meth:`put`. Removed on exit.

        Raises:
            StoreFull / StoreUnavailable: it cannot be created or written (local disk full).
        """
        def create() -> tuple[int, Path]:
            fd, name = tempfile.mkstemp(prefix="supermask-upload-")
            return fd, Path(name)

        return spool_file(create)

    def put(self, task: str, data: bytes | os.PathLike, backbone_fingerprint: str | None = None,
            check: Callable[[Bundle], object] | None = None) -> tuple[Bundle, bool]:
        """Validate, then atomically store a bundle (see the module docstring for how).

        Args:
            data: the bundle's bytes, or the path of a :meth:`spool` file holding them (validated from a
                read-only memory map and uploaded from the file: never whole in memory).
            check: called with the decoded bundle after validation and before the write; whatever it
                raises propagates and nothing is written.
        Returns:
            ``(bundle, created)``; ``created`` is False when an existing object was replaced (as seen just
            before the write: two replicas creating the same task at once may both report True).
        Raises:
            as :meth:`validate`, or as ``check``; StoreFull / StoreUnavailable: the backend failed. On any
            error the stored object is unchanged (a temporary key may remain; it is removed later).
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            bundle, size = self.validate(task, data, backbone_fingerprint), len(data)
        else:
            bundle, size = validate_spooled(self, task, Path(data), backbone_fingerprint)
        if check is not None:
            check(bundle)
        final = self.path(task)
        tmp = f"{self.root}/{TMP_DIR}/{task}.{secrets.token_hex(8)}"
        with self._lock:
            created = not self.exists(task)
            try:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    self.fs.pipe_file(tmp, bytes(data))
                else:
                    self.fs.put_file(str(data), tmp)
                try:
                    self.fs.cp_file(tmp, final)  # one server-side copy (S3 CopyObject)
                finally:
                    try:
                        self.fs.rm_file(tmp)
                    except OSError as exc:  # the bundle is stored; the leftover is removed by a later open
                        log.warning("could not remove temporary upload %s: %s", tmp, exc)
            except OSError as exc:
                raise storage_error(exc, f"store task {task!r}") from None
        log.info("stored task %s (%d bytes, %s) in %s", task, size, "new" if created else "replaced", self.url)
        return bundle, created

    def delete(self, task: str) -> None:
        """Remove a task's object. Raises TaskNotFound, InvalidTaskName, StoreUnavailable."""
        with self._lock:
            path = self.path(task)
            self._info(task)
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                raise TaskNotFound(task) from None
            except OSError as exc:
                raise storage_error(exc, f"delete task {task!r}") from None

    def seed_from(self, directory: str | os.PathLike) -> list[str]:
        """Copy every bundle in the local ``directory`` into the store if the store holds no task
        (:func:`mask_store.local.seed_store`). Returns the names of the tasks copied."""
        return seed_store(self, directory)

    def _remove_stale_temporaries(self) -> None:
        tmp_root = f"{self.root}/{TMP_DIR}"
        try:
            entries = self.fs.ls(tmp_root, detail=True)
        except (FileNotFoundError, OSError):
            return
        now = time.time()
        for e in entries:
            modified = e.get("LastModified") or e.get("mtime") or e.get("created")
            ts = modified.timestamp() if hasattr(modified, "timestamp") else modified
            if isinstance(ts, (int, float)) and now - ts > STALE_TMP_SECONDS:
                try:
                    self.fs.rm_file(e["name"])
                    log.info("removed a stale temporary upload %s", e["name"])
                except OSError:
                    pass

    def __repr__(self) -> str:
        return f"ObjectMaskStore({self.url!r})"
