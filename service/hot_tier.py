"""CPU hot tier: the cache of tasks' hot forms (materialised weights, or a session), an LRU bounded in bytes.

Residency on the CPU in low precision (``SUPERMASK_CPU_PRECISION`` bf16 or int8):

* **hot** — every masked matrix of the task materialised once as
  ``deq(W_q) ⊙ μ`` in the compute precision and layout
  (:func:`service.kernels.cpu_hot.materialize`: int8 ``W_q ⊙ μ`` with the
  backbone's per-channel scales, prepacked for oneDNN; or bfloat16), so a hot
  request costs exactly a dense single-model forward. Held here, least
  recently used evicted beyond ``SUPERMASK_HOT_CACHE_BYTES``.
* **warm** — the task's masks as its bundle stores them (entropy-coded in v3, ~0.25 MB for MiniLM; packed bits
  for v2) and head, in the host task cache (:mod:`service.tasks`). Where the tier has sparse forms
  (:mod:`service.sparse_forms`) a warm task is served through its sparse form and promoted (unpack +
  materialise; timed and exported as ``supermask_hot_promotion_duration_seconds``) only once it has earned its
  place: ``promote_after`` requests within the window and, into a full tier, asked for more often than every task
  it would evict; the promotion then runs on a background thread, one at a time. Without sparse forms a pass that
  needs a warm task promotes it.
* **cold** — in the store; loaded into the warm tier first.

The torch tier's materialised weights and the product-group helpers are in :mod:`service.hot_weights`.

Thread-safe: the engine promotes a request's tasks before it takes the
pass lock, so a promotion (a few ms to ~20 ms on MiniLM) never stalls the
passes of other tasks; a promotion runs once however many requests wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from service.flight import Flight, Flights
from service.metrics import Metrics
from service.tasks import LoadedTask, TaskCache, release_freed_memory

log = logging.getLogger(__name__)


@dataclass
class HotTask:
    """One task's hot form (the torch hot tier: group name → :class:`HotWeight`; the ONNX Runtime tier: its
    session), from one bundle (:attr:`service.tasks.LoadedTask.identity`)."""

    identity: tuple
    form: Any
    nbytes: int


class HotCache:
    """Task → hot form, LRU bounded in bytes, each promotion run once however many threads ask for it.

    A subclass says how a task's hot form is built (:meth:`_promote`) and how large it would be
    (:meth:`task_bytes`).

    Args:
        capacity_bytes: byte budget (> 0); a task larger than the whole budget is built for its pass only.
        metrics: promotions and residency are recorded here (None: nothing recorded).
        pinned: tasks never evicted (``SUPERMASK_PINNED_TASKS``); promoted on first use.
        promote_after: a task is kept hot from its ``promote_after``-th request within ``window_s`` seconds;
            before that its form is built for its pass only and nothing is evicted for it (1: on first use). A task
            seen once — one request of a long tail — then costs no other task its place.
        background: with a ``fallback`` (:meth:`get`), a task that earns its place is promoted on a background
            thread while its requests are served by the fallback, so no request waits for a promotion
            (False: the request that earns it waits, as without a fallback).

    With a fallback, admission is also frequency-based (as TinyLFU admits into an LRU): a task is kept only if it
    has been asked for more often, recently, than every task it would evict (request counts halved every
    ``window_s`` seconds), so a long tail of tasks each asked for a few times cannot churn the hot set; and at most
    one promotion runs in the background at a time (a task that earns its place while another is being promoted
    stays on its fallback and is considered again at its next request), so promotions never take more than one
    core from the requests.
    """

    kind = "hot"
    """The tier's name in the metrics (``supermask_<kind>_tasks``, ``_bytes``, ``_capacity_bytes``, ``_evictions``)."""

    def __init__(self, capacity_bytes: int, metrics: Metrics | None = None, pinned: Collection[str] = (),
                 promote_after: int = 1, window_s: float = 60.0, background: bool = True):
        if capacity_bytes <= 0:
            raise ValueError(f"{self.kind} tier capacity must be > 0 bytes, got {capacity_bytes}")
        if promote_after < 1:
            raise ValueError(f"promote_after must be >= 1, got {promote_after}")
        self.metrics = metrics
        self.pinned = frozenset(pinned)
        self.promote_after = promote_after
        self.background = background
        self.window_s = window_s
        #: task -> requests that found it not hot within the last ``window_s`` seconds (bounded: a scan of many
        #: names forgets the oldest)
        self._seen: TTLCache = TTLCache(maxsize=100_000, ttl=window_s)
        #: task -> recent requests (hot or not), halved every ``window_s``: the frequency admission compares these
        self._freq: dict[str, float] = {}
        self._aged = time.monotonic()
        self._epochs: dict[str, int] = {}  # task -> times dropped: a build that started before a drop is not kept
        self.evictions = 0
        self._lru = TaskCache(capacity_bytes)  # task -> HotTask
        self._lock = threading.Lock()  # guards _lru / _promoting / _freq; never held while materialising
        self._promoting = Flights()  # (task, bundle identity) -> its build in progress
        self._background = threading.BoundedSemaphore(1)  # one background promotion at a time
        #: (task, bundle identity) whose promotion failed: not tried again for ``window_s`` (bounded)
        self._failed: TTLCache = TTLCache(maxsize=10_000, ttl=window_s)
        if metrics is not None:
            self._metric("capacity_bytes").set(capacity_bytes)
            self._gauges()

    @property
    def tasks(self) -> "OrderedDict[str, HotTask]":
        """The hot tasks, least recently used first (read-only use)."""
        return self._lru.tasks

    @property
    def used_bytes(self) -> int:
        return self._lru.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._lru.capacity_bytes

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self._lru.capacity_bytes = value

    def get(self, task: str, entry: LoadedTask, keep: bool | None = None,
            fallback: Callable[[str, LoadedTask], Any] | None = None) -> Any:
        """``task``'s hot form, promoting it on a miss (``keep``: False builds it for the caller's pass only, never
        evicting another task for it; None: the policy, ``promote_after``).

        ``fallback(task, entry)``: what serves a task that is not (yet) hot instead of building its hot form for
        one pass (the tier's sparse form); its result is returned then, and a promotion the task earned runs in
        the background (``background``), or now (a failed promotion then falls back too, logged). A task whose
        promotion failed is not promoted again for ``window_s``.

        A hot entry from another bundle (a replacement) is rebuilt from ``entry``. The
        materialisation runs outside the tier's lock, once however many threads ask for the same
        ``(task, bundle)`` at a time (the others wait for it, or take the fallback).
        """
        key = (task, entry.identity)
        mine = counted = False
        while True:
            with self._lock:
                if not counted:
                    self._count(task)
                    counted = True
                hot = self._lru.get(task)
                if hot is not None and hot.identity == entry.identity:
                    return hot.form
                if key not in self._promoting:
                    seen = self._seen.get(task)
                    if seen is None:  # set once: the window runs from the first request, not the latest
                        seen = self._seen[task] = [0]
                    seen[0] += 1
                    # re-checked when built: a frequency admission may no longer hold by then
                    recheck = keep is None and fallback is not None and task not in self.pinned
                    if keep is None:
                        keep = task in self.pinned or (seen[0] >= self.promote_after
                                                       and (fallback is None or self._admits(task, entry)))
                    if fallback is not None and (not keep or key in self._failed):
                        break
                    background = fallback is not None and self.background
                    if background and not self._background.acquire(blocking=False):
                        break  # another promotion runs in the background: this task waits for its next request
                    flight, mine = self._promoting.join_or_start(key)
                    epoch = self._epochs.get(task, 0)
                    break
                if fallback is not None:
                    break  # being promoted (in the background): this pass takes the fallback
                flight = self._promoting[key]
            try:
                return flight.wait()  # another thread is materialising it: its form serves this pass too
            except Exception:  # noqa: BLE001 - its build failed: this thread tries again (and raises its own error)
                continue
        if not mine:  # not hot, not earned (or being promoted by another thread): the fallback serves it
            return fallback(task, entry)
        args = (task, entry, key, flight, keep, epoch, recheck)
        if background:
            try:
                threading.Thread(target=self._build, args=args + (True,), name=f"promote-{task}", daemon=True).start()
            except Exception as exc:  # no thread: the flight lands and the slot is freed here; the fallback serves
                self._failed_build(key, flight, exc, True, keep)
                log.exception("could not start the promotion of task %s; served through its fallback form", task)
            return fallback(task, entry)
        try:
            return self._build(*args)
        except Exception:
            if fallback is None:
                raise
            log.exception("promotion of task %s failed; served through its fallback form", task)
            return fallback(task, entry)

    def build_for_pass(self, task: str, entry: LoadedTask) -> Any:
        """``task``'s hot form built for the caller's pass only (kept by no one, evicting nothing), without counting
        a request: a tier's fallback for a task that has no cheaper form. Shares a build in progress for the same
        bundle (single flight).

        Raises:
            what the build raises (``_promote``'s errors).
        """
        key = (task, entry.identity)
        with self._lock:
            hot = self._lru.get(task)
            if hot is not None and hot.identity == entry.identity:
                return hot.form
            flight, mine = self._promoting.join_or_start(key)
            epoch = self._epochs.get(task, 0)
        if not mine:
            return flight.wait()
        return self._build(task, entry, key, flight, False, epoch)

    def _build(self, task: str, entry: LoadedTask, key: tuple, flight: Flight, keep: bool, epoch: int,
               recheck: bool = False, background: bool = False) -> Any:
        """Build ``task``'s form for ``flight`` (kept when ``keep``, not dropped since ``epoch`` and, with
        ``recheck``, still admitted now: the LRU may have changed while it was built). A background build frees its
        slot before its form becomes visible; one that fails is logged (the task stays on its fallback) instead of
        raised."""
        released = False
        try:
            t0 = time.perf_counter()
            form, nbytes = self._promote(task, entry)
            seconds = time.perf_counter() - t0
            self._observe(task, seconds)
            log.debug("built task %s's %s form in %.1f ms (%d bytes; %s)", task, self.kind, seconds * 1e3, nbytes,
                      "kept" if keep else "this pass only")
            with self._lock:
                if background:
                    self._background.release()
                    released = True
                # not kept when the task was dropped (replaced, deleted) while its form was being built
                kept = (keep and self._epochs.get(task, 0) == epoch and (not recheck or self._admits(task, entry))
                        and self._insert(task, HotTask(entry.identity, form, nbytes)))
                if kept:
                    self._seen.pop(task, None)
            self._admitted("promoted" if kept else "pass_only")
        except BaseException as exc:
            self._failed_build(key, flight, exc, background and not released, keep)
            if background and isinstance(exc, Exception):
                log.exception("background promotion of task %s failed; it stays on its fallback form", task)
                return None
            raise
        self._promoting.land(key, flight, self._lock, value=form)
        release_freed_memory()
        return form

    def _failed_build(self, key: tuple, flight: Flight, exc: BaseException, release: bool, keep: bool) -> None:
        """A build failed: its waiters get ``exc``, a promotion (``keep``) is not tried again for ``window_s``
        (``_failed``), and a background slot it held is given back."""
        with self._lock:
            if keep:
                self._failed[key] = True
                self._seen.pop(key[0], None)
        if release:
            self._background.release()
        self._promoting.land(key, flight, self._lock, error=exc)

    def _count(self, task: str) -> None:
        """One more request for ``task`` in the frequency counts, halving every count each ``window_s`` (lock held)."""
        now = time.monotonic()
        if now - self._aged >= self.window_s or len(self._freq) > 100_000:
            self._aged = now
            self._freq = {t: c / 2 for t, c in self._freq.items() if c >= 1}
        self._freq[task] = self._freq.get(task, 0.0) + 1.0

    def _admits(self, task: str, entry: LoadedTask) -> bool:
        """Whether ``task`` may take its place: it fits beside what is hot, or it was asked for more often than every
        unpinned task the LRU would evict for it, and evicting those makes room (lock held)."""
        need = self.used_bytes - self.capacity_bytes + self.task_bytes(entry)
        if task in self.tasks:
            need -= self.tasks[task].nbytes
        freq = self._freq.get(task, 0.0)
        for name, hot in self.tasks.items():  # least recently used first
            if need <= 0:
                break
            if name in self.pinned or name == task:
                continue
            if self._freq.get(name, 0.0) >= freq:  # a tie does not displace: equally asked tasks would churn
                return False
            need -= hot.nbytes
        return need <= 0

    def _insert(self, task: str, hot: HotTask) -> bool:
        """Put ``hot`` in the LRU, evicting the least recently used unpinned tasks beyond the budget; False when
        it does not fit (caller holds the lock)."""
        self._pop(task)
        evicted = self._lru.put(task, hot, self.pinned)
        if evicted is None:
            log.warning("task %s needs %d %s bytes, more than the %s tier's budget %d leaves beside the pinned "
                        "tasks: materialised for this pass only", task, hot.nbytes, self.kind, self.kind,
                        self.capacity_bytes)
            return False
        self.evictions += len(evicted)
        if self.metrics is not None and evicted:
            self._metric("evictions").inc(len(evicted))
        self._gauges()
        return True

    def status(self) -> dict:
        """For ``/healthz``: ``{"tasks", "bytes", "capacity_bytes", "evictions", "pinned"}`` of the tier."""
        return {"tasks": len(self.tasks), "bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes,
                "evictions": self.evictions, "pinned": sorted(self.pinned)}

    def drop(self, task: str) -> None:
        """Forget ``task``'s materialised weights (no-op when it is not hot); a form of it being built now is used for
        its own pass and not kept."""
        with self._lock:
            self._epochs[task] = self._epochs.get(task, 0) + 1
            self._freq.pop(task, None)
            self._seen.pop(task, None)
            for key in [k for k in self._failed if k[0] == task]:
                self._failed.pop(key, None)
            self._pop(task)

    def _pop(self, task: str) -> None:
        if self._lru.pop(task) is not None:
            self._gauges()

    def _metric(self, name: str):
        return getattr(self.metrics, f"{self.kind}_{name}")

    def _gauges(self) -> None:
        if self.metrics is not None:
            self._metric("tasks").set(len(self.tasks))
            self._metric("bytes").set(self.used_bytes)

    def _admitted(self, decision: str) -> None:
        if self.metrics is not None:
            self.metrics.hot_admissions.labels(decision).inc()

    def _observe(self, task: str, seconds: float) -> None:
        """Record one build's duration."""
        if self.metrics is not None:
            self.metrics.hot_promotion_seconds.labels(self.metrics.task(task)).observe(seconds)

    def _promote(self, task: str, entry: LoadedTask) -> tuple[Any, int]:
        """``task``'s hot form built from ``entry`` and its bytes (outside the cache's lock)."""
        raise NotImplementedError

    def task_bytes(self, entry: LoadedTask) -> int:
        """Bytes ``entry`` would take when hot (without building it)."""
        raise NotImplementedError
