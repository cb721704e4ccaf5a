"""What every mask store backend shares (local directory, object storage): task-name and label checks, upload
validation (decoded and checked once, before anything is stored), spooling an upload to a temporary file, the
typed error of a failed storage call, and seeding an empty store from a folder of bundles. Torch-free, and
imports no backend: :mod:`mask_store.local` and :mod:`mask_store.remote` both build on it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from mask_store.errors import (
    BackboneMismatch,
    InvalidTaskName,
    StoreFull,
    StoreUnavailable,
)
from mask_store.format import (
    BUNDLE_SUFFIX,
    TASK_NAME_PATTERN,
    Bundle,
    BundleHeader,
    BundleInvalid,
    decode_bundle,
)

log = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
QUARANTINE_MARK = ".corrupt-"
MAX_LABELS = 128
"""Default bound on an uploaded bundle's label count (the server's ``SUPERMASK_MAX_LABELS``)."""
MAX_LABEL_CHARS = 64
"""Default bound on one label's length in characters (the server's ``SUPERMASK_MAX_LABEL_CHARS``)."""


def storage_error(exc: OSError, action: str) -> StoreUnavailable:
    """The typed store error for an ``OSError`` of ``action`` (e.g. "store task 'SST-2'"):
    :class:`StoreFull` for ENOSPC / EDQUOT, else :class:`StoreUnavailable` (read-only, permissions, I/O)."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL_ERRNOS:
        return StoreFull(f"could not {action}: the store's disk is full ({reason}); nothing was changed")
    return StoreUnavailable(f"could not {action}: {reason}; nothing was changed")


def check_task_name(task: str) -> str:
    """Return ``task`` if it is a valid task name, else raise :class:`InvalidTaskName`."""
    if not re.fullmatch(TASK_NAME_PATTERN, task):
        raise InvalidTaskName(f"task name {task!r} is not allowed: it must match {TASK_NAME_PATTERN}")
    return task


def check_labels(labels: list[str], max_labels: int | None, max_label_chars: int | None) -> None:
    """Refuse a label set that would make every full reply large: each prediction carries every label's score
    (and, with ``top_k: null``, every label again ranked), so a reply grows with count x length.

    Raises:
        BundleInvalid: more than ``max_labels`` labels, or one longer than ``max_label_chars`` characters
            (the message quotes the limit, the setting and the value).
    """
    if max_labels is not None and len(labels) > max_labels:
        raise BundleInvalid(f"the bundle declares {len(labels)} labels, more than the limit of {max_labels} "
                            f"(SUPERMASK_MAX_LABELS)")
    if max_label_chars is not None:
        for i, label in enumerate(labels):
            if len(label) > max_label_chars:
                raise BundleInvalid(f"label {i} is {len(label)} characters, more than the limit of "
                                    f"{max_label_chars} (SUPERMASK_MAX_LABEL_CHARS)")


def validate_upload(task: str, data: bytes, max_bundle_bytes: int | None,
                    backbone_fingerprint: str | None = None, max_labels: int | None = MAX_LABELS,
                    max_label_chars: int | None = MAX_LABEL_CHARS) -> Bundle:
    """The checks every store backend makes on an upload for ``task`` (its ``validate``).

    Raises:
        InvalidTaskName, BundleTooLarge (``len(data) > max_bundle_bytes``), BundleInvalid (also when
        the bundle declares another task, or its label set exceeds ``max_labels`` / ``max_label_chars``:
        :func:`check_labels`), BackboneMismatch (fingerprint differs from ``backbone_fingerprint``).
    """
    check_task_name(task)
    bundle = decode_bundle(data, max_bytes=max_bundle_bytes)
    if bundle.header.task != task:
        raise BundleInvalid(f"bundle declares task {bundle.header.task!r} but was uploaded as {task!r}")
    check_labels(bundle.header.labels, max_labels, max_label_chars)
    if backbone_fingerprint is not None and bundle.header.backbone_fingerprint != backbone_fingerprint:
        raise BackboneMismatch(bundle.header.backbone_fingerprint, backbone_fingerprint)
    return bundle


def check_stored_name(task: str, header: BundleHeader) -> None:
    """A stored bundle must name the task its file / key names: one copied or renamed under another key would
    otherwise be served as that key's task. Raises BundleInvalid (the caller quarantines the file)."""
    if header.task != task:
        raise BundleInvalid(f"the stored bundle declares task {header.task!r} but is stored as {task!r}")


@contextlib.contextmanager
def spool_file(create: Callable[[], tuple[int, Path]]) -> Iterator[tuple[object, Path]]:
    """``(binary file open for writing, its path)`` of the file ``create()`` opened (``(fd, path)``), removed on
    exit unless it was renamed away meanwhile; OS errors as StoreFull / StoreUnavailable. Every backend's
    ``spool``."""
    try:
        fd, tmp = create()
    except OSError as exc:
        raise storage_error(exc, "create an upload file") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp
    except OSError as exc:
        raise storage_error(exc, "write the upload") from None
    finally:
        tmp.unlink(missing_ok=True)


def validate_spooled(store, task: str, tmp: Path, backbone_fingerprint: str | None) -> tuple[Bundle, int]:
    """``(store.validate(task, <the file's bytes>), size)`` for an upload spooled to ``tmp``, read through a
    read-only memory map (never copied whole into memory). Shared by every store backend.

    Raises:
        as ``store.validate``; StoreUnavailable: the file cannot be read.
    """
    try:
        with open(tmp, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return store.validate(task, b"", backbone_fingerprint), 0  # raises: too short
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return store.validate(task, mm, backbone_fingerprint), size  # the bundle holds copies
    except OSError as exc:
        raise storage_error(exc, f"read the upload of task {task!r}") from None


def seed_store(store, directory: str | os.PathLike) -> list[str]:
    """Copy every ``*.smask`` bundle of the local ``directory`` into ``store`` (any backend) if the store holds
    no task (a deleted example stays deleted); a bundle that fails validation is skipped with a warning.
    Returns the names of the tasks copied."""
    src = Path(directory)
    if store.tasks() or not src.is_dir():
        return []
    copied = []
    for path in sorted(src.glob("*" + BUNDLE_SUFFIX)):
        task = path.name[: -len(BUNDLE_SUFFIX)]
        try:
            store.put(task, path.read_bytes())
        except Exception as exc:  # a broken example must not stop the server
            log.warning("skipping example bundle %s: %s", path, exc)
            continue
        copied.append(task)
    return copied


