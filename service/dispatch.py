"""Tier dispatchers: for each segmented forward pass, build the segment table; for each masked layer,
call the kernel of each segment's resident form. One class per tier (CPU fp32, CPU hot tier, device);
no arithmetic here.

CPU tier in bf16 / int8 (:class:`HotDispatcher`). Each segment's task is
taken from the hot tier (:mod:`service.hot_tier`, promoted from its packed
bits on a miss) and its rows multiply with that task's materialised weights.

CPU tier in fp32 (:class:`CpuDispatcher`, the reference). Each segment carries its task's layer
states (:class:`service.tasks.LayerState`). When every segment's form of a
matrix is "none" or "complement", the layer is ONE dense product for the
whole mixed batch minus each task's sparse correction on its own rows
(:func:`service.kernels.sparse_complement.segmented_complement_linear`);
otherwise each segment runs its own form's kernel.

Device tier (:class:`DeviceDispatcher`, ``device="cuda"`` or the test-only
emulation on the CPU). The backbone's model moves to the GPU in float16 and
every masked layer keeps its int8 weight and scales there. The host tier holds
a task's *packed* mask bits (uint8, pinned) and head; the device cache
(:class:`service.device_cache.DeviceTaskCache`) holds ``device_slots`` tasks'
mask words on the GPU. A pass acquires a slot per task of the batch (swap-in
on a miss) and each masked layer runs the path
:func:`service.kernels.selector.select_path` picks for it (``triton_fused``:
one launch for the whole batch; ``gpu_complement``: the shared dense product
and per-segment CSR corrections), unless ``kernel_path`` forces one.

None is thread-safe: the engine runs passes one at a time (its pass lock).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from backbone import Backbone
from service.hot_weights import HotTier
from service.kernels import cpu as cpu_kernels
from service.kernels import cpu_hot
from service.kernels import sparse_complement
from service.kernels.reference import masked_linear_reference
from service.kernels.selector import (AUTO, CPU_ONLY_PATHS, DEVICE_TIER_PATHS, GPU_COMPLEMENT_MAX_SPARSITY, KernelPath,
                                      select_path)
from service.metrics import Metrics
from service.sparse_forms import SparseForm, sparse_product
from service.tasks import LayerState, LoadedTask

log = logging.getLogger(__name__)



class MaskedLinear(Protocol):
    """What a dispatcher reads of a masked layer (:class:`service.masked_linear.MaskedLinear`, which sits above
    this module and calls it)."""

    name: str
    weight: torch.Tensor | None  # deq(W_q) [out, in] (float32 on the CPU, float16 on CUDA), or None
    bias: torch.Tensor | None
    w_q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]
    device_words: torch.Tensor | None
    device_pruned: list | None

Segments = Sequence[tuple[str, LoadedTask]]
"""``(task, resident entry)`` per segment of one pass, distinct tasks, in batch order."""


@dataclass
class SegmentTable:
    """Row segments of one mixed-task forward pass, one segment per task, in batch order.

    A sequence padded to the batch's length ``T`` occupies ``T`` consecutive rows of the
    flattened ``[batch * T, in]`` activations, so segment ``s`` covers token rows
    ``row_starts[s] : row_starts[s + 1]``. CPU tier: ``states`` set (fp32) or ``hot`` (bf16, int8).
    Device tier: ``slots``, ``seg_starts``, ``seg_slots`` and ``paths`` set.
    """

    row_starts: list[int]  # [num_segments + 1] token-row offsets (host), row_starts[-1] = batch * T
    states: list[dict[str, LayerState]] | None = None  # [num_segments] the segment task's layer states (CPU fp32)
    hot: list[dict] | None = None  # [num_segments] module name -> HotWeight of the segment's task (CPU bf16/int8)
    slots: list[int] | None = None  # [num_segments] device-cache slot of each segment's task (host copy)
    seg_starts: torch.Tensor | None = None  # int32 [num_segments + 1] on the device, = row_starts
    seg_slots: torch.Tensor | None = None  # int32 [num_segments] on the device, = slots
    paths: dict[str, str] = field(default_factory=dict)  # module name -> kernel path for this pass


class Dispatcher(Protocol):
    """One per tier: builds a pass's segment table and computes a masked layer's product for its rows."""

    max_tasks: int | None  # most tasks one pass may mix (None: any number)

    def prepare(self, segs: Segments, row_starts: list[int], forms: dict | None = None) -> SegmentTable:
        """The segment table of one pass."""
        ...

    def linear(self, layer: MaskedLinear, x: torch.Tensor, seg: SegmentTable) -> torch.Tensor:
        """``x`` ``[rows, in]`` sorted by segment → ``[rows, out]``, each segment with its task's mask."""
        ...


def resolve_device(device: str, kernel_path: str = "auto") -> torch.device:
    """The device the engine runs on.

    ``"auto"``: CUDA when ``torch.cuda.is_available()`` and ``kernel_path`` is not a CPU path
    (:data:`service.kernels.selector.CPU_ONLY_PATHS`), else the CPU. ``"cuda"`` / ``"cuda:N"`` and
    ``"cpu"``: as named.

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


class HotDispatcher:
    """CPU tier in bf16 / int8: each segment's task materialised in the hot tier, one dense product per segment.

    Args:
        hot: the hot tier (:class:`service.hot_weights.HotTier`): its plain forms serve the sparse forms' rows.
        promote: ``(task, entry) -> form`` for a segment whose form was not promoted before the pass (the tier's
            :meth:`~service.tiers.base.Tier.promote`; None: ``hot.get``).
    """

    max_tasks: int | None = None

    def __init__(self, hot: HotTier, promote=None):
        self.hot = hot
        self.promote = promote if promote is not None else hot.get

    def prepare(self, segs: Segments, row_starts: list[int], forms: dict | None = None) -> SegmentTable:
        """Each segment's hot weights or sparse form: from ``forms`` (promoted by the engine before the pass lock),
        else promoted here."""
        return SegmentTable(row_starts, hot=[forms[t] if forms and t in forms else self.promote(t, e)
                                             for t, e in segs])

    def linear(self, layer: MaskedLinear, x: torch.Tensor, seg: SegmentTable) -> torch.Tensor:
        return self.product(layer.name, x, seg)

    def product(self, group: str, x: torch.Tensor, seg: SegmentTable, low: bool = False) -> torch.Tensor:
        """Product group ``group`` (a module, or the lean encoder's fused Q|K|V) for the rows ``x``
        ``[rows, in]`` (float32, or bf16) of every segment, each with its task's hot weights, or its sparse form
        (:mod:`service.sparse_forms`: the rows of such segments share one plain product) → float32
        ``[rows, out]`` (bf16 with ``low`` in the bf16 precision, see :func:`service.kernels.cpu_hot.hot_linear`)."""
        r = seg.row_starts
        sparse = [isinstance(f, SparseForm) for f in seg.hot]
        if all(sparse):
            return sparse_product(x, self.hot.base[group], group, r, seg.hot, low)
        if len(seg.hot) == 1:
            return cpu_hot.hot_linear(x, seg.hot[0][group], low=low)
        return torch.cat([sparse_product(x[r[i]:r[i + 1]], self.hot.base[group], group, [0, r[i + 1] - r[i]], [f], low)
                          if sparse[i] else cpu_hot.hot_linear(x[r[i]:r[i + 1]], f[group], low=low)
                          for i, f in enumerate(seg.hot)])


class CpuDispatcher:
    """CPU tier in fp32: each segment's layer states, the CPU kernels."""

    max_tasks: int | None = None  # a pass may mix any number of tasks

    def prepare(self, segs: Segments, row_starts: list[int], forms: dict | None = None) -> SegmentTable:
        """The segment table of one pass (``row_starts`` as in :class:`SegmentTable`; ``forms`` unused)."""
        return SegmentTable(row_starts, states=[e.layers for _, e in segs])

    def linear(self, layer: MaskedLinear, x: torch.Tensor, seg: SegmentTable) -> torch.Tensor:
        r = seg.row_starts
        states = [st.get(layer.name) for st in seg.states]
        if all(st is None or st.path in ("none", "complement") for st in states):
            return sparse_complement.segmented_complement_linear(
                x, layer.weight, layer.bias, [None if st is None else st.pruned for st in states],
                r, range(len(states)))
        return torch.cat([self._one(layer, st, x[r[i]:r[i + 1]]) for i, st in enumerate(states)])

    @staticmethod
    def _one(layer: MaskedLinear, st: LayerState | None, x: torch.Tensor) -> torch.Tensor:
        if st is None or st.path in ("none", "complement"):
            return sparse_complement.complement_linear(x, layer.weight, layer.bias, None if st is None else st.pruned)
        if st.path == "dense":
            return cpu_kernels.masked_linear_dense(x, layer.weight, layer.bias, st.mask)
        return masked_linear_reference(x, layer.w_q, layer.scale, st.mask, layer.bias)


def check_host_capacity(backbone: Backbone, cache_bytes: int, device_slots: int) -> None:
    """The host tier must hold every task that holds a device slot (as vLLM's max_cpu_loras >= max_loras).

    One task's host bytes are at least its packed masks (1 bit per masked weight) plus the
    smallest head (2 labels, float32); larger heads only make the requirement stricter.

    Raises:
        ValueError: ``device_slots`` <= 0, or ``cache_bytes`` below ``device_slots`` such tasks.
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


class DeviceDispatcher:
    """Device tier: GPU mask slots, the segmented GPU kernels.

    Args:
        backbone: its model is moved to ``device`` in float16 on CUDA.
        layers: the engine's masked layers (their int8 weights move to the device; they get the slot tensors).
        device: the device of the tier.
        override: the kernel path override (None / "auto": automatic).
        device_slots: GPU mask slots.
        metrics: swap-ins and residency are recorded here.

    Raises:
        ValueError: a forced path that cannot run here (``gpu_complement`` whose sparse products fail).
    """

    def __init__(self, backbone: Backbone, layers: dict[str, MaskedLinear], device: torch.device,
                 override: str | None, device_slots: int, metrics: Metrics):
        # imported here: a CPU server never loads triton (its compiler library alone is ~65 MiB resident)
        from service.device_cache import DeviceTaskCache
        from service.kernels import triton_masked

        self.triton = triton_masked
        self.device = device
        self.override = override
        self.layers = layers
        self._slot_bundle: dict[str, tuple] = {}  # task -> identity of the bundle its slot was filled from
        shapes = {n: tuple(ml.w_q.shape) for n, ml in layers.items()}
        if device.type == "cuda":
            backbone.model.to(device=device, dtype=torch.float16)  # shared weights now fp16 on the GPU
            for n, ml in layers.items():
                ml.w_q = backbone.qweight[n].to(device)
                ml.scale = backbone.scale[n].to(device)
        automatic = override in (*AUTO, None)
        need_csr = automatic or override == KernelPath.GPU_COMPLEMENT
        if need_csr:
            dtype = next(iter(layers.values())).weight.dtype
            reason = sparse_complement.complement_unsupported(device, dtype)
            if reason is not None:
                if not automatic or not self.triton.HAS_TRITON:
                    why = ("without triton it is the only GPU path" if automatic
                           else "SUPERMASK_KERNEL_PATH asks for it"
                           + ("; 'auto' would use triton_fused" if self.triton.HAS_TRITON else ""))
                    raise ValueError(f"kernel path 'gpu_complement' cannot run on {device} in {dtype} here "
                                     f"({reason}), and {why}")
                log.warning("sparse products in %s fail on %s (%s): serving every batch with triton_fused",
                            dtype, device, reason)
                need_csr = False
        self.cache = DeviceTaskCache(
            shapes, device_slots, device, metrics,
            weights={n: ml.weight for n, ml in layers.items()} if need_csr else None,
            # the automatic rule (with triton) takes the complement path only for lightly pruned matrices
            csr_max_sparsity=GPU_COMPLEMENT_MAX_SPARSITY if automatic and self.triton.HAS_TRITON else None)
        for n, ml in layers.items():
            ml.device_words = self.cache.words[n]
            ml.device_pruned = self.cache.pruned[n]
        log.info("device tier on %s: %d mask slots, %d bytes of mask words", device, device_slots, self.cache.nbytes())

    @property
    def max_tasks(self) -> int:
        """Most tasks one pass may mix: one slot each."""
        return self.cache.slots

    def invalidate(self, task: str) -> None:
        """Free ``task``'s slot (after a replacement or a delete)."""
        self.cache.invalidate(task)
        self._slot_bundle.pop(task, None)

    def prepare(self, segs: Segments, row_starts: list[int], forms: dict | None = None) -> SegmentTable:
        """Acquire a slot per task (swap-in on a miss) and pick each matrix's path for this pass (``forms`` unused)."""
        in_use = {t for t, _ in segs}
        slots = []
        for t, e in segs:
            if self._slot_bundle.get(t) != e.identity:
                # a slot can outlive its host entry (host eviction keeps it), and the bundle may have been
                # replaced since: never pair this entry's header and head with masks from older bytes
                self.cache.invalidate(t)
            slots.append(self.cache.acquire(
                t, {n: st.packed for n, st in e.layers.items() if st.packed is not None}, in_use,
                sparsity={n: st.sparsity for n, st in e.layers.items()}))
            self._slot_bundle[t] = e.identity
        rows = row_starts[-1]
        paths = {}
        for name in self.layers:
            sparsity = max((e.layers[name].sparsity if name in e.layers else 0.0) for _, e in segs)
            path = select_path("cuda", sparsity, rows, self.override)
            if path == KernelPath.GPU_COMPLEMENT and not self.cache.has_pruned(name, slots):
                # a slot without this matrix's CSR (not built: sparsity above the automatic threshold,
                # or sparse products unavailable): the fused kernel needs only the mask words
                if not self.triton.HAS_TRITON:
                    raise RuntimeError(f"no CSR of pruned entries for {name} in slots {slots} and no triton")
                path = KernelPath.TRITON_FUSED.value
            paths[name] = path
        return SegmentTable(
            row_starts, slots=slots, paths=paths,
            seg_starts=torch.tensor(row_starts, dtype=torch.int32).to(self.device, non_blocking=True),
            seg_slots=torch.tensor(slots, dtype=torch.int32).to(self.device, non_blocking=True))

    def linear(self, layer: MaskedLinear, x: torch.Tensor, seg: SegmentTable) -> torch.Tensor:
        """``x`` ``[rows, in]`` sorted by segment -> ``[rows, out]`` in ``x.dtype``."""
        path = seg.paths[layer.name]
        if path == KernelPath.TRITON_FUSED:
            return self.triton.segmented_masked_linear_triton(
                x.contiguous(), layer.w_q, layer.scale, layer.device_words, seg.seg_starts, seg.seg_slots, layer.bias)
        if path == KernelPath.GPU_COMPLEMENT:
            return sparse_complement.segmented_complement_linear(
                x, layer.weight, layer.bias, layer.device_pruned, seg.row_starts, seg.slots)
        # "reference": materialise each segment's mask from its slot (slow, exact)
        out, in_ = layer.w_q.shape
        r = seg.row_starts
        return torch.cat([masked_linear_reference(
            x[r[i]:r[i + 1]], layer.w_q, layer.scale,
            self.triton.relayout_mask_inverse(layer.device_words[slot], out, in_), layer.bias)
            for i, slot in enumerate(seg.slots)])
