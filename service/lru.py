"""A byte-bounded LRU with pinned entries (the warm and hot tiers' bookkeeping), and giving freed memory back.

:class:`TaskCache` is written here rather than taken from ``cachetools.LRUCache(getsizeof=...)``: it keeps pinned
entries (``SUPERMASK_PINNED_TASKS``) that eviction skips, reports what it evicted (metrics, the device slots), and
its budget can change at run time; ``cachetools``' ``maxsize`` is fixed at construction and its ``popitem`` has
no notion of pinned keys.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by the process back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Called after a task load or a hot-tier promotion, whose transient buffers (bundle bytes, unpacked
    masks, float copies of a weight) glibc would otherwise keep: on MiniLM, six tasks left 82 MiB of RSS
    of which a trim handed back 52 (``benchmarks/memory_cpu.py``).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class TaskCache:
    """LRU of tasks bounded in bytes (not thread-safe). Entries are anything with an ``nbytes``
    attribute: :class:`LoadedTask` here, :class:`service.hot_tier.HotTask` in the hot tier."""

    capacity_bytes: int
    tasks: "OrderedDict[str, Any]" = field(default_factory=OrderedDict)
    used_bytes: int = 0

    def get(self, task: str) -> Any | None:
        entry = self.tasks.get(task)
        if entry is not None:
            self.tasks.move_to_end(task)
        return entry

    def put(self, task: str, entry: Any, pinned: Collection[str] = ()) -> list[str] | None:
        """Insert ``entry``, evicting the least recently used entries not in ``pinned`` until it fits; return the
        names evicted (least recently used first). None: it would not fit even with every unpinned entry evicted
        (nothing is inserted or evicted then), unless ``task`` is pinned itself (inserted over the budget)."""
        self.pop(task)
        held = sum(e.nbytes for n, e in self.tasks.items() if n in pinned)
        if task not in pinned and held + entry.nbytes > self.capacity_bytes:
            return None
        evicted = []
        for name in list(self.tasks):
            if self.used_bytes + entry.nbytes <= self.capacity_bytes:
                break
            if name not in pinned:
                evicted.append(name)
                self.used_bytes -= self.tasks.pop(name).nbytes
        self.tasks[task] = entry
        self.used_bytes += entry.nbytes
        return evicted

    def pop(self, task: str) -> Any | None:
        entry = self.tasks.pop(task, None)
        if entry is not None:
            self.used_bytes -= entry.nbytes
        return entry
