"""Engine: the task cache and the masked forward pass over the shared backbone.

How the CPU path works. At start-up every masked ``nn.Linear`` of the
backbone is replaced by a :class:`MaskedLinear` that *shares* the backbone's
de-quantized weight tensor (no copy). A task is loaded once (a cache miss):
its bundle is read and validated, each packed mask is unpacked and turned
into that task's resident form (for a low-sparsity mask, a CSR matrix of the
pruned entries ``W ⊙ ¬μ``; for a dense-path mask, the bool mask itself), and
its head becomes two small tensors. A request then sets the task's layer
states on the shared modules and runs one forward pass; each masked layer
computes ``x·Wᵀ − x·(W⊙¬μ)ᵀ`` (or ``x·(W⊙μ)ᵀ``) with the kernels in
:mod:`service.kernels.cpu`. Nothing is copied or re-quantized per request.
A cold task costs one bundle read + checksum + unpack + CSR build (measured
and exported as ``supermask_task_load_duration_seconds``).

Forward passes are serialised by a lock (the shared modules hold the active
task's state during a pass); torch uses its intra-op threads inside a pass.

Mixed-task batches (:meth:`Engine.logits_mixed`). Rows of several tasks are
sorted into per-task segments and run as ONE forward pass; the engine sets a
:class:`SegmentTable` (token-row offsets of each segment in the flattened
``[batch * seq, hidden]`` activations, and per segment the task's layer states
or device slot) on every :class:`MaskedLinear` for that pass. On the CPU each
masked layer applies each segment's mask with the CPU kernels, segment by
segment (correct, not fused).

How the CUDA path works (``device="cuda"``, or "auto" with CUDA present). The
backbone's model moves to the GPU in float16 and every masked layer keeps its
int8 weight and scales there. The host tier (:class:`TaskCache`) then holds a
task's *packed* mask bits (uint8, pinned) and head instead of CSR forms; the
device tier (:class:`service.device_cache.DeviceTaskCache`) holds
``device_slots`` tasks' mask words on the GPU. A forward pass acquires a slot
per task of the batch (swap-in on a miss) and each masked layer runs the path
:func:`service.kernels.selector.select_path` picks for it (``triton_fused``:
:func:`service.kernels.triton_masked.segmented_masked_linear_triton`, one
launch for the whole batch; ``gpu_complement``:
:func:`service.kernels.sparse_complement.segmented_complement_linear`), unless
``kernel_path`` forces one. The CPU path stays the default without CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mask_store.errors import BackboneMismatch, TaskNotFound
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, Bundle, BundleHeader, BundleInvalid
from mask_store.local import LocalMaskStore
from backbone import Backbone, mean_pool, replace_module
from service.device_cache import DeviceTaskCache
from service.errors import InputInvalid, TaskTooLarge
from service.kernels import cpu as cpu_kernels
from service.kernels import sparse_complement, triton_masked
from service.kernels.reference import masked_linear_reference
from service.kernels.selector import AUTO, GPU_COMPLEMENT_MAX_SPARSITY, select_path
from service.metrics import Metrics

log = logging.getLogger(__name__)

#: length class of every row of up to 2**5 = 32 tokens (see ``Engine._length_classes``)
SHORT_ROW_CLASS = 5

@dataclass(frozen=True)
class PredictRequest:
    """One predict call: ``inputs`` holds ``(text_a, text_b)`` pairs, ``text_b`` None for single sentences."""

    task: str
    inputs: tuple[tuple[str, str | None], ...]


@dataclass
class LayerState:
    """A task's resident form of one masked matrix.

    ``path`` is "none" (nothing pruned: plain dense product), "complement"
    (``pruned`` is a CSR ``[out, in]`` of ``W ⊙ ¬μ``), "dense" (``mask`` is
    bool ``[out, in]``) or "reference" (``mask`` set; the slow reference kernel)
    on the CPU; "device" on the device tier (``packed`` holds the bundle's bits,
    copied into a device slot when the task is used).
    """

    path: str
    pruned: torch.Tensor | None = None  # CSR [out, in] of W ⊙ ¬μ ("complement")
    mask: torch.Tensor | None = None  # bool [out, in] ("dense", "reference")
    packed: torch.Tensor | None = None  # uint8 [ceil(out * in / 8)], bundle bit order, pinned on CUDA ("device")
    sparsity: float = 0.0  # pruned fraction of this matrix, from the bundle header

    def nbytes(self) -> int:
        n = cpu_kernels.csr_bytes(self.pruned)
        for t in (self.mask, self.packed):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


@dataclass
class LoadedTask:
    """A task resident in the cache: header, per-layer states, head ``[num_outputs, hidden]`` and ``[num_outputs]``."""

    header: BundleHeader
    layers: dict[str, LayerState]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    nbytes: int = 0
    load_seconds: float = 0.0
    bundle_bytes: int = 0
    version: tuple | None = None  # the store's file identity when loaded (:meth:`LocalMaskStore.version`)


@dataclass
class SegmentTable:
    """Row segments of one mixed-task forward pass, one segment per task, in batch order.

    Set by the engine on every :class:`MaskedLinear` for the duration of one
    pass. A sequence padded to the batch's length ``T`` occupies ``T``
    consecutive rows of the flattened ``[batch * T, in]`` activations, so
    segment ``s`` covers token rows ``row_starts[s] : row_starts[s + 1]``.
    CPU path: ``states`` set. Device tier: ``slots``, ``seg_starts``,
    ``seg_slots`` and ``paths`` set.
    """

    row_starts: list[int]  # [num_segments + 1] token-row offsets (host), row_starts[-1] = batch * T
    states: list[dict[str, LayerState]] | None = None  # [num_segments] the segment task's layer states (CPU)
    slots: list[int] | None = None  # [num_segments] device-cache slot of each segment's task (host copy)
    seg_starts: torch.Tensor | None = None  # int32 [num_segments + 1] on the device, = row_starts
    seg_slots: torch.Tensor | None = None  # int32 [num_segments] on the device, = slots
    paths: dict[str, str] = field(default_factory=dict)  # module name -> kernel path for this pass


class MaskedLinear(nn.Module):
    """Drop-in for a backbone ``nn.Linear`` that applies the active task's mask.

    Holds references to the backbone's weight ``[out, in]`` (``deq(W_q)``:
    float32 on the CPU, float16 on CUDA), bias, int8 weight ``[out, in]`` and
    scales ``[out]`` (on the model's device). For one forward pass the engine
    sets either ``state`` (one task, CPU) or ``segments`` (a mixed-task batch).
    On the device tier ``device_words`` / ``device_pruned`` are the device
    cache's slot tensors for this matrix (set once; the cache refills them).
    """

    def __init__(self, linear: nn.Linear, w_q: torch.Tensor, scale: torch.Tensor, name: str = ""):
        super().__init__()
        self.name = name
        self.weight = linear.weight  # shared, not copied
        self.bias = linear.bias
        self.w_q = w_q  # int8 [out, in]
        self.scale = scale  # float32 [out]
        self.state: LayerState | None = None
        self.segments: SegmentTable | None = None
        self.device_words: torch.Tensor | None = None  # int32 [slots, out, ceil(in / 32)]
        self.device_pruned: list[torch.Tensor | None] | None = None  # [slots] CSR [out, in] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = self.segments
        if seg is None:
            return self._apply_state(self.state, x)
        x2 = x.reshape(-1, x.shape[-1])  # [batch * T, in]
        if seg.states is not None:  # CPU
            r = seg.row_starts
            states = [st.get(self.name) for st in seg.states]
            if all(st is None or st.path in ("none", "complement") for st in states):
                # x·(W⊙μ)ᵀ = x·Wᵀ − x·(W⊙¬μ)ᵀ: one dense product for the whole mixed batch,
                # then each task's sparse correction on its own rows
                y = nn.functional.linear(x2, self.weight, self.bias)
                for i, st in enumerate(states):
                    if st is not None and st.path == "complement" and st.pruned is not None:
                        y[r[i]:r[i + 1]] -= cpu_kernels.pruned_product(x2[r[i]:r[i + 1]], st.pruned)
            else:  # one segment at a time with that task's state
                y = torch.cat([self._apply_state(st, x2[r[i]:r[i + 1]]) for i, st in enumerate(states)])
        else:
            y = self._apply_device(seg, x2)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _apply_state(self, st: LayerState | None, x: torch.Tensor) -> torch.Tensor:
        if st is None or st.path == "none":
            return nn.functional.linear(x, self.weight, self.bias)
        if st.path == "complement":
            return cpu_kernels.masked_linear_complement(x, self.weight, self.bias, st.pruned)
        if st.path == "dense":
            return cpu_kernels.masked_linear_dense(x, self.weight, self.bias, st.mask)
        return masked_linear_reference(x, self.w_q, self.scale, st.mask, self.bias)

    def _apply_device(self, seg: SegmentTable, x2: torch.Tensor) -> torch.Tensor:
        """Device tier: ``x2`` ``[rows, in]`` sorted by segment -> ``[rows, out]`` in ``x2.dtype``."""
        path = seg.paths[self.name]
        if path == "triton_fused":
            return triton_masked.segmented_masked_linear_triton(
                x2.contiguous(), self.w_q, self.scale, self.device_words, seg.seg_starts, seg.seg_slots, self.bias)
        if path == "gpu_complement":
            return sparse_complement.segmented_complement_linear(
                x2, self.weight, self.bias, self.device_pruned, seg.row_starts, seg.slots)
        # "reference": materialise each segment's mask from its slot (slow, exact)
        out, in_ = self.w_q.shape
        r = seg.row_starts
        return torch.cat([masked_linear_reference(
            x2[r[i]:r[i + 1]], self.w_q, self.scale,
            triton_masked.relayout_mask_inverse(self.device_words[slot], out, in_), self.bias)
            for i, slot in enumerate(seg.slots)])


@dataclass
class TaskCache:
    """LRU of loaded tasks bounded in bytes."""

    capacity_bytes: int
    tasks: "OrderedDict[str, LoadedTask]" = field(default_factory=OrderedDict)
    used_bytes: int = 0

    def get(self, task: str) -> LoadedTask | None:
        entry = self.tasks.get(task)
        if entry is not None:
            self.tasks.move_to_end(task)
        return entry

    def put(self, task: str, entry: LoadedTask) -> list[str]:
        """Insert ``entry``; return the names evicted to make room (least recently used first)."""
        self.pop(task)
        evicted = []
        while self.tasks and self.used_bytes + entry.nbytes > self.capacity_bytes:
            name, old = self.tasks.popitem(last=False)
            self.used_bytes -= old.nbytes
            evicted.append(name)
        self.tasks[task] = entry
        self.used_bytes += entry.nbytes
        return evicted

    def pop(self, task: str) -> LoadedTask | None:
        entry = self.tasks.pop(task, None)
        if entry is not None:
            self.used_bytes -= entry.nbytes
        return entry


def choose_path(sparsity: float, kernel_path: str) -> str:
    """Resident form of one matrix on the CPU: "none" when nothing is pruned (unless a path is
    forced), else the path :func:`service.kernels.selector.select_path` picks, without its ``cpu_`` prefix.

    Raises:
        ValueError: ``kernel_path`` cannot run on the CPU (see ``select_path``).
    """
    if sparsity == 0.0 and kernel_path in ("auto", "cpu_complement"):
        return "none"
    return select_path("cpu", sparsity, rows=0, override=kernel_path).removeprefix("cpu_")


CPU_ONLY_PATHS = ("cpu_complement", "cpu_dense")
"""Kernel paths that force the CPU engine (with ``device="auto"``: the off-switch for the CUDA paths)."""

DEVICE_TIER_PATHS = ("triton_fused", "gpu_complement", "reference")
"""Paths the device tier can run (``reference``: exact, slow, any device)."""


def resolve_device(device: str, kernel_path: str = "auto") -> torch.device:
    """The device the engine runs on.

    ``"auto"``: CUDA when ``torch.cuda.is_available()`` and ``kernel_path`` is not a CPU path
    (:data:`CPU_ONLY_PATHS`), else the CPU. ``"cuda"`` / ``"cuda:N"`` and ``"cpu"``: as named.

    Raises:
        ValueError: CUDA requested but absent, a CPU path forced on CUDA, or an unknown device.
    """
    if device == "auto":
        if torch.cuda.is_available() and kernel_path not in CPU_ONLY_PATHS:
            return torch.device("cuda")
        return torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (torch.cuda.is_available() "
                             "is False); use device 'cpu' or 'auto'")
        if kernel_path in CPU_ONLY_PATHS:
            raise ValueError(f"kernel path {kernel_path!r} runs on the CPU, device is {device!r}; allowed on CUDA: "
                             f"auto, {', '.join(DEVICE_TIER_PATHS)} (or device 'cpu')")
        return torch.device(device)
    raise ValueError(f"unknown device {device!r}; allowed: auto, cpu, cuda")


class Engine:
    """Serves predictions for any stored task over one shared backbone.

    Args:
        backbone: the loaded, quantized backbone (its modules are wrapped in place; on CUDA
            its model is moved to the GPU in float16).
        store: where bundles live.
        metrics: collectors to record into.
        cache_bytes: byte budget of the host task cache.
        max_batch_size: rows per forward pass.
        kernel_path: "auto" or a forced path (see :class:`service.settings.Settings`).
        device: "auto", "cpu" or "cuda" (see :func:`resolve_device`).
        device_slots: GPU mask slots of the device tier (CUDA only); ``cache_bytes`` must hold
            at least this many tasks.
        emulate_device_path: TEST-ONLY hook. With ``device="cpu"``, serve through the device
            tier (host tier of packed masks, :class:`DeviceTaskCache` on the CPU, segmented
            kernels) with this path forced: "triton_fused" (needs ``TRITON_INTERPRET=1`` set
            before triton is imported; tests/conftest.py does so without CUDA), "gpu_complement"
            (torch CPU sparse ops) or "reference". Lets the CUDA serving logic be tested on a
            machine without a GPU; never set by the server.

    Raises:
        ValueError: a kernel path or device that cannot run here, or (device tier) a host cache
            too small for ``device_slots`` tasks.
    """

    def __init__(self, backbone: Backbone, store: LocalMaskStore, metrics: Metrics, cache_bytes: int,
                 max_batch_size: int = 32, kernel_path: str = "auto", device: str = "auto",
                 device_slots: int = 16, *, emulate_device_path: str | None = None):
        self.backbone = backbone
        self.store = store
        self.metrics = metrics
        self.cache = TaskCache(cache_bytes)
        self.max_batch_size = max_batch_size
        self.device = resolve_device(device, kernel_path)
        if emulate_device_path is not None:
            if self.device.type != "cpu":
                raise ValueError(f"emulate_device_path is a test hook for device 'cpu', device is {self.device}")
            if emulate_device_path not in DEVICE_TIER_PATHS:
                raise ValueError(f"emulate_device_path must be one of {DEVICE_TIER_PATHS}, got {emulate_device_path!r}")
        #: the device tier (packed host tier + GPU slots + segmented kernels) serves every pass
        self.device_tier = self.device.type == "cuda" or emulate_device_path is not None
        #: override given to select_path("cuda", ...) on the device tier (None / "auto": automatic)
        self._device_override = emulate_device_path or kernel_path
        if self.device_tier:
            select_path("cuda", 0.5, 0, self._device_override)  # rejects triton_fused without triton
            self._check_host_capacity(backbone, cache_bytes, device_slots)
        else:
            choose_path(0.5, kernel_path)  # reject a path that cannot run here before any task is loaded
        self.kernel_path = kernel_path
        self._lock = threading.Lock()  # guards the caches and the shared modules during a pass
        self.layers: dict[str, MaskedLinear] = {}
        for name in backbone.masked:
            lin = backbone.model.get_submodule(name)
            if isinstance(lin, MaskedLinear):
                raise ValueError("backbone modules are already wrapped by another engine")
            ml = MaskedLinear(lin, backbone.qweight[name], backbone.scale[name], name=name)
            replace_module(backbone.model, name, ml)
            self.layers[name] = ml
        self.device_cache: DeviceTaskCache | None = None
        if self.device_tier:
            self._init_device_tier(device_slots)
        metrics.backbone_bytes.set(backbone.parameter_bytes())
        metrics.cache_capacity_bytes.set(cache_bytes)
        metrics.resident_tasks.set(0)
        metrics.cache_bytes.set(0)

    @staticmethod
    def _check_host_capacity(backbone: Backbone, cache_bytes: int, device_slots: int) -> None:
        """The host tier must hold every task that holds a device slot (as vLLM's max_cpu_loras >= max_loras).

        One task's host bytes are at least its packed masks (1 bit per masked weight) plus the
        smallest head (2 labels, float32); larger heads only make the requirement stricter.
        """
        if device_slots <= 0:
            raise ValueError(f"device_slots must be > 0, got {device_slots}")
        mask_bytes = sum((q.numel() + 7) // 8 for q in backbone.qweight.values())
        head_bytes = (2 * backbone.hidden_size + 2) * 4
        need = device_slots * (mask_bytes + head_bytes)
        if cache_bytes < need:
            raise ValueError(f"cache_bytes must be >= device_slots x bytes of one task (packed masks + head): "
                             f"cache_bytes is {cache_bytes}, device_slots {device_slots} x {mask_bytes + head_bytes} "
                             f"= {need}; raise SUPERMASK_CACHE_BYTES or lower SUPERMASK_DEVICE_SLOTS")

    def _init_device_tier(self, device_slots: int) -> None:
        shapes = {n: tuple(ml.w_q.shape) for n, ml in self.layers.items()}
        if self.device.type == "cuda":
            self.backbone.model.to(device=self.device, dtype=torch.float16)  # shared weights now fp16 on the GPU
            for n, ml in self.layers.items():
                ml.w_q = self.backbone.qweight[n].to(self.device)
                ml.scale = self.backbone.scale[n].to(self.device)
        automatic = self._device_override in (*AUTO, None)
        need_csr = automatic or self._device_override == "gpu_complement"
        if need_csr:
            dtype = next(iter(self.layers.values())).weight.dtype
            reason = sparse_complement.complement_unsupported(self.device, dtype)
            if reason is not None:
                if not automatic or not triton_masked.HAS_TRITON:
                    why = ("without triton it is the only GPU path" if automatic
                           else "SUPERMASK_KERNEL_PATH asks for it"
                           + ("; 'auto' would use triton_fused" if triton_masked.HAS_TRITON else ""))
                    raise ValueError(f"kernel path 'gpu_complement' cannot run on {self.device} in {dtype} here "
                                     f"({reason}), and {why}")
                log.warning("sparse products in %s fail on %s (%s): serving every batch with triton_fused",
                            dtype, self.device, reason)
                need_csr = False
        self.device_cache = DeviceTaskCache(
            shapes, device_slots, self.device, self.metrics,
            weights={n: ml.weight for n, ml in self.layers.items()} if need_csr else None,
            # the automatic rule (with triton) takes the complement path only for lightly pruned matrices
            csr_max_sparsity=GPU_COMPLEMENT_MAX_SPARSITY if automatic and triton_masked.HAS_TRITON else None)
        for n, ml in self.layers.items():
            ml.device_words = self.device_cache.words[n]
            ml.device_pruned = self.device_cache.pruned[n]
        log.info("device tier on %s: %d mask slots, %d bytes of mask words", self.device, device_slots,
                 self.device_cache.nbytes())

    # ---- task cache -------------------------------------------------------------------------
    def build_task(self, bundle: Bundle) -> LoadedTask:
        """Turn a validated bundle into its resident form.

        Raises:
            BackboneMismatch: the bundle was trained for another backbone.
            BundleInvalid: its matrices do not match this backbone's masked matrices, or its
                ``max_seq_length`` exceeds the backbone's position embeddings.
            TaskTooLarge: its resident form is larger than the whole task cache.
        """
        h = bundle.header
        if h.backbone_fingerprint != self.backbone.fingerprint:
            raise BackboneMismatch(h.backbone_fingerprint, self.backbone.fingerprint)
        max_positions = getattr(self.backbone.model.config, "max_position_embeddings", None)
        if max_positions is not None and h.max_seq_length > max_positions:
            raise BundleInvalid(f"max_seq_length {h.max_seq_length} exceeds the backbone's "
                                f"{max_positions} position embeddings")
        expected = {f"{n}.weight": n for n in self.backbone.masked}
        names = {m.name for m in h.masks}
        if not names <= set(expected):
            raise BundleInvalid(f"bundle masks matrices this backbone does not have: {sorted(names - set(expected))[:3]}")
        if bundle.head[HEAD_WEIGHT].shape[1] != self.backbone.hidden_size:
            raise BundleInvalid(f"head expects hidden size {bundle.head[HEAD_WEIGHT].shape[1]}, "
                                f"backbone has {self.backbone.hidden_size}")
        layers: dict[str, LayerState] = {}
        for m in h.masks:
            module = expected[m.name]
            layer = self.layers[module]
            if list(layer.weight.shape) != m.shape:
                raise BundleInvalid(f"mask {m.name!r} has shape {m.shape}, backbone weight is {list(layer.weight.shape)}")
            if self.device_tier:
                if m.sparsity > 0.0:  # an all-ones mask needs no bits: the device cache keeps every weight
                    packed = torch.frombuffer(bytearray(bundle.masks[m.name]), dtype=torch.uint8)
                    if self.device.type == "cuda":
                        packed = packed.pin_memory()  # asynchronous host-to-device copy at swap-in
                    layers[module] = LayerState("device", packed=packed, sparsity=m.sparsity)
                continue
            path = choose_path(m.sparsity, self.kernel_path)
            if path == "none":
                layers[module] = LayerState("none")
                continue
            mask = torch.from_numpy(bundle.mask_array(m.name))
            if path == "complement":
                layers[module] = LayerState("complement", pruned=cpu_kernels.pruned_complement(layer.weight, mask))
            else:
                layers[module] = LayerState(path, mask=mask)
        head_w = torch.from_numpy(np.array(bundle.head[HEAD_WEIGHT]))
        head_b = torch.from_numpy(np.array(bundle.head[HEAD_BIAS]))
        nbytes = sum(s.nbytes() for s in layers.values()) + head_w.numel() * 4 + head_b.numel() * 4
        if nbytes > self.cache.capacity_bytes:
            raise TaskTooLarge(h.task, nbytes, self.cache.capacity_bytes)
        return LoadedTask(h, layers, head_w, head_b, nbytes=nbytes, bundle_bytes=bundle.size_bytes)

    def _load(self, task: str) -> LoadedTask:
        t0 = time.perf_counter()
        # the identity is read before the bytes: a replacement in between makes the next hit reload, never
        # the reverse (serving an old bundle under a new identity)
        version = self.store.version(task)
        entry = self.build_task(self.store.get(task))
        entry.version = version
        entry.load_seconds = time.perf_counter() - t0
        self.metrics.load_seconds.labels(task).observe(entry.load_seconds)
        log.info("loaded task %s in %.1f ms (%d resident bytes)", task, entry.load_seconds * 1e3, entry.nbytes)
        return entry

    def _get(self, task: str) -> LoadedTask:
        entry = self.cache.get(task)
        if entry is not None:
            try:
                fresh = self.store.version(task) == entry.version
            except TaskNotFound:
                self._drop(task)  # deleted, possibly through another worker sharing the store
                raise
            if fresh:
                self.metrics.cache_hits.labels(task).inc()
                return entry
            self._drop(task)  # replaced in the store since it was loaded: load the new bundle
        self.metrics.cache_misses.labels(task).inc()
        if self.device_cache is not None:
            # a GPU slot can outlive its host entry (host eviction keeps it), and the bundle may have been
            # replaced since: never pair the loaded header and head with masks swapped in from older bytes
            self.device_cache.invalidate(task)
        entry = self._load(task)
        for name in self.cache.put(task, entry):
            self.metrics.cache_evictions.inc()
            self.metrics.resident_task_bytes.remove(name)
        self._update_gauges(task, entry)
        return entry

    def _update_gauges(self, task: str | None = None, entry: LoadedTask | None = None) -> None:
        if task is not None and entry is not None:
            self.metrics.resident_task_bytes.labels(task).set(entry.nbytes)
        self.metrics.resident_tasks.set(len(self.cache.tasks))
        self.metrics.cache_bytes.set(self.cache.used_bytes)

    def warm(self, task: str) -> LoadedTask:
        """Load ``task`` into the cache now (raises as :meth:`predict`)."""
        with self._lock:
            return self._get(task)

    def invalidate(self, task: str) -> None:
        """Drop ``task`` from the cache now (after an upload replaced it or a delete).

        Optional for correctness: a cache hit also compares the store's file identity
        (:meth:`LocalMaskStore.version`) and reloads a replaced task, so workers that share the
        store but did not handle the upload serve the new bundle too. Calling it frees the memory at once.
        """
        with self._lock:
            self._drop(task)

    def _drop(self, task: str) -> None:
        """Remove ``task`` from the host cache and its device slot (caller holds the lock)."""
        if self.cache.pop(task) is not None:
            try:
                self.metrics.resident_task_bytes.remove(task)
            except KeyError:
                pass
        if self.device_cache is not None:
            self.device_cache.invalidate(task)
        self._update_gauges()

    def is_resident(self, task: str) -> bool:
        return task in self.cache.tasks

    # ---- inference --------------------------------------------------------------------------
    def _forward(self, entry: LoadedTask, rows: list[tuple[str, str | None]]) -> torch.Tensor:
        tok = self.backbone.tokenizer
        a = [r[0] for r in rows]
        b = [r[1] for r in rows] if entry.header.text_pairs else None
        enc = tok(a, b, truncation=True, max_length=entry.header.max_seq_length, padding=True, return_tensors="pt")
        for name, layer in self.layers.items():
            layer.state = entry.layers.get(name)
        try:
            kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if "token_type_ids" in enc:
                kwargs["token_type_ids"] = enc["token_type_ids"]
            hidden = self.backbone.model(**kwargs).last_hidden_state
        finally:
            for layer in self.layers.values():
                layer.state = None
        pooled = mean_pool(hidden, enc["attention_mask"])
        return nn.functional.linear(pooled, entry.head_weight, entry.head_bias)

    def _encode(self, groups: Sequence[tuple[BundleHeader, list[tuple[str, str | None]]]]
                ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Tokenize the rows of several tasks into one padded batch.

        Each task's rows are truncated to its own ``max_seq_length`` (single texts or pairs as the
        task takes them), then all rows are padded to the longest.

        Returns:
            ``(inputs, seq_starts)``: model inputs (``input_ids``, ``attention_mask`` and, when the
            tokenizer makes them, ``token_type_ids``; int64 ``[batch, T]`` on the CPU) and the
            sequence offsets of each group, ``[len(groups) + 1]``.
        """
        tok = self.backbone.tokenizer
        ids: list[list[int]] = []
        types: list[list[int]] | None = []
        seq_starts = [0]
        for header, rows in groups:
            a = [r[0] for r in rows]
            b = [r[1] for r in rows] if header.text_pairs else None
            enc = tok(a, b, truncation=True, max_length=header.max_seq_length)
            ids += enc["input_ids"]
            if types is not None and "token_type_ids" in enc:
                types += enc["token_type_ids"]
            else:
                types = None
            seq_starts.append(len(ids))
        seq_len = max(len(x) for x in ids)
        left = getattr(tok, "padding_side", "right") == "left"
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

        def padded(seqs: list[list[int]], value: int) -> torch.Tensor:
            fill = [[value] * (seq_len - len(x)) for x in seqs]
            return torch.tensor([f + x if left else x + f for x, f in zip(seqs, fill)], dtype=torch.long)

        inputs = {"input_ids": padded(ids, pad_id), "attention_mask": padded([[1] * len(x) for x in ids], 0)}
        if types is not None:
            inputs["token_type_ids"] = padded(types, 0)
        return inputs, seq_starts

    def _forward_segments(self, segs: Sequence[tuple[str, LoadedTask, list[tuple[str, str | None]]]]
                          ) -> list[torch.Tensor]:
        """One forward pass over the rows of several tasks (one segment per task, distinct tasks).

        Returns:
            float32 ``[len(rows), num_outputs]`` on the CPU per segment.
        """
        inputs, seq_starts = self._encode([(e.header, rows) for _, e, rows in segs])
        batch, seq_len = inputs["input_ids"].shape
        row_starts = [s * seq_len for s in seq_starts]
        if self.device_cache is not None:
            in_use = {t for t, _, _ in segs}
            slots = [self.device_cache.acquire(
                t, {n: st.packed for n, st in e.layers.items() if st.packed is not None}, in_use,
                sparsity={n: st.sparsity for n, st in e.layers.items()})
                for t, e, _ in segs]
            paths = {}
            for name in self.layers:
                sparsity = max((e.layers[name].sparsity if name in e.layers else 0.0) for _, e, _ in segs)
                path = select_path("cuda", sparsity, batch * seq_len, self._device_override)
                if path == "gpu_complement" and not self.device_cache.has_pruned(name, slots):
                    # a slot without this matrix's CSR (not built: sparsity above the automatic threshold,
                    # or sparse products unavailable): the fused kernel needs only the mask words
                    if not triton_masked.HAS_TRITON:
                        raise RuntimeError(f"no CSR of pruned entries for {name} in slots {slots} and no triton")
                    path = "triton_fused"
                paths[name] = path
            table = SegmentTable(
                row_starts, slots=slots, paths=paths,
                seg_starts=torch.tensor(row_starts, dtype=torch.int32).to(self.device, non_blocking=True),
                seg_slots=torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True))
        else:
            table = SegmentTable(row_starts, states=[e.layers for _, e, _ in segs])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        for layer in self.layers.values():
            layer.segments = table
        try:
            hidden = self.backbone.model(**inputs).last_hidden_state  # [batch, T, hidden]
        finally:
            for layer in self.layers.values():
                layer.segments = None
        pooled = mean_pool(hidden.float(), inputs["attention_mask"]).cpu()  # [batch, hidden] float32
        return [nn.functional.linear(pooled[seq_starts[i]:seq_starts[i + 1]], e.head_weight, e.head_bias)
                for i, (_, e, _) in enumerate(segs)]

    def logits_mixed(self, items: Sequence[tuple[str, Sequence[tuple[str, str | None]]]]) -> list[torch.Tensor]:
        """Head outputs for the rows of several tasks, with as few forward passes as possible.

        Rows are sorted into per-task segments (a task named by several items forms one
        segment) and cut into batches of at most ``max_batch_size`` rows (and, on the device
        tier, at most ``device_slots`` tasks); each batch is ONE forward pass in which every
        masked layer applies each segment's mask.

        Args:
            items: ``(task, rows)`` pairs; ``rows`` as in :meth:`logits`.

        Returns:
            One float32 ``[len(rows), num_outputs]`` tensor per item, in the order of ``items``.

        Raises:
            TaskNotFound, BundleInvalid, BackboneMismatch, TaskTooLarge. InputInvalid: an item's
            rows are pairs for a single-sentence task or the reverse.
        """
        return self._mixed(items)[0]

    def predict_mixed(self, items: Sequence[tuple[str, Sequence[tuple[str, str | None]]]]) -> list[list[dict]]:
        """:meth:`logits_mixed` decoded into predictions (as :meth:`predict`), one list per item.

        Each item is decoded with the header of the bundle its forward pass used, so a task
        replaced while the request waited is answered wholly by the old or wholly by the new bundle.
        Raises as :meth:`logits_mixed`.
        """
        outs, headers = self._mixed(items)
        return [decode(h, out) for h, out in zip(headers, outs)]

    @torch.inference_mode()
    def _mixed(self, items: Sequence[tuple[str, Sequence[tuple[str, str | None]]]]
               ) -> tuple[list[torch.Tensor], list[BundleHeader]]:
        """:meth:`logits_mixed` and the header used for each item."""
        with self._lock:
            entries: dict[str, LoadedTask] = {}
            by_task: OrderedDict[str, list[tuple[int, int]]] = OrderedDict()  # task -> [(item, row)]
            for i, (task, rows) in enumerate(items):
                if task not in entries:
                    entries[task] = self._get(task)
                check_rows(entries[task].header, rows)
                by_task.setdefault(task, []).extend((i, j) for j in range(len(rows)))
            results = [torch.empty(len(rows), entries[task].header.num_outputs) for task, rows in items]
            max_tasks = self.device_cache.slots if self.device_cache is not None else len(by_task)
            # Rows are grouped by length class first (rows of up to 32 tokens share a class; longer ones
            # share it with rows within a factor of 2), then by task: a batch is padded to its longest
            # row, so mixing a 10-token and a 128-token row would make the short one cost 128 tokens.
            klass = self._length_classes(items, entries)
            flat = sorted(((task, i, j) for task, refs in by_task.items() for i, j in refs),
                          key=lambda r: klass[r[1]][r[2]])  # stable: by task within a class
            batch: list[tuple[str, int, int]] = []
            for ref in flat:
                new_task = not batch or batch[-1][0] != ref[0]
                if batch and (len(batch) == self.max_batch_size
                              or klass[ref[1]][ref[2]] != klass[batch[-1][1]][batch[-1][2]]
                              or (new_task and len({t for t, _, _ in batch}) == max_tasks)):
                    self._run_batch(batch, items, entries, results)
                    batch = []
                batch.append(ref)
            if batch:
                self._run_batch(batch, items, entries, results)
        return results, [entries[task].header for task, _ in items]

    def _length_classes(self, items: Sequence[tuple[str, Sequence[tuple[str, str | None]]]],
                        entries: dict[str, LoadedTask]) -> list[list[int]]:
        """Per item, per row: ``ceil(log2(tokens))`` after the task's truncation, at least
        ``SHORT_ROW_CLASS`` (rows of up to 32 tokens share one class; longer rows share a class with
        rows within a factor of 2 of their length)."""
        tok = self.backbone.tokenizer
        out = []
        for task, rows in items:
            h = entries[task].header
            a = [r[0] for r in rows]
            b = [r[1] for r in rows] if h.text_pairs else None
            ids = tok(a, b, truncation=True, max_length=h.max_seq_length)["input_ids"]
            out.append([max(SHORT_ROW_CLASS, (len(x) - 1).bit_length()) for x in ids])
        return out

    def _run_batch(self, batch: list[tuple[str, int, int]],
                   items: Sequence[tuple[str, Sequence[tuple[str, str | None]]]], entries: dict[str, LoadedTask],
                   results: list[torch.Tensor]) -> None:
        """Forward ``batch`` (``(task, item, row)`` refs sorted by task) and scatter into ``results``."""
        segs: list[tuple[str, list[tuple[int, int]]]] = []
        for task, i, j in batch:
            if not segs or segs[-1][0] != task:
                segs.append((task, []))
            segs[-1][1].append((i, j))
        outs = self._forward_segments([(task, entries[task], [items[i][1][j] for i, j in refs])
                                       for task, refs in segs])
        for (_, refs), out in zip(segs, outs):
            for (i, j), row in zip(refs, out):
                results[i][j] = row

    def logits(self, task: str, rows: list[tuple[str, str | None]]) -> torch.Tensor:
        """Head outputs ``[len(rows), num_outputs]`` float32 for ``task``.

        Raises:
            TaskNotFound, BundleInvalid, BackboneMismatch, TaskTooLarge. InputInvalid: pairs for a
            single-sentence task or the reverse.
        """
        return self._logits(task, rows)[0]

    @torch.inference_mode()
    def _logits(self, task: str, rows: list[tuple[str, str | None]]) -> tuple[torch.Tensor, BundleHeader]:
        """:meth:`logits` and the header of the bundle it used."""
        if self.device_tier:
            outs, headers = self._mixed([(task, rows)])
            return outs[0], headers[0]
        with self._lock:
            entry = self._get(task)
            check_rows(entry.header, rows)
            outs = [self._forward(entry, rows[i : i + self.max_batch_size])
                    for i in range(0, len(rows), self.max_batch_size)]
        return torch.cat(outs), entry.header

    def check_inputs(self, req: PredictRequest) -> BundleHeader:
        """The header of ``req.task`` after checking that the inputs fit it (single texts or pairs).

        A cheap early check, before a request joins a batch: it reads the resident header, or the
        store's header (no torch work) when the task is not resident. The forward pass checks again
        against the bundle it actually uses.

        Raises:
            TaskNotFound: no such task. InputInvalid: pairs for a single-sentence task or the reverse.
            BundleInvalid: the stored header cannot be read.
        """
        entry = self.cache.tasks.get(req.task)  # one lookup: the batcher's thread may evict it meanwhile
        header = entry.header if entry is not None else self.store.header(req.task)
        check_rows(header, req.inputs)
        return header

    @contextlib.contextmanager
    def observed(self, req: PredictRequest) -> Iterator[None]:
        """Count and time the predict request ``req`` around the block it wraps.

        When the block completes: ``requests{task, "ok"}`` +1 and its latency (seconds, from entering
        the block) and row count observed; when it raises an ``Exception``: ``requests{task, "error"}``
        +1 (unknown task names share the label ``_unknown``, so that a scan of bad names cannot grow
        the label set) and the exception propagates unchanged.
        """
        t0 = time.perf_counter()
        try:
            yield
        except Exception:
            known = req.task in self.cache.tasks or self.store.exists(req.task)
            self.metrics.requests.labels(req.task if known else "_unknown", "error").inc()
            raise
        self.metrics.request_seconds.labels(req.task).observe(time.perf_counter() - t0)
        self.metrics.requests.labels(req.task, "ok").inc()
        self.metrics.rows.labels(req.task).observe(len(req.inputs))

    def predict(self, req: PredictRequest) -> list[dict]:
        """Predictions for a request, in input order, from forward passes of this request alone
        (:class:`service.batcher.MicroBatcher` batches concurrent requests instead).

        Classification: ``{"label", "score", "scores": {label: probability}}``;
        regression: ``{"value"}``.

        Raises:
            TaskNotFound: no such task. InputInvalid: inputs do not fit the task
            (pairs for a single-sentence task or the reverse). BundleInvalid,
            BackboneMismatch, TaskTooLarge: the stored bundle cannot be served.
        """
        with self.observed(req):
            out, header = self._logits(req.task, list(req.inputs))
            return decode(header, out)


def check_rows(header: BundleHeader, rows: Sequence[tuple[str, str | None]]) -> None:
    """Raise :class:`InputInvalid` unless ``rows`` are sentence pairs exactly when the task takes pairs."""
    pairs = [r[1] is not None for r in rows]
    if header.text_pairs and not all(pairs):
        raise InputInvalid(f"task {header.task!r} takes sentence pairs: send inputs as [[text_a, text_b], ...]")
    if not header.text_pairs and any(pairs):
        raise InputInvalid(f"task {header.task!r} takes single texts: send inputs as [text, ...]")


def decode(header: BundleHeader, out: torch.Tensor) -> list[dict]:
    """Head outputs ``[rows, num_outputs]`` float32 → one prediction dict per row: ``{"value"}`` for
    regression, else ``{"label", "score", "scores"}`` with softmax probabilities."""
    if header.problem_type == "regression":
        return [{"value": float(v)} for v in out.squeeze(-1).tolist()]
    probs = torch.softmax(out, dim=-1)
    result = []
    for row in probs.tolist():
        best = int(np.argmax(row))
        result.append({"label": header.labels[best], "score": row[best],
                       "scores": {lab: p for lab, p in zip(header.labels, row)}})
    return result
