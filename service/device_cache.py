"""Device tier of the task cache: a fixed number of GPU mask slots, backed by the host tier.

Every masked matrix ``[out, in]`` of the backbone gets one preallocated int32
tensor ``[slots, out, ceil(in / 32)]`` of kernel mask words
(:func:`service.kernels.triton_masked.relayout_mask`); slot ``s`` of every
matrix holds the masks of one task. A mixed-task batch names, per row
segment, the slot of its task (``seg_slots``), and the fused kernel reads that
slot's words (:func:`service.kernels.triton_masked.segmented_masked_linear_triton`).

Swap-in (a slot miss): the least recently used slot not used by the batch
being built is taken, the task's packed mask bits (uint8, pinned host memory
on CUDA, from the host tier) are copied host → device and re-laid out into the
slot. The time, synchronised on CUDA, is exported as
``supermask_device_swap_in_duration_seconds{task}``. Optionally (for the
``gpu_complement`` path) each slot also keeps a CSR matrix of the task's pruned
entries per matrix, built from the shared de-quantized weights at swap-in, for
the matrices pruned lightly enough for that path to be chosen
(``csr_max_sparsity``); :meth:`DeviceTaskCache.has_pruned` says whether a batch's
slots all have theirs.

Nothing here is thread-safe: the engine calls it under its lock. Works on any
device (``"cpu"`` in the tests).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping

import torch

from service.kernels.sparse_complement import pruned_csr
from service.kernels.triton_masked import mask_words_shape, relayout_mask
from service.metrics import Metrics

log = logging.getLogger(__name__)


class DeviceSlotsExhausted(RuntimeError):
    """Every slot is held by a task of the batch being built (a batch may hold at most ``slots`` tasks)."""

    def __init__(self, slots: int, in_use: int):
        super().__init__(f"all {slots} device mask slots are in use by the current batch ({in_use} tasks); "
                         f"a batch may mix at most {slots} tasks (SUPERMASK_DEVICE_SLOTS)")
        self.slots = slots
        self.in_use = in_use


class DeviceTaskCache:
    """Task → slot LRU over preallocated device mask-word tensors.

    Args:
        shapes: masked module name → weight shape ``(out, in)``, in the backbone's order.
        slots: number of task slots (> 0).
        device: where the slot tensors live (``"cuda"``, or ``"cpu"`` for tests).
        metrics: collectors to record swap-ins and residency into (None: record nothing).
        weights: module name → the shared de-quantized weight ``[out, in]`` on ``device``; when given,
            every swap-in also builds the slot's pruned-entry CSR matrices (``pruned``) for the
            ``gpu_complement`` path.
        csr_max_sparsity: with ``weights``, build a matrix's CSR only when the task's sparsity of that
            matrix (passed to :meth:`acquire`) is at most this: the automatic kernel rule never runs the
            complement path above it, so the CSR would be memory and swap-in time for nothing.
            None: build every one.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], slots: int, device: torch.device | str,
                 metrics: Metrics | None = None, weights: Mapping[str, torch.Tensor] | None = None,
                 csr_max_sparsity: float | None = None):
        if slots <= 0:
            raise ValueError(f"device slots must be > 0, got {slots}")
        self.device = torch.device(device)
        self.slots = slots
        self.metrics = metrics
        self.shapes: dict[str, tuple[int, int]] = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
        # module -> int32 [slots, out, ceil(in / 32)] kernel mask words, slot s = the task in slot s
        self.words: dict[str, torch.Tensor] = {
            n: torch.zeros((slots, *mask_words_shape(out, in_)), dtype=torch.int32, device=self.device)
            for n, (out, in_) in self.shapes.items()}
        # module -> int32 [out, ceil(in / 32)], every weight kept: for matrices a bundle does not mask
        self._keep_all: dict[str, torch.Tensor] = {
            n: relayout_mask(_all_ones_packed(out * in_, self.device), out, in_)
            for n, (out, in_) in self.shapes.items()}
        self.weights = dict(weights) if weights is not None else None
        # module -> [slots] CSR [out, in] of the slot task's pruned entries (None: nothing pruned / no weights)
        self.pruned: dict[str, list[torch.Tensor | None]] = {n: [None] * slots for n in self.shapes}
        self.csr_max_sparsity = csr_max_sparsity
        # module -> [slots] whether pruned[module][slot] is the slot task's (built, or None as nothing is pruned)
        self.csr_ready: dict[str, list[bool]] = {n: [False] * slots for n in self.shapes}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # task -> slot, least recently used first
        self.free: list[int] = list(range(slots))  # [<= slots] free slot indices, lowest first
        self.last_swap_in_seconds: float = 0.0  # seconds of the latest swap-in
        self._set_gauge()

    # ---- queries ----------------------------------------------------------------------------
    def lookup(self, task: str) -> int | None:
        """The slot holding ``task``, or None; does not change the LRU order."""
        return self.slot_of.get(task)

    def resident(self) -> list[str]:
        """Tasks holding a slot, least recently used first."""
        return list(self.slot_of)

    def has_pruned(self, name: str, slots: Collection[int]) -> bool:
        """Whether every slot in ``slots`` holds its task's pruned-entry CSR for module ``name``
        (so the ``gpu_complement`` path may run that matrix for them)."""
        ready = self.csr_ready[name]
        return all(ready[s] for s in slots)

    def nbytes(self) -> int:
        """Device bytes of the slot tensors (all slots, whether used or not)."""
        return sum(w.numel() * w.element_size() for w in self.words.values())

    # ---- acquire / release ------------------------------------------------------------------
    def acquire(self, task: str, packed_masks: Mapping[str, torch.Tensor],
                in_use: Collection[str] = (), sparsity: Mapping[str, float] | None = None) -> int:
        """Slot of ``task``, swapping its masks in on a miss.

        Args:
            task: task name.
            packed_masks: module name → uint8 ``[ceil(out * in / 8)]`` packed bits in the bundle's order
                (host, pinned on CUDA, or already on the device); a module absent here keeps every weight.
            in_use: tasks of the batch being built: their slots are never evicted.
            sparsity: module name → the task's fraction of pruned weights there (the bundle header's);
                compared with ``csr_max_sparsity``. None: every CSR is built.

        Returns:
            The slot index in ``[0, slots)``.

        Raises:
            DeviceSlotsExhausted: no free slot and every resident task is in ``in_use``.
            ValueError: a packed mask has the wrong dtype or byte count (the slot is left free).
        """
        slot = self.slot_of.get(task)
        if slot is not None:
            self.slot_of.move_to_end(task)
            return slot
        unknown = set(packed_masks) - set(self.shapes)
        if unknown:
            raise ValueError(f"masks for modules the device cache does not have: {sorted(unknown)[:3]}")
        slot = self._take_slot(in_use)
        t0 = time.perf_counter()
        try:
            for name, (out, in_) in self.shapes.items():
                packed = packed_masks.get(name)
                if packed is None:
                    self.words[name][slot].copy_(self._keep_all[name])
                    self.pruned[name][slot] = None
                    self.csr_ready[name][slot] = self.weights is not None  # nothing pruned: no correction
                    continue
                src = packed.to(self.device, non_blocking=True)  # uint8 [ceil(out * in / 8)]
                self.words[name][slot].copy_(relayout_mask(src, out, in_))
                if self.weights is not None and (self.csr_max_sparsity is None or sparsity is None
                                                 or sparsity.get(name, 1.0) <= self.csr_max_sparsity):
                    self.pruned[name][slot] = pruned_csr(self.weights[name], src)
                    self.csr_ready[name][slot] = True
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception:
            self._clear(slot)
            self.free.append(slot)
            self.free.sort()
            raise
        dt = time.perf_counter() - t0
        self.last_swap_in_seconds = dt
        self.slot_of[task] = slot
        if self.metrics is not None:
            self.metrics.device_swap_in_seconds.labels(self.metrics.task(task)).observe(dt)
        self._set_gauge()
        log.debug("swapped task %s into device slot %d in %.3f ms", task, slot, dt * 1e3)
        return slot

    def release(self, task: str) -> bool:
        """Free ``task``'s slot (its masks stay in the host tier). Returns whether it held one."""
        slot = self.slot_of.pop(task, None)
        if slot is None:
            return False
        self._clear(slot)
        self.free.append(slot)
        self.free.sort()
        self._set_gauge()
        return True

    invalidate = release
    """Drop ``task``'s slot after its bundle was replaced or deleted (same as :meth:`release`)."""

    # ---- internals --------------------------------------------------------------------------
    def _take_slot(self, in_use: Collection[str]) -> int:
        if self.free:
            return self.free.pop(0)
        for victim in self.slot_of:  # least recently used first
            if victim not in in_use:
                slot = self.slot_of.pop(victim)
                self._clear(slot)
                log.debug("evicted task %s from device slot %d", victim, slot)
                return slot
        raise DeviceSlotsExhausted(self.slots, len(self.slot_of))

    def _clear(self, slot: int) -> None:
        for name in self.shapes:
            self.pruned[name][slot] = None  # frees the CSR; the words are overwritten by the next swap-in
            self.csr_ready[name][slot] = False

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.device_resident_tasks.set(len(self.slot_of))


def _all_ones_packed(n: int, device: torch.device) -> torch.Tensor:
    """uint8 ``[ceil(n / 8)]``: ``n`` one bits, MSB first, padding bits 0."""
    packed = torch.full(((n + 7) // 8,), 255, dtype=torch.uint8, device=device)
    if n % 8:
        packed[-1] = (0xFF << (8 - n % 8)) & 0xFF
    return packed
