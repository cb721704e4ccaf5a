"""Tasks: a task's resident form, the byte-bounded LRU of resident tasks, and loading them.

A task is loaded once (a cache miss): its bundle is read and validated, each
packed mask is turned into that task's resident form for the tier that serves
it (:class:`TaskBuilder`), and its head becomes two small tensors. The forms:

* CPU: ``"none"`` (nothing pruned: the plain dense product), ``"complement"``
  (a CSR matrix of the pruned entries ``W ⊙ ¬μ``, for low sparsity),
  ``"dense"`` (the bool mask itself, for high sparsity) or ``"reference"``
  (the bool mask, for the slow exact kernel) — named by :data:`CPU_FORMS`
  from the kernel path the selector picks; in a low CPU precision,
  ``"packed"`` (the bundle's bits: the warm form, materialised by the hot
  tier, :mod:`service.hot_tier`);
* device tier: ``"device"`` (the bundle's packed bits, copied into a device
  slot when the task is used).

:class:`TaskTable` is what the engine asks for a task. A hit is checked
against the store's file identity (one ``stat``), so a task replaced or
deleted through another worker sharing the store is reloaded or dropped. A
miss is loaded *outside* the table's lock, once however many threads ask for
it at the same time (single flight): the others wait for that load, and
requests of other tasks are not held up by it. The load time is exported as
``supermask_task_load_duration_seconds``.

Thread safety: every method of :class:`TaskTable` may be called from any
thread; :class:`TaskCache` is not thread-safe (the table guards it).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from backbone import Backbone
from mask_store.errors import BackboneMismatch, TaskNotFound
from mask_store.coding import CODING_GAPS, CODING_PACKED
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, Bundle, BundleHeader, BundleInvalid, decode_mask_section, pruned_positions
from mask_store.store import MaskStore
from service.errors import TaskTooLarge
from service.flight import Flights
from service.lru import TaskCache, release_freed_memory  # noqa: F401 - TaskCache is also this module's API
from service.kernels.selector import KernelPath, select_path
from service.kernels.sparse_complement import csr_nbytes, pruned_csr_from_mask
from service.metrics import Metrics

log = logging.getLogger(__name__)

CPU_FORMS = {KernelPath.CPU_COMPLEMENT.value: "complement", KernelPath.CPU_DENSE.value: "dense",
             KernelPath.REFERENCE.value: "reference"}
"""CPU kernel path → the resident form it needs (the only place the two vocabularies meet)."""

_generations = itertools.count(1)


@dataclass
class LayerState:
    """A task's resident form of one masked matrix.

    ``path`` is "none" (nothing pruned: plain dense product), "complement"
    (``pruned`` is a CSR ``[out, in]`` of ``W ⊙ ¬μ``), "dense" (``mask`` is
    bool ``[out, in]``) or "reference" (``mask`` set; the slow reference kernel)
    on the CPU in fp32; "packed" on the CPU in bf16/int8 (the warm form: the bundle's coded section where it is
    entropy-coded (format v3, ``coded``), else its packed bits (``packed``); the hot tier materialises them, the
    sparse forms read their pruned positions); "device" on the device tier (``packed`` holds the bundle's bits,
    copied into a device slot when the task is used).
    """

    path: str
    pruned: torch.Tensor | None = None  # CSR [out, in] of W ⊙ ¬μ ("complement")
    mask: torch.Tensor | None = None  # bool [out, in] ("dense", "reference")
    packed: torch.Tensor | None = None  # uint8 [ceil(out * in / 8)], bundle bit order, pinned on CUDA ("device")
    sparsity: float = 0.0  # pruned fraction of this matrix, from the bundle header
    coded: bytes | None = None  # the bundle's "zstd-gaps" section ("packed" path, format v3)
    shape: tuple[int, int] = (0, 0)  # [out, in]
    zeros: int | None = None  # the header's pruned count (needed to decode ``coded``)

    @property
    def masked(self) -> bool:
        """Whether the matrix carries a mask (bits or a coded section)."""
        return self.packed is not None or self.coded is not None

    def bits(self) -> torch.Tensor | None:
        """uint8 ``[ceil(out * in / 8)]`` packed mask bits (bundle bit order): held, or decoded from ``coded``
        (2-4 ms for a whole MiniLM task, :mod:`mask_store.coding`); None when the matrix has no mask."""
        if self.packed is not None or self.coded is None:
            return self.packed
        return torch.frombuffer(bytearray(decode_mask_section(CODING_GAPS, self.coded, self.shape, self.zeros)),
                                dtype=torch.uint8)

    def pruned_positions(self) -> np.ndarray:
        """int64 ``[zeros]`` row-major positions of the pruned weights, ascending (from the coded gaps directly
        where the matrix is coded, :func:`mask_store.format.pruned_positions`)."""
        if self.coded is not None:
            return pruned_positions(CODING_GAPS, self.coded, self.shape, self.zeros)
        if self.packed is None:
            return np.zeros(0, dtype=np.int64)
        return pruned_positions(CODING_PACKED, self.packed.cpu().numpy().tobytes(), self.shape, None)

    def nbytes(self) -> int:
        n = csr_nbytes(self.pruned) + (len(self.coded) if self.coded is not None else 0)
        for t in (self.mask, self.packed):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


@dataclass
class LoadedTask:
    """A task resident in the cache: header, per-layer states, head ``[num_outputs, hidden]`` and ``[num_outputs]``.

    ``generation`` is unique per load; :attr:`identity` names the bundle's bytes: a device slot or hot
    weights built from one identity are never served with the header and head of another (a replaced
    bundle), and are kept across a reload of the same unchanged file.
    """

    header: BundleHeader
    layers: dict[str, LayerState]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    nbytes: int = 0
    load_seconds: float = 0.0
    bundle_bytes: int = 0
    version: Hashable | None = None  # the store's version token when loaded (:meth:`MaskStore.version`)
    generation: int = field(default_factory=lambda: next(_generations))

    @property
    def identity(self) -> tuple:
        """The store's file identity when loaded from a store, else this load's generation."""
        return ("file", self.version) if self.version is not None else ("load", self.generation)


def choose_path(sparsity: float, kernel_path: str) -> str:
    """Resident form of one matrix on the CPU: "none" when nothing is pruned (unless a path is
    forced), else the form (:data:`CPU_FORMS`) of the path :func:`service.kernels.selector.select_path` picks.

    Raises:
        ValueError: ``kernel_path`` cannot run on the CPU (see ``select_path``).
    """
    if sparsity == 0.0 and kernel_path in (KernelPath.AUTO, KernelPath.CPU_COMPLEMENT):
        return "none"
    return CPU_FORMS[select_path("cpu", sparsity, rows=0, override=kernel_path)]


class TaskBuilder:
    """Turns a validated bundle into its resident form for one tier.

    Args:
        backbone: the loaded backbone (fingerprint, config, masked matrices, hidden size).
        weights: masked module name → the shared weight ``[out, in]`` the CPU forms are built from.
        capacity_bytes: a task whose resident form exceeds this is refused (the whole task cache).
        kernel_path: the CPU path override ("auto": the selector's rule).
        device: None for the CPU tier; the device of the device tier (its packed bits are pinned on CUDA).
        packed: CPU tier in low precision: keep the packed bits (the warm form; the hot tier,
            :mod:`service.hot_tier`, materialises them).
    """

    def __init__(self, backbone: Backbone, weights: dict[str, torch.Tensor], capacity_bytes: int,
                 kernel_path: str = KernelPath.AUTO.value, device: torch.device | None = None, packed: bool = False):
        self.packed = packed
        self.backbone = backbone
        self.weights = weights
        self.capacity_bytes = capacity_bytes
        self.kernel_path = kernel_path
        self.device = device

    def build(self, bundle: Bundle) -> LoadedTask:
        """The resident form of ``bundle``.

        Raises:
            BackboneMismatch: the bundle was trained for another backbone.
            BundleInvalid: its matrices do not match this backbone's masked matrices, or its
                ``max_seq_length`` exceeds the backbone's position embeddings.
            TaskTooLarge: its resident form is larger than the whole task cache.
        """
        h = bundle.header
        bb = self.backbone
        if h.backbone_fingerprint != bb.fingerprint:
            raise BackboneMismatch(h.backbone_fingerprint, bb.fingerprint)
        max_positions = getattr(bb.model.config, "max_position_embeddings", None)
        if max_positions is not None and h.max_seq_length > max_positions:
            raise BundleInvalid(f"max_seq_length {h.max_seq_length} exceeds the backbone's "
                                f"{max_positions} position embeddings")
        expected = {f"{n}.weight": n for n in bb.masked}
        names = {m.name for m in h.masks}
        if not names <= set(expected):
            raise BundleInvalid(f"bundle masks matrices this backbone does not have: {sorted(names - set(expected))[:3]}")
        if bundle.head[HEAD_WEIGHT].shape[1] != bb.hidden_size:
            raise BundleInvalid(f"head expects hidden size {bundle.head[HEAD_WEIGHT].shape[1]}, "
                                f"backbone has {bb.hidden_size}")
        layers: dict[str, LayerState] = {}
        for m in h.masks:
            module = expected[m.name]
            weight = self.weights[module]
            if list(weight.shape) != m.shape:
                raise BundleInvalid(f"mask {m.name!r} has shape {m.shape}, backbone weight is {list(weight.shape)}")
            state = self._layer_state(bundle, m, weight)
            if state is not None:
                layers[module] = state
        head_w = torch.from_numpy(np.array(bundle.head[HEAD_WEIGHT]))
        head_b = torch.from_numpy(np.array(bundle.head[HEAD_BIAS]))
        nbytes = sum(s.nbytes() for s in layers.values()) + head_w.numel() * 4 + head_b.numel() * 4
        if nbytes > self.capacity_bytes:
            raise TaskTooLarge(h.task, nbytes, self.capacity_bytes)
        return LoadedTask(h, layers, head_w, head_b, nbytes=nbytes, bundle_bytes=bundle.size_bytes)

    def _layer_state(self, bundle: Bundle, m, weight: torch.Tensor) -> LayerState | None:
        name, sparsity = m.name, m.sparsity
        if self.device is not None or self.packed:  # device tier, or the warm form of the CPU hot tier
            if sparsity == 0.0:  # an all-ones mask needs no bits: the tier keeps the plain weight
                return None
            shape = (int(m.shape[0]), int(m.shape[1]))
            if self.device is None and bundle.stored_masks.get(name) is not None and m.coding == CODING_GAPS:
                # the warm form stays entropy-coded (~7x smaller than the bits at 3 % pruned); decoded when used
                return LayerState("packed", sparsity=sparsity, coded=bytes(bundle.stored_masks[name]), shape=shape,
                                  zeros=m.pruned)
            packed = torch.frombuffer(bytearray(bundle.masks[name]), dtype=torch.uint8)
            if self.device is not None and self.device.type == "cuda":
                packed = packed.pin_memory()  # asynchronous host-to-device copy at swap-in
            return LayerState("device" if self.device is not None else "packed", packed=packed, sparsity=sparsity,
                              shape=shape)
        path = choose_path(sparsity, self.kernel_path)
        if path == "none":
            return LayerState("none")
        mask = torch.from_numpy(bundle.mask_array(name))
        if path == "complement":
            return LayerState("complement", pruned=pruned_csr_from_mask(weight, mask, skip_zeros=True))
        return LayerState(path, mask=mask)


class TaskTable:
    """The resident tasks of one engine: cache lookups, freshness, single-flight loading, invalidation.

    Args:
        store: where bundles live.
        builder: builds resident forms.
        metrics: hits, misses, evictions, load time and residency gauges are recorded here.
        on_drop: called with a task's name after it is dropped (invalidated, or found deleted / replaced in
            the store), with no lock of the table held: the engine frees the task's hot weights and device slot.
        pinned: tasks never evicted to make room (they still leave when replaced or deleted).
    """

    def __init__(self, store: MaskStore, builder: TaskBuilder, metrics: Metrics,
                 on_drop: Callable[[str], None] | None = None, pinned: Collection[str] = ()):
        self.pinned = frozenset(pinned)  # never evicted (SUPERMASK_PINNED_TASKS)
        self.evictions = 0  # tasks evicted to stay within the budget, since start
        self.store = store
        self.builder = builder
        self.metrics = metrics
        self.on_drop = on_drop
        self.cache = TaskCache(builder.capacity_bytes)
        self._lock = threading.Lock()  # guards cache and _loading; never held during a load
        self._loading = Flights()  # task -> its load in progress

    def get(self, task: str, count: bool = True) -> LoadedTask:
        """The resident form of ``task``, loaded on a miss (once, however many threads ask at a time).

        ``count``: record this lookup in the hit / miss counters (a load is always counted as a miss).

        Metrics: a hit, or a request that waited for another's load, counts a hit; a successful load a
        miss. A failed load counts nothing, so that names which are not stored create no series.

        Raises:
            TaskNotFound, BundleInvalid, BackboneMismatch, TaskTooLarge: as the load raises them
            (every thread waiting for the same load gets the same error).
        """
        while True:
            with self._lock:
                entry = self.cache.get(task)
                if entry is None:
                    flight, started = self._loading.join_or_start(task)
                    if started:
                        break  # this thread loads it
            if entry is None:  # another thread is loading it
                loaded = flight.wait()  # raises what that load raised
                if count:
                    self.metrics.cache_hits.labels(self.metrics.task(task)).inc()
                return loaded
            try:
                fresh = self.store.version(task) == entry.version
            except TaskNotFound:
                self._drop_if(task, entry)  # deleted, possibly through another worker sharing the store
                raise
            if fresh:
                if count:
                    self.metrics.cache_hits.labels(self.metrics.task(task)).inc()
                return entry
            self._drop_if(task, entry)  # replaced in the store since it was loaded: load the new bundle
        try:
            entry = self._load(task)
            self.metrics.cache_misses.labels(self.metrics.task(task)).inc()  # after the load: no series for names not stored
            with self._lock:
                evicted = self.cache.put(task, entry, self.pinned)
                for name in evicted or ():
                    self.evictions += 1
                    self.metrics.cache_evictions.inc()
                    self.metrics.drop_task_bytes(name)
                if evicted is not None:  # None: pinned tasks hold the budget; served, not kept
                    self._update_gauges(task, entry)
        except BaseException as exc:
            self._loading.land(task, flight, self._lock, error=exc)  # waiters get the same error
            raise
        self._loading.land(task, flight, self._lock, value=entry)
        release_freed_memory()
        return entry

    def _load(self, task: str) -> LoadedTask:
        t0 = time.perf_counter()
        # the identity is read before the bytes: a replacement in between makes the next hit reload, never
        # the reverse (serving an old bundle under a new identity)
        version = self.store.version(task)
        entry = self.builder.build(self.store.get(task))
        entry.version = version
        entry.load_seconds = time.perf_counter() - t0
        self.metrics.load_seconds.labels(self.metrics.task(task)).observe(entry.load_seconds)
        log.info("loaded task %s in %.1f ms (%d resident bytes)", task, entry.load_seconds * 1e3, entry.nbytes)
        return entry

    def header(self, task: str) -> BundleHeader:
        """The resident header of ``task``, else the store's (no torch work).

        Raises:
            TaskNotFound: no such task. BundleInvalid: the stored header cannot be read.
        """
        entry = self.cache.tasks.get(task)  # one lookup: another thread may evict it meanwhile
        return entry.header if entry is not None else self.store.header(task)

    def drop(self, task: str) -> None:
        """Remove ``task`` from the cache (no-op when absent); then ``on_drop(task)``."""
        with self._lock:
            self._pop(task)
        if self.on_drop is not None:
            self.on_drop(task)

    def _drop_if(self, task: str, entry: LoadedTask) -> None:
        """Remove ``task`` only if its resident entry is still ``entry`` (not a newer load); then ``on_drop``."""
        with self._lock:
            if self.cache.tasks.get(task) is entry:
                self._pop(task)
        if self.on_drop is not None:
            self.on_drop(task)  # the deleted / replaced bundle's hot weights and device slot go too

    def _pop(self, task: str) -> None:
        if self.cache.pop(task) is not None:
            self.metrics.drop_task_bytes(task)
        self._update_gauges()

    def is_resident(self, task: str) -> bool:
        return task in self.cache.tasks

    def resident(self) -> list[str]:
        """Names of the resident tasks, least recently used first."""
        with self._lock:
            return list(self.cache.tasks)

    def _update_gauges(self, task: str | None = None, entry: LoadedTask | None = None) -> None:
        if task is not None and entry is not None:
            self.metrics.set_task_bytes(task, entry.nbytes)
        self.metrics.resident_tasks.set(len(self.cache.tasks))
        self.metrics.cache_bytes.set(self.cache.used_bytes)
