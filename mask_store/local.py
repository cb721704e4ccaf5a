"""Local-directory mask store: one bundle file per task, written atomically.

A write goes to a temporary file in the same directory, is flushed and
fsync'd, then renamed over the old file (``os.replace`` is atomic on POSIX),
and the directory is fsync'd. A crash at any point leaves either the old
bundle or the new one, never a partial file; stray temporary files are
ignored by readers and removed on open.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
import re
import secrets
import threading
from pathlib import Path

from mask_store.errors import BackboneMismatch, InvalidTaskName, TaskNotFound
from mask_store.format import (
    BUNDLE_SUFFIX,
    TASK_NAME_PATTERN,
    Bundle,
    BundleHeader,
    BundleInvalid,
    decode_bundle,
    read_header_file,
)

log = logging.getLogger(__name__)
_TMP_PREFIX = ".tmp-"
_TMP_ATTEMPTS = 100  # names tried before giving up, should every random one exist already


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int = 0o600) -> None:
    """Replace the file ``path`` by one holding exactly ``data``, atomically and durably.

    Guarantees: ``data`` goes to a new temporary file ``.tmp-<random>`` in the same directory as
    ``path`` (so the rename never crosses a file system), which is flushed and ``os.fsync``'d, then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX), then the directory is fsync'd so the
    rename itself survives a crash. Readers see the old file or the new one, never a partial one. On
    any error (``BaseException``, Ctrl-C included) the temporary file is removed and ``path`` is
    left as it was. :class:`LocalMaskStore` deletes stray ``.tmp-*`` files of its directory on open.

    Args:
        path: the file to write; its directory must exist (nothing is created).
        data: the complete new contents, bytes.
        mode: permission bits of the new file before the process umask is applied (as for
            ``os.open``): 0o600 (default) is what ``tempfile.mkstemp`` gives, owner only; 0o666 gives
            what a plain ``open(path, "wb")`` would.
    Raises:
        OSError: the temporary file cannot be created, written or fsync'd, or the rename fails
            (``FileNotFoundError`` for a missing directory); ``path`` is then unchanged.
    """
    path = Path(path)
    fd, tmp = _create_temp(path.parent, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _create_temp(directory: Path, mode: int) -> tuple[int, Path]:
    """Create and open a new, empty ``directory/.tmp-<random>`` (``O_EXCL``, like ``tempfile.mkstemp``
    but with the permission bits ``mode``). Returns ``(fd, path)``. Raises OSError."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(_TMP_ATTEMPTS):
        tmp = directory / f"{_TMP_PREFIX}{secrets.token_hex(6)}"
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {directory} after {_TMP_ATTEMPTS} tries")


def _fsync_dir(directory: Path) -> None:
    """fsync ``directory`` so a rename or unlink in it is durable; a directory that cannot be opened
    (some platforms and file systems) is skipped silently."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_task_name(task: str) -> str:
    """Return ``task`` if it is a valid task name, else raise :class:`InvalidTaskName`."""
    if not re.fullmatch(TASK_NAME_PATTERN, task):
        raise InvalidTaskName(f"task name {task!r} is not allowed: it must match {TASK_NAME_PATTERN}")
    return task


class LocalMaskStore:
    """Bundles in a directory, ``<root>/<task>.smask``.

    Args:
        root: directory, created if missing.
        max_bundle_bytes: uploads larger than this raise ``BundleTooLarge``.
    """

    def __init__(self, root: str | os.PathLike, max_bundle_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bundle_bytes = max_bundle_bytes
        self._lock = threading.Lock()
        for stray in self.root.glob(_TMP_PREFIX + "*"):
            stray.unlink(missing_ok=True)

    def path(self, task: str) -> Path:
        return self.root / f"{check_task_name(task)}{BUNDLE_SUFFIX}"

    def tasks(self) -> list[str]:
        """Names of the stored tasks, sorted (files whose stem is not a valid task name are ignored)."""
        names = (p.name[: -len(BUNDLE_SUFFIX)] for p in self.root.glob("*" + BUNDLE_SUFFIX))
        return sorted(n for n in names if re.fullmatch(TASK_NAME_PATTERN, n))

    def exists(self, task: str) -> bool:
        return self.path(task).is_file()

    def header(self, task: str) -> BundleHeader:
        """Header of a stored bundle (reads only the header).

        Raises:
            TaskNotFound: no bundle for ``task``. InvalidTaskName: ``task`` is not a valid name.
            BundleInvalid: the stored file's header is corrupt or of an unsupported format version.
        """
        path = self.path(task)
        try:
            return read_header_file(str(path))
        except FileNotFoundError:
            raise TaskNotFound(task) from None

    def version(self, task: str) -> tuple[int, int, int]:
        """An identity of the stored bundle's current file: ``(inode, mtime in ns, size in bytes)``.

        Every write replaces the file (``os.replace`` of a new inode), so the value changes when the
        task is replaced, also by another process sharing the directory (another server worker).
        Costs one ``stat`` call.

        Raises:
            TaskNotFound: no bundle for ``task``. InvalidTaskName: ``task`` is not a valid name.
        """
        try:
            st = self.path(task).stat()
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def size_bytes(self, task: str) -> int:
        try:
            return self.path(task).stat().st_size
        except FileNotFoundError:
            raise TaskNotFound(task) from None

    def get(self, task: str) -> Bundle:
        """Read and fully validate a stored bundle. Raises TaskNotFound, InvalidTaskName, BundleInvalid."""
        try:
            data = self.path(task).read_bytes()
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        return decode_bundle(data)

    def validate(self, task: str, data: bytes, backbone_fingerprint: str | None = None) -> Bundle:
        """Validate an upload for ``task`` without storing it.

        Raises:
            InvalidTaskName, BundleTooLarge, BundleInvalid (also when the bundle
            declares another task), BackboneMismatch.
        """
        check_task_name(task)
        bundle = decode_bundle(data, max_bytes=self.max_bundle_bytes)
        if bundle.header.task != task:
            raise BundleInvalid(f"bundle declares task {bundle.header.task!r} but was uploaded as {task!r}")
        if backbone_fingerprint is not None and bundle.header.backbone_fingerprint != backbone_fingerprint:
            raise BackboneMismatch(bundle.header.backbone_fingerprint, backbone_fingerprint)
        return bundle

    def put(self, task: str, data: bytes, backbone_fingerprint: str | None = None,
            check: Callable[[Bundle], object] | None = None) -> tuple[Bundle, bool]:
        """Validate then atomically store a bundle (decoded once).

        Args:
            check: called with the decoded bundle after validation and before the write (the
                server passes its resident-form builder, so a bundle it cannot serve is never stored);
                whatever it raises propagates and nothing is written.
        Returns:
            ``(bundle, created)``; ``created`` is False when an existing bundle was replaced.
        Raises:
            as :meth:`validate`, or as ``check``; on any error the store is unchanged.
        """
        bundle = self.validate(task, data, backbone_fingerprint)
        if check is not None:
            check(bundle)
        with self._lock:
            path = self.path(task)
            created = not path.exists()
            atomic_write(path, data)
        log.info("stored task %s (%d bytes, %s)", task, len(data), "new" if created else "replaced")
        return bundle, created

    def delete(self, task: str) -> None:
        """Remove a task's bundle. Raises TaskNotFound, InvalidTaskName."""
        with self._lock:
            try:
                self.path(task).unlink()
            except FileNotFoundError:
                raise TaskNotFound(task) from None
            _fsync_dir(self.root)

    def seed_from(self, directory: str | os.PathLike) -> list[str]:
        """Copy every bundle in ``directory`` into the store if the store is empty.

        Used to preload the shipped example tasks into a fresh store; a store
        that already holds any task is left alone (a deleted example stays deleted).
        Returns the names of the tasks copied.
        """
        src = Path(directory)
        if self.tasks() or not src.is_dir():
            return []
        copied = []
        for path in sorted(src.glob("*" + BUNDLE_SUFFIX)):
            task = path.name[: -len(BUNDLE_SUFFIX)]
            try:
                self.put(task, path.read_bytes())
            except Exception as exc:  # a broken example must not stop the server
                log.warning("skipping example bundle %s: %s", path, exc)
                continue
            copied.append(task)
        return copied
