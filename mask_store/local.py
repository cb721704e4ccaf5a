"""Local-directory mask store: one bundle file per task, written atomically.

A write goes to a temporary file in the same directory, is flushed and
fsync'd, then renamed over the old file (``os.replace`` is atomic on POSIX),
and the directory is fsync'd. A crash at any point leaves either the old
bundle or the new one, never a partial file. Temporary files are named
``.tmp-<host>-<pid>-<random>``: readers ignore them; only the writer removes
its own, and a store that opens sweeps only stale ones (of a dead process on
this host, or older than :data:`STALE_TMP_SECONDS`), so a second server
starting on a shared store never breaks another's upload in progress.

Faults: only regular files are tasks (a FIFO or a directory named
``X.smask`` is ignored with a warning and never opened for a blocking read);
storage errors become :class:`StoreFull` / :class:`StoreUnavailable`; a
stored bundle that fails validation is quarantined (renamed to
``<task>.smask.corrupt-<UTC time>``, logged, reported by
:meth:`LocalMaskStore.quarantined`) and read as :class:`StoredBundleCorrupt`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time

try:
    import fcntl
except ImportError:  # not POSIX: the thread lock only
    fcntl = None  # type: ignore[assignment]
from collections.abc import Callable, Iterator
from pathlib import Path

from mask_store.errors import (
    BundleUnsupported,
    StoredBundleCorrupt,
    TaskNotFound,
)
from mask_store.format import (
    BUNDLE_SUFFIX,
    HEADER_DIGEST_BYTES,
    MAX_HEADER_BYTES,
    TASK_NAME_PATTERN,
    Bundle,
    BundleHeader,
    BundleInvalid,
    decode_bundle,
    decode_header,
)

log = logging.getLogger(__name__)
from mask_store.common import (  # noqa: F401 - re-exported: callers import these from here too
    MAX_LABEL_CHARS,
    MAX_LABELS,
    QUARANTINE_MARK,
    check_labels,
    check_stored_name,
    check_task_name,
    seed_store,
    spool_file,
    storage_error,
    validate_spooled,
    validate_upload,
)
_TMP_PREFIX = ".tmp-"
_TMP_ATTEMPTS = 100  # names tried before giving up, should every random one exist already
def _host_id() -> str:
    """This host's id in temporary file names: hostname, boot id and pid namespace (containers that share
    a hostname but not a pid namespace must not take each other's live writers for dead ones)."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else Path(path).read_text().strip())
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


_HOST_ID = _host_id()
_TMP_NAME = re.compile(r"\.tmp-([0-9a-f]{8})-(\d+)-[0-9a-f]+")
STALE_TMP_SECONDS = 3600.0
"""A temporary file older than this (by mtime) is a crashed writer's, whatever host wrote it."""


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int = 0o600) -> None:
    """Replace the file ``path`` by one holding exactly ``data``, atomically and durably.

    Guarantees: ``data`` goes to a new temporary file ``.tmp-<random>`` in the same directory as
    ``path`` (so the rename never crosses a file system), which is flushed and ``os.fsync``'d, then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX), then the directory is fsync'd so the
    rename itself survives a crash. Readers see the old file or the new one, never a partial one. On
    any error (``BaseException``, Ctrl-C included) the temporary file is removed and ``path`` is
    left as it was. The temporary file's name carries this host and process (``.tmp-<host>-<pid>-<hex>``),
    so that :func:`sweep_stale_temps` removes only a dead writer's.

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
        tmp = directory / f"{_TMP_PREFIX}{_HOST_ID}-{os.getpid()}-{secrets.token_hex(6)}"
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
    except OSError as exc:  # after a rename or unlink that has happened: report it, do not undo the answer
        log.warning("could not fsync the directory %s (the change is made, its durability unconfirmed): %s",
                    directory, exc)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def sweep_stale_temps(directory: Path, max_age_s: float = STALE_TMP_SECONDS, now: float | None = None) -> list[str]:
    """Remove the temporary files of crashed writers from ``directory``; return their names.

    A ``.tmp-*`` file is removed when its writer is a dead process of this host (the name records the
    host and pid), or when it is older than ``max_age_s`` (by mtime: a writer on another host, or a
    name of another form). A live writer's file, on this host or (younger than the bound) another, is
    never touched, so servers and workers may open one store at any time.
    """
    now = time.time() if now is None else now
    removed = []
    for path in directory.glob(_TMP_PREFIX + "*"):
        m = _TMP_NAME.fullmatch(path.name)
        try:
            dead = m is not None and m.group(1) == _HOST_ID and not _pid_alive(int(m.group(2)))
            if dead or now - path.lstat().st_mtime > max_age_s:
                path.unlink()
                removed.append(path.name)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        except OSError as exc:  # a read-only store: nothing to gain, nothing lost
            log.warning("could not remove stale temporary file %s: %s", path, exc)
    if removed:
        log.info("removed %d stale temporary file(s) from %s", len(removed), directory)
    return removed


def _read_regular(path: Path, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """Bytes of ``path`` (the first ``limit`` bytes if given) and its ``fstat``, refusing anything but a
    regular file without blocking (``O_NONBLOCK``: a FIFO's open returns at once and is refused).

    Raises:
        FileNotFoundError: missing, or not a regular file (logged: it is not a task). OSError: as ``os.open``.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s is not a regular file: ignored (not a task)", path)
            raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path))
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit)
        return data, st
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime too: restoring size and mtime after an in-place edit (os.utime) cannot restore the ctime
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)




class LocalMaskStore:
    """Bundles in a directory, ``<root>/<task>.smask``.

    Args:
        root: directory, created if missing.
        max_bundle_bytes: uploads larger than this raise ``BundleTooLarge``.
        on_quarantine: called with ``(task, reason)`` after a corrupt stored bundle was moved aside
            (the server counts it in a metric).
        max_labels, max_label_chars: label-set bounds of an upload (:func:`check_labels`); None: no bound.
    Raises:
        StoreUnavailable: ``root`` cannot be created.
    """

    def __init__(self, root: str | os.PathLike, max_bundle_bytes: int | None = None,
                 on_quarantine: Callable[[str, str], object] | None = None, max_labels: int | None = MAX_LABELS,
                 max_label_chars: int | None = MAX_LABEL_CHARS):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, f"create the store directory {self.root}") from None
        self.max_bundle_bytes = max_bundle_bytes
        self.max_labels, self.max_label_chars = max_labels, max_label_chars
        self.on_quarantine = on_quarantine
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        sweep_stale_temps(self.root)

    def path(self, task: str) -> Path:
        return self.root / f"{check_task_name(task)}{BUNDLE_SUFFIX}"

    def tasks(self) -> list[str]:
        """Names of the stored tasks, sorted: regular files ``<valid name>.smask`` (symbolic links to
        them included); anything else with the suffix (a FIFO, a directory) is ignored with one warning."""
        names = []
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            log.error("cannot list the store %s: %s", self.root, exc)
            raise storage_error(exc, "list the store") from None
        for entry in entries:
            if not entry.name.endswith(BUNDLE_SUFFIX):
                continue
            name = entry.name[: -len(BUNDLE_SUFFIX)]
            if not re.fullmatch(TASK_NAME_PATTERN, name):
                continue
            try:
                regular = entry.is_file()  # follows symbolic links; no open, so a FIFO never blocks
            except OSError:
                regular = False
            if regular:
                names.append(name)
            elif entry.name not in self._warned:
                self._warned.add(entry.name)
                log.warning("%s in the store is not a regular file: ignored", entry.path)
        return sorted(names)

    def exists(self, task: str) -> bool:
        return self.path(task).is_file()

    def header(self, task: str) -> BundleHeader:
        """Header of a stored bundle (reads only the header).

        Raises:
            TaskNotFound: no bundle for ``task`` (or not a regular file). InvalidTaskName.
            StoredBundleCorrupt: the stored header is corrupt (the file is quarantined).
            BundleUnsupported: a newer format version (left in place). StoreUnavailable: a read error.
        """
        path = self.path(task)
        try:
            data, st = _read_regular(path, limit=12 + MAX_HEADER_BYTES + HEADER_DIGEST_BYTES)
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        except OSError as exc:
            raise storage_error(exc, f"read task {task!r}") from None
        try:
            header = decode_header(data)[0]
            check_stored_name(task, header)
            return header
        except BundleUnsupported:
            raise
        except BundleInvalid as exc:
            raise self._quarantine(task, st, str(exc)) from None

    def version(self, task: str) -> tuple[int, int, int, int]:
        """An identity of the stored bundle's current file: ``(inode, mtime ns, ctime ns, size in bytes)``.

        Every write replaces the file (``os.replace`` of a new inode), so the value changes when the
        task is replaced, also by another process sharing the directory (another server worker), and
        an edit in place changes the ctime even if size and mtime are restored. One ``stat`` call.

        Raises:
            TaskNotFound: no bundle for ``task`` (or not a regular file). InvalidTaskName.
        """
        try:
            st = self.path(task).stat()
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        except OSError as exc:
            raise storage_error(exc, f"stat task {task!r}") from None
        if not stat.S_ISREG(st.st_mode):
            raise TaskNotFound(task)
        return _identity(st)

    def size_bytes(self, task: str) -> int:
        return self.version(task)[3]

    def get(self, task: str) -> Bundle:
        """Read and fully validate a stored bundle (every checksum: its content, not only its identity).

        Raises:
            TaskNotFound, InvalidTaskName, BundleUnsupported, StoreUnavailable;
            StoredBundleCorrupt: it fails validation (the file is quarantined).
        """
        try:
            data, st = _read_regular(self.path(task))
        except FileNotFoundError:
            raise TaskNotFound(task) from None
        except OSError as exc:
            raise storage_error(exc, f"read task {task!r}") from None
        try:
            bundle = decode_bundle(data)
            check_stored_name(task, bundle.header)
            return bundle
        except BundleUnsupported:
            raise
        except BundleInvalid as exc:
            raise self._quarantine(task, st, str(exc)) from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold this store's write lock: the thread lock, and an exclusive ``flock`` of the store directory
        itself that every process writing through a :class:`LocalMaskStore` on it takes too (another server
        sharing it; no lock file is made). So quarantine's "is it still the file that was read?" check and its
        rename happen with no upload or delete in between. Where ``flock`` is unavailable (not POSIX, or a
        file system that refuses it) only the thread lock is held."""
        with self._lock:
            fd = None
            if fcntl is not None:
                try:
                    fd = os.open(self.root, os.O_RDONLY)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:
                    if fd is not None:
                        os.close(fd)
                    fd = None
            try:
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # releases the flock

    def _quarantine(self, task: str, st: os.stat_result, reason: str) -> StoredBundleCorrupt:
        """Move the corrupt file aside if it is still the file that was read (same inode, mtime, ctime and size,
        compared and renamed under :meth:`_writing`, so never a newer upload); the error to raise."""
        path = self.path(task)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = path.with_name(f"{path.name}{QUARANTINE_MARK}{stamp}-{secrets.token_hex(3)}")
        moved = None
        with self._writing():
            try:
                if _identity(path.stat()) == _identity(st):  # not replaced by a valid upload meanwhile
                    os.replace(path, target)
                    _fsync_dir(self.root)
                    moved = target.name
            except OSError as exc:
                log.error("could not quarantine %s: %s", path, exc)
        log.error("stored bundle of task %s is corrupt (%s); %s", task, reason,
                  f"moved to {moved}" if moved else "not moved")
        if moved and self.on_quarantine is not None:
            self.on_quarantine(task, reason)
        return StoredBundleCorrupt(task, reason, moved)

    def quarantined(self) -> list[str]:
        """Tasks with a quarantined (corrupt) file in the store, by any process sharing it, sorted."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted({n.split(BUNDLE_SUFFIX + QUARANTINE_MARK)[0] for n in names
                       if BUNDLE_SUFFIX + QUARANTINE_MARK in n})

    def validate(self, task: str, data: bytes, backbone_fingerprint: str | None = None) -> Bundle:
        """Validate an upload for ``task`` without storing it.

        Raises:
            InvalidTaskName, BundleTooLarge, BundleInvalid (also when the bundle
            declares another task), BackboneMismatch.
        """
        return validate_upload(task, data, self.max_bundle_bytes, backbone_fingerprint, self.max_labels,
                               self.max_label_chars)

    def spool(self) -> contextlib.AbstractContextManager[tuple[object, Path]]:
        """A new temporary file in the store's directory to stream an upload into: yields ``(binary file
        object open for writing, its path)``; pass the path to :meth:`put` to validate and store it
        (renamed into place: no second copy). The file is removed on exit unless :meth:`put` took it.

        Raises:
            StoreFull / StoreUnavailable: it cannot be created (disk full, read-only store).
        """
        return spool_file(lambda: _create_temp(self.root, 0o600))

    def put(self, task: str, data: bytes | os.PathLike, backbone_fingerprint: str | None = None,
            check: Callable[[Bundle], object] | None = None) -> tuple[Bundle, bool]:
        """Validate then atomically store a bundle (decoded once).

        Args:
            data: the bundle's bytes, or the path of a :meth:`spool` file holding them (validated from a
                read-only memory map, then fsync'd and renamed into place: the upload is never held
                whole in memory nor written twice).
            check: called with the decoded bundle after validation and before the write (the
                server passes its resident-form builder, so a bundle it cannot serve is never stored);
                whatever it raises propagates and nothing is written.
        Returns:
            ``(bundle, created)``; ``created`` is False when an existing bundle was replaced.
        Raises:
            as :meth:`validate`, or as ``check``; StoreFull / StoreUnavailable: the write failed (disk
            full, read-only); on any error the store is unchanged.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            bundle = self.validate(task, data, backbone_fingerprint)
            size = len(data)
        else:
            bundle, size = validate_spooled(self, task, Path(data), backbone_fingerprint)
        if check is not None:
            check(bundle)
        with self._writing():
            path = self.path(task)
            created = not path.exists()
            try:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    atomic_write(path, data)
                else:
                    with open(data, "rb+") as fh:
                        os.fsync(fh.fileno())
                    os.replace(data, path)
                    _fsync_dir(self.root)
            except OSError as exc:
                raise storage_error(exc, f"store task {task!r}") from None
        log.info("stored task %s (%d bytes, %s)", task, size, "new" if created else "replaced")
        return bundle, created

    def delete(self, task: str) -> None:
        """Remove a task's bundle. Raises TaskNotFound, InvalidTaskName, StoreUnavailable (read-only)."""
        path = self.path(task)
        with self._writing():
            try:
                path.unlink()
            except FileNotFoundError:
                raise TaskNotFound(task) from None
            except IsADirectoryError:
                raise TaskNotFound(task) from None
            except OSError as exc:
                raise storage_error(exc, f"delete task {task!r}") from None
            _fsync_dir(self.root)

    def seed_from(self, directory: str | os.PathLike) -> list[str]:
        """Copy every bundle in ``directory`` into the store if the store is empty (:func:`seed_store`):
        used to preload the shipped example tasks into a fresh store. Returns the names of the tasks copied."""
        return seed_store(self, directory)
