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
truncated or corrupted object, or one whose header names another task than its key, is moved aside to
``<root>/.quarantine/`` and raises :class:`~mask_store.errors.StoredBundleCorrupt`, the local store's error for
a corrupt file.

Servers sharing a store: quarantine moves only the exact bytes it judged, never a newer upload. On S3 the
object is read with one ``GetObject`` whose ETag names the bytes received (a second ranged read of a long
header carries ``If-Match``); the quarantine copy is those bytes (or a ``CopyObject`` with
``CopySourceIfMatch``), and the object is removed with a conditional ``DeleteObject`` (``If-Match``: S3
conditional deletes, answered 412 when another server replaced it meanwhile, which is then left in place).
Other fsspec backends have no conditional delete: there the version token is compared just before the move
(best effort; a replace in the few milliseconds between can still be moved aside).
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
from mask_store.common import MAX_LABEL_CHARS, MAX_LABELS, QUARANTINE_MARK, check_stored_name, check_task_name
from mask_store.common import seed_store, spool_file, storage_error, validate_spooled, validate_upload

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
QUARANTINE_DIR = ".quarantine"
STALE_TMP_SECONDS = 3600.0
"""A temporary upload key older than this (seconds) is taken for the leftover of a crashed writer and removed
when a store is opened (younger ones may belong to another replica's upload in progress)."""
_HEADER_PROBE_BYTES = 64 * 1024  # first ranged read of a header; most headers are a few KiB
_HEADER_LIMIT = 12 + MAX_HEADER_BYTES + HEADER_DIGEST_BYTES  # prefix, the largest header allowed, its digest
_VERSION_KEYS = ("ETag", "etag", "generation", "VersionId", "version_id")
_CONSISTENT_READ_TRIES = 5  # backends without a versioned read: reads retried while the object changes under them


def _s3_error(exc: BaseException | None) -> tuple[str, int | None]:
    """S3's error code and HTTP status behind ``exc`` (s3fs turns botocore's errors into ``OSError``, keeping the
    original as its cause); ``("", None)`` when there is none."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return (str(response.get("Error", {}).get("Code", "")),
                    response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return "", None


def precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is S3's 412 ``PreconditionFailed``: an ``If-Match`` that no longer holds."""
    code, status = _s3_error(exc)
    return code in ("PreconditionFailed", "412") or status == 412


class _Changed(Exception):
    """The object changed between two reads of one judgement (a ranged re-read's ``If-Match`` failed)."""


class ObjectMaskStore:
    """Bundles as objects under an fsspec URL.

    Args:
        url: e.g. ``s3://bucket/masks``; the bucket (or root folder) is created when missing and the
            credentials allow it.
        max_bundle_bytes: uploads larger than this raise ``BundleTooLarge``.
        options: fsspec storage options (s3fs: ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``,
            ...). fsspec's listing cache and instance cache are turned off here (``use_listings_cache=False``,
            ``skip_instance_cache=True``): a cached listing or ``info`` would hide another replica's write.
        max_labels, max_label_chars: label-set bounds of an upload (:func:`mask_store.local.check_labels`).
    Raises:
        ValueError: no fsspec implementation for the URL's scheme. ImportError: the implementation's package
        (s3fs, gcsfs, adlfs) is missing. OSError: the store cannot be reached.
    """

    def __init__(self, url: str, max_bundle_bytes: int | None = None, options: Mapping[str, Any] | None = None,
                 on_quarantine: Callable[[str, str], object] | None = None, max_labels: int | None = MAX_LABELS,
                 max_label_chars: int | None = MAX_LABEL_CHARS):
        import fsspec

        opts = dict(options or {})
        opts.setdefault("use_listings_cache", False)
        opts.setdefault("skip_instance_cache", True)
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **opts)
        self.root = root.rstrip("/")
        self.max_bundle_bytes = max_bundle_bytes
        self.max_labels, self.max_label_chars = max_labels, max_label_chars
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

    @property
    def _is_s3(self) -> bool:
        return hasattr(self.fs, "_call_s3") and hasattr(self.fs, "split_path")

    def _s3_get(self, task: str, start: int | None = None, end: int | None = None,
                if_match: str | None = None) -> tuple[bytes, str]:
        """One S3 ``GetObject`` of ``task``'s object (bytes ``[start, end)`` when given): ``(bytes, ETag)``, the
        ETag naming exactly the bytes received. ``if_match``: refuse (:class:`_Changed`) unless the object
        still has that ETag."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path(task))
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if start is not None or end is not None:
            kwargs["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        if if_match is not None:
            kwargs["IfMatch"] = if_match

        async def call() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", **kwargs)
            try:
                return await resp["Body"].read(), str(resp.get("ETag"))
            finally:
                resp["Body"].close()

        try:
            return sync(self.fs.loop, call)
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        except OSError as exc:
            if if_match is not None and precondition_failed(exc):
                raise _Changed() from None
            if "Range" in kwargs and _s3_error(exc)[0] == "InvalidRange":  # an empty object has no byte 0
                kwargs.pop("Range")
                return self._s3_get(task, None, None, if_match)
            raise storage_error(exc, f"read task {task!r}") from None

    def _read_versioned(self, task: str, start: int | None = None, end: int | None = None,
                        token: Hashable | None = None) -> tuple[bytes, Hashable | None]:
        """Bytes of ``task``'s object and the version token that names them (None: the object kept changing
        while it was read, on a backend without versioned reads: such bytes are judged but never quarantined).
        ``token``: the bytes must belong to that version (else :class:`_Changed`).

        Raises:
            TaskNotFound, StoreUnavailable, _Changed.
        """
        if self._is_s3:
            return self._s3_get(task, start, end, if_match=token if isinstance(token, str) else None)
        for _ in range(_CONSISTENT_READ_TRIES):
            before = self._token(self._info(task))
            if token is not None and before != token:
                raise _Changed()
            data = self._read(task, start, end)
            if self._token(self._info(task)) == before:
                return data, before
        return data, None

    def _header_read(self, task: str) -> tuple[bytes, Hashable | None]:
        """The header bytes of ``task``'s object (one ranged read; a second, of the same version, for a header
        over 64 KiB) and their version token."""
        for _ in range(_CONSISTENT_READ_TRIES):
            prefix, token = self._read_versioned(task, 0, _HEADER_PROBE_BYTES)
            if len(prefix) < 12 or len(prefix) < _HEADER_PROBE_BYTES:
                return prefix, token  # the whole object, or a prefix too short to say more
            hlen = int.from_bytes(prefix[8:12], "little")
            need = min(12 + hlen + HEADER_DIGEST_BYTES, _HEADER_LIMIT)  # the header and its digest (v2)
            if need <= len(prefix):
                return prefix, token
            try:
                return self._read_versioned(task, 0, need, token=token)[0], token
            except _Changed:
                continue  # replaced between the two reads: judge the new object afresh
        return prefix, None

    def header(self, task: str) -> BundleHeader:
        """Header of a stored bundle, from one ranged read (two for a header over 64 KiB, of the same version).

        Raises:
            TaskNotFound, InvalidTaskName, StoreUnavailable. BundleUnsupported: a newer format version (left
            in place). StoredBundleCorrupt: the object is too short, its header corrupt, or it names another
            task than its key (it is quarantined).
        """
        prefix, token = self._header_read(task)
        try:
            header = decode_header(prefix)[0]
            check_stored_name(task, header)
            return header
        except BundleUnsupported:
            raise
        except BundleInvalid as exc:
            raise self._quarantine(task, token, str(exc)) from None

    def get(self, task: str) -> Bundle:
        """Read (one versioned read) and fully validate a stored bundle, as :meth:`LocalMaskStore.get` does a file.

        Raises:
            TaskNotFound, InvalidTaskName, StoreUnavailable, BundleUnsupported (left in place);
            StoredBundleCorrupt: a truncated or corrupted object, or one naming another task (quarantined).
        """
        data, token = self._read_versioned(task)
        try:
            bundle = decode_bundle(data)
            check_stored_name(task, bundle.header)
            return bundle
        except BundleUnsupported:
            raise
        except BundleInvalid as exc:
            raise self._quarantine(task, token, str(exc), data) from None

    def _quarantine(self, task: str, token: Hashable | None, reason: str,
                    data: bytes | None = None) -> StoredBundleCorrupt:
        """Move the corrupt object aside to ``.quarantine/`` if it is still version ``token`` (the version whose
        bytes were judged); the error to raise. ``data``: the judged bytes when the whole object was read
        (written as the quarantine copy); else the copy is made server-side from that version. See the module
        docstring for the conditional operations."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{self.root}/{QUARANTINE_DIR}/{task}{BUNDLE_SUFFIX}{QUARANTINE_MARK}{stamp}-{secrets.token_hex(3)}"
        moved = None
        if token is None:
            log.error("stored bundle of task %s in %s changed while it was read; not moved", task, self.url)
        else:
            with self._lock:
                try:
                    moved = (self._move_s3 if self._is_s3 else self._move_other)(task, token, target, data)
                except (OSError, StoreUnavailable, TaskNotFound) as exc:
                    log.error("could not quarantine task %s in %s: %s", task, self.url, exc)
        log.error("stored bundle of task %s in %s is corrupt (%s); %s", task, self.url, reason,
                  f"moved to {QUARANTINE_DIR}/{moved}" if moved else "not moved")
        if moved and self.on_quarantine is not None:
            self.on_quarantine(task, reason)
        return StoredBundleCorrupt(task, reason, moved)

    def _move_s3(self, task: str, token: Hashable, target: str, data: bytes | None) -> str | None:
        """Copy version ``token`` to ``target`` and delete the object only if it is still that version
        (``DeleteObject`` with ``If-Match``); the quarantine name, or None when another server replaced or
        removed the object first (then the copy is removed and the object left as it is)."""
        bucket, key, _ = self.fs.split_path(self.path(task))
        tbucket, tkey, _ = self.fs.split_path(target)
        try:
            if data is not None:
                self.fs.pipe_file(target, bytes(data))  # exactly the bytes judged
            else:
                self.fs.call_s3("copy_object", Bucket=tbucket, Key=tkey, CopySource={"Bucket": bucket, "Key": key},
                                CopySourceIfMatch=str(token))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if precondition_failed(exc):
                return None
            raise
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=str(token))
        except (FileNotFoundError, OSError) as exc:
            if not isinstance(exc, FileNotFoundError) and not precondition_failed(exc):
                raise
            log.info("task %s in %s was replaced or removed by another writer before quarantine; left in place",
                     task, self.url)
            try:
                self.fs.rm_file(target)
            except OSError:
                pass
            return None
        return target.rsplit("/", 1)[-1]

    def _move_other(self, task: str, token: Hashable, target: str, data: bytes | None) -> str | None:
        """Best effort on backends without conditional operations: compare the token just before the move."""
        if self._token(self._info(task)) != token:  # replaced by a valid upload meanwhile
            return None
        if data is not None:
            self.fs.pipe_file(target, bytes(data))
        else:
            self.fs.cp_file(self.path(task), target)
        self.fs.rm_file(self.path(task))
        return target.rsplit("/", 1)[-1]

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
        return validate_upload(task, data, self.max_bundle_bytes, backbone_fingerprint, self.max_labels,
                               self.max_label_chars)

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
