"""Sparse-complement masked products, one task or a mixed-task batch, CPU and GPU (plain torch).

Semantics (same as :func:`service.kernels.reference.masked_linear_reference`)::

    x · (W ⊙ μ)ᵀ + b = (x · Wᵀ + b) − x · (W ⊙ ¬μ)ᵀ,   W = deq(W_q)

* One **dense** product with a weight de-quantized once at backbone load
  (:func:`dequantize_weight`, fp16 on the GPU) and shared by every task and
  every row of a mixed batch (cuBLAS on the GPU, MKL on the CPU).
* Minus, per task segment, a **sparse** product with that task's pruned
  entries ``W ⊙ ¬μ``: a CSR matrix built once when the task is loaded
  (:func:`pruned_csr` from packed bits on the device tier, :func:`pruned_csr_from_mask` on the
  CPU), of size proportional to the number of pruned weights
  (int32 column index + one value each, plus ``out + 1`` row offsets).

The CSR values are taken from the same shared weight tensor as the dense
product, so the pruned terms cancel up to float rounding. Pays off when the
masks are very sparse in zeros (the papers' 1-13 % pruned); the fused Triton
kernel (:mod:`service.kernels.triton_masked`) does not depend on sparsity.

Everything here is torch-only. On the CPU (``cpu_complement``, the default
for low sparsity) it runs in float32 over the backbone's float32 ``deq(W_q)``
(CPU sparse products do not support float16), and the correction is taken
``PRUNED_PRODUCT_ROWS`` token rows at a time; on CUDA (``gpu_complement``) in
float16 with cuSPARSE.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from backbone import dequantize
from service.kernels.packing import unpack_bits

#: row chunk of the CPU sparse correction (token rows per sparse product; see :func:`pruned_product`)
PRUNED_PRODUCT_ROWS = 128


def dequantize_weight(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``deq(W_q) = W_q · scale[:, None]``, computed in float32 and stored in ``dtype``.

    Input shapes: ``w_q`` int8 ``[out, in]``, ``scale`` float32 ``[out]``.

    Returns:
        ``[out, in]`` in ``dtype`` on ``w_q.device``, made once per backbone.
    """
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"w_q must be int8 [out, in], got {w_q.dtype} {list(w_q.shape)}")
    if tuple(scale.shape) != (w_q.shape[0],):
        raise ValueError(f"scale must be [{w_q.shape[0]}], got {list(scale.shape)}")
    return dequantize(w_q, scale.to(torch.float32)).to(dtype).contiguous()


def pruned_csr(weight: torch.Tensor, packed_uint8: torch.Tensor) -> torch.Tensor | None:
    """CSR matrix of one task's pruned entries ``W ⊙ ¬μ`` (built once at task load).

    Semantics: entry ``[o, i]`` is ``weight[o, i]`` where the mask bit is 0 absent elsewhere.

    Input shapes:
        weight: ``[out, in]``, the shared de-quantized weight (its dtype and device are kept).
        packed_uint8: uint8 ``[ceil(out * in / 8)]``, the bundle's mask bits (any device).

    Returns:
        sparse CSR ``[out, in]`` with int32 indices, or None when no weight is pruned.
    """
    out, in_ = weight.shape
    mask = unpack_bits(packed_uint8.to(weight.device), (out, in_))  # bool [out, in]
    return pruned_csr_from_mask(weight, mask)


def pruned_csr_from_mask(weight: torch.Tensor, mask: torch.Tensor, skip_zeros: bool = False) -> torch.Tensor | None:
    """As :func:`pruned_csr`, with the mask as bool ``[out, in]`` (True keeps).

    ``skip_zeros``: leave out pruned entries whose weight is zero (they change no product; the CPU
    resident form does, saving their bytes). Returns None when no entry is left.

    Raises:
        ValueError: the mask's shape is not the weight's.
    """
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"mask shape {list(mask.shape)} does not match weight shape {list(weight.shape)}")
    out, in_ = weight.shape
    pruned = ~mask.to(device=weight.device, dtype=torch.bool)
    if skip_zeros:
        pruned &= weight != 0
    rows, cols = pruned.nonzero(as_tuple=True)  # [nnz] each, row-major order
    if rows.numel() == 0:
        return None
    counts = torch.bincount(rows, minlength=out)  # [out]
    crow = torch.zeros(out + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    values = weight[rows, cols]  # [nnz]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.to(torch.int32), cols.to(torch.int32), values, size=(out, in_),
                                       check_invariants=False)


def csr_nbytes(csr: torch.Tensor | None) -> int:
    """Bytes held by a CSR matrix from :func:`pruned_csr` (0 for None)."""
    if csr is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))


def pruned_product(x: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """``x · (W ⊙ ¬μ)ᵀ``, the correction the complement path subtracts from the dense product.

    Args:
        x: ``[rows, in]`` in the CSR's dtype.
        pruned: CSR ``[out, in]`` from :func:`pruned_csr` / :func:`pruned_csr_from_mask`.
    Returns:
        ``[rows, out]``.

    On the CPU rows are taken ``PRUNED_PRODUCT_ROWS`` at a time: the CSR product's ``[out, rows]``
    result stays in cache, which on a 2-core x86 machine made an 800-row product about 2x faster
    than one call (each output element is the same sum either way). On CUDA: one call.
    """
    n = x.shape[0]
    if x.device.type != "cpu" or n <= PRUNED_PRODUCT_ROWS:
        return torch.sparse.mm(pruned, x.t()).t()
    return torch.cat([torch.sparse.mm(pruned, x[i : i + PRUNED_PRODUCT_ROWS].t()).t()
                      for i in range(0, n, PRUNED_PRODUCT_ROWS)])


def _subtract_correction(y: torch.Tensor, x: torch.Tensor, csr: torch.Tensor) -> None:
    """In place: ``y -= x · csrᵀ``. ``x`` ``[rows, in]``, ``y`` ``[rows, out]``."""
    y.sub_(pruned_product(x, csr))


def complement_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      pruned: torch.Tensor | None) -> torch.Tensor:
    """One task: ``y = x · Wᵀ + b − x · (W ⊙ ¬μ)ᵀ``.

    Input shapes:
        x: ``[..., in]`` in ``weight.dtype``.
        weight: ``[out, in]`` shared de-quantized weight.
        bias: ``[out]`` or None.
        pruned: CSR ``[out, in]`` from :func:`pruned_csr`, or None (nothing pruned).

    Returns:
        ``[..., out]`` in ``x.dtype``.
    """
    y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if pruned is not None and x.numel():
        _subtract_correction(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), pruned)
    return y


def segmented_complement_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                pruned_slots: Sequence[torch.Tensor | None],
                                seg_starts: torch.Tensor | Sequence[int],
                                seg_slots: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Mixed-task batch: one dense product for all rows, then each segment's correction.

    Semantics: as :func:`service.kernels.reference.segmented_masked_linear_reference`;
    rows ``seg_starts[s] : seg_starts[s+1]`` use the task in slot ``seg_slots[s]``,
    whose pruned entries are ``pruned_slots[seg_slots[s]]``. Rows outside every
    segment get the unmasked product.

    Input shapes:
        x: ``[rows, in]`` in ``weight.dtype``, rows sorted by segment.
        weight: ``[out, in]``; bias: ``[out]`` or None.
        pruned_slots: one CSR ``[out, in]`` (or None) per resident task slot.
        seg_starts: ``[num_segments + 1]`` ints; seg_slots: ``[num_segments]`` ints.
            Keep both on the host: they drive a host loop (a device tensor costs a sync).

    Returns:
        ``[rows, out]`` in ``x.dtype``.
    """
    starts = seg_starts.tolist() if isinstance(seg_starts, torch.Tensor) else list(seg_starts)
    slots = seg_slots.tolist() if isinstance(seg_slots, torch.Tensor) else list(seg_slots)
    if len(starts) != len(slots) + 1:
        raise ValueError(f"seg_starts must have num_segments + 1 = {len(slots) + 1} entries, got {len(starts)}")
    if any(b < a for a, b in zip(starts, starts[1:])) or (starts and (starts[0] < 0 or starts[-1] > x.shape[0])):
        raise ValueError(f"seg_starts must be non-decreasing within [0, {x.shape[0]}], got {starts}")
    for slot in slots:
        if not 0 <= slot < len(pruned_slots):
            raise ValueError(f"segment slot {slot} outside [0, {len(pruned_slots)})")
    y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))  # [rows, out], all tasks at once
    for s, slot in enumerate(slots):
        a, b = starts[s], starts[s + 1]
        csr = pruned_slots[slot]
        if csr is not None and b > a:
            _subtract_correction(y[a:b], x[a:b], csr)
    return y


def complement_unsupported(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why this path cannot run with ``dtype`` on ``device``, or None when it can.

    Runs :func:`complement_linear` once on a 2x4 weight with one pruned entry and compares it with
    the dense masked product. Sparse CSR products are not available for every dtype on every device
    and library version (CPU has no float16; cuSPARSE of some CUDA releases refuses float16 SpMM,
    e.g. pytorch#72234), so the engine asks once at start-up instead of failing on a request.

    Returns:
        None, or a one-line reason (the exception raised, or the wrong result).
    """
    try:
        weight = torch.arange(1, 9, dtype=torch.float32).reshape(2, 4).to(device=device, dtype=dtype)
        mask = torch.ones(2, 4, dtype=torch.bool, device=weight.device)
        mask[1, 2] = False
        x = torch.ones(3, 4, dtype=dtype, device=weight.device)
        got = complement_linear(x, weight, None, pruned_csr_from_mask(weight, mask)).float().cpu()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    want = torch.tensor([[10.0, 19.0]] * 3)  # rows of W ⊙ μ summed: 1+2+3+4, 5+6+8
    if not torch.allclose(got, want):
        return f"wrong result {got[0].tolist()} instead of {want[0].tolist()}"
    return None
