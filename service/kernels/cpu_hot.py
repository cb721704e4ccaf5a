"""CPU "hot tier": a task's masked weight materialised once, so a request costs one dense product.

Semantics (same as reference): ``y = x · (deq(W_q) ⊙ μ)ᵀ + b`` with ``deq(W_q)[o, i] = W_q[o, i] · scale[o]``
(:func:`service.kernels.reference.masked_linear_reference`). A :class:`HotWeight` holds ``deq(W_q) ⊙ μ`` of one
matrix for one task in one compute precision and layout; :func:`materialize` builds it (once per task load) and
:func:`hot_linear` multiplies by it (per request). Nothing is shared with the backbone: a :class:`HotWeight`
owns every tensor it holds (bar one read-only int64 zero-point vector per ``out`` size, shared process-wide), and
:meth:`HotWeight.nbytes` counts them exactly.

Precisions. Measured on the 2-core AMD EPYC dev box (avx512_bf16 + avx512_vnni, no AMX; torch 2.13, 2 threads):
ms per product of ``rows x [1536, 384]`` (out x in), best of 3 x 15 interleaved rounds; ``err`` = max |y - exact| /
max |exact| per matrix, worst of MiniLM's 36 matrices on 1570 real SST-2 token activations with 13 % masks;
``cos`` = cosine of MiniLM sentence embeddings to the fp32 path (128 SST-2 sentences, mean / min)::

    precision       stored weight                      1 row  12 rows  128 rows  1408 rows   err     cos (mean/min)
    fp32            float32 [out, in], F.linear        0.033  0.143    0.751     7.45        7e-7    1 (bit-identical)
    fp32_packed     float32, oneDNN-blocked (opt-in)   0.029  0.053    0.322     3.47        1.2e-6  1.000000/1.000000
    bf16            bfloat16, oneDNN-blocked           0.025  0.041    0.197     2.13        7.5e-3  0.999989/0.999982
    int8 (row)      int8 W_q ⊙ μ, oneDNN-prepacked     0.044  0.057    0.167     1.61        2.0e-2  0.99941/0.99900
    int8 (tensor)   (act_quant="tensor")               0.051  0.062    0.157     1.28        4.2e-2  0.99441/0.99109

* ``"fp32"``: ``deq(W_q) ⊙ μ`` as a plain float32 ``[out, in]`` tensor, multiplied with ``F.linear``: the product is
  bit-identical (``torch.equal``) to ``F.linear(x, deq(W_q) * mask, b)``, i.e. to today's fp32 serving path.
* ``"fp32_packed"`` (opt-in, not in :data:`PRECISIONS`): the same float32 weight reordered once into oneDNN's
  blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied with
  ``torch.ops.mkldnn._linear_pointwise``: fp32 accuracy, 2.1-2.7x faster than ``F.linear`` here, but a different
  summation order, so not bit-identical to the fp32 path.
* ``"bf16"``: ``deq(W_q) ⊙ μ`` rounded to bfloat16 (one rounding of each weight, relative error <= 2^-9) and
  reordered into oneDNN's blocked layout; activations are rounded to bfloat16 per call, accumulation is float32,
  the output is rounded to bfloat16 by oneDNN and the bias is added in float32.
* ``"int8"``: since ``W_q ⊙ μ`` is still int8 with the same per-channel scales, the stored weight is *exactly* the
  served weight (prepacked with ``torch.ops.onednn.qlinear_prepack``, the op PyTorch's inductor x86 int8 lowering
  uses; no deprecated quantized-tensor API). Only the activations are quantized, dynamically per call to uint8
  (asymmetric, ``qmax + 1`` levels, see :attr:`HotWeight.act_qmax`): per row by default (each row's own min/max:
  2-3x more accurate than one scale per tensor on MiniLM activations, and a row's result does not depend on the
  other rows of the batch), or per tensor (``act_quant="tensor"``: faster for many rows, batch-dependent).
  Signed int8 activations are not used: oneDNN runs them on a reference path (seconds per call here).

Inference only: the oneDNN paths have no autograd. The oneDNN layouts are chosen for the CPU the process runs on, and
their opaque tensors cannot be pickled, deep-copied or ``torch.save``-d (``NotImplementedError``): build a
:class:`HotWeight` where it is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from service.kernels.cpu_features import INT8_DOT_FEATURES, cpu_features
from service.kernels.packing import unpack_bits

#: precisions of the hot tier, in order of accuracy (fp32 is the exact served path)
PRECISIONS = ("fp32", "bf16", "int8")
#: opt-in oneDNN-blocked float32: fp32 accuracy, faster than "fp32", not bit-identical to it
FP32_PACKED = "fp32_packed"
#: every precision :func:`materialize` accepts
ALL_PRECISIONS = PRECISIONS + (FP32_PACKED,)
#: activation quantization modes of the int8 precision (see :func:`hot_linear`)
ACT_QUANT = ("row", "tensor")

#: the smallest activation step (scale) used, so a constant row or tensor does not divide by zero
_MIN_ACT_SCALE = 1e-30
_HALF = torch.tensor(0.5)


# --------------------------------------------------------------------------------------------- availability


def unavailable_reason(precision: str) -> str | None:
    """Why ``precision`` cannot be materialised in this process, or None when it can.

    ``"fp32"`` and ``"bf16"`` are always available (bf16 falls back to a plain bfloat16 weight and ``F.linear`` where
    oneDNN's bf16 reorder is missing); ``"int8"`` needs ``torch.ops.onednn.qlinear_prepack`` and
    ``qlinear_pointwise``, ``"fp32_packed"`` needs ``torch.ops.mkldnn._reorder_linear_weight`` and
    ``_linear_pointwise``. Each is probed once with a tiny product and the answer cached.

    Raises:
        ValueError: unknown precision.
    """
    if precision not in ALL_PRECISIONS:
        raise ValueError(f"precision must be one of {ALL_PRECISIONS}, got {precision!r}")
    return _probe(precision)


@functools.lru_cache(maxsize=None)
def _probe(precision: str) -> str | None:
    if precision in ("fp32", "bf16"):
        return None
    w_q = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=torch.int8)
    scale = torch.tensor([0.5, 0.25])
    x = torch.tensor([[1.0, 2.0, -1.0]])
    try:
        hot = _materialize_checked(w_q, scale, None, None, precision)
        y = hot_linear(x, hot)
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return f"{precision} hot weights are unavailable in torch {torch.__version__}: {type(exc).__name__}: {exc}"
    want = x @ (w_q.to(torch.float32) * scale[:, None]).t()
    if not torch.allclose(y, want, rtol=0.05, atol=0.05):
        return f"{precision} probe product {y.tolist()} differs from {want.tolist()}"
    return None


def int8_available() -> bool:
    """Whether the int8 precision works in this process (``unavailable_reason("int8") is None``)."""
    return unavailable_reason("int8") is None


def _mkldnn_bf16_pack_ok() -> bool:
    fn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------------- hot weights


@dataclass(eq=False)
class HotWeight:
    """The materialised ``deq(W_q) ⊙ μ`` of one masked matrix for one task in one precision (from
    :func:`materialize`; multiply with :func:`hot_linear`).

    Attributes:
        precision: one of :data:`ALL_PRECISIONS`.
        out_features, in_features: the matrix shape ``[out, in]``.
        weight: ``"fp32"``: float32 ``[out, in]`` contiguous (``deq(W_q) ⊙ μ``); ``"fp32_packed"`` / ``"bf16"``: the
            same in float32 / bfloat16, as an opaque oneDNN (``torch._mkldnn``) tensor of logical shape ``[out, in]``
            (``"bf16"``: a plain bfloat16 ``[out, in]`` tensor where oneDNN bf16 is unsupported); ``"int8"``: the
            opaque prepacked int8 ``W_q ⊙ μ`` (logical shape ``[in, out]``).
        bias: float32 ``[out]`` or None.
        scale: ``"int8"`` only: float32 ``[out]``, the backbone's per-channel scales (a copy); else None.
        row_sum: ``"int8"`` only: float32 ``[out]``, ``Σ_i deq(W_q)[o, i] · μ[o, i]`` (exact integer sum times
            ``scale[o]``), for the activation zero-point correction of per-row quantization; else None.
        act_qmax: ``"int8"`` only: the largest uint8 activation code, 255 where the CPU has int8 dot products
            (:data:`INT8_DOT_FEATURES`), else 127 (PyTorch's x86 ``reduce_range``: without VNNI, u8 x s8 pairs are
            summed in 16 bits with saturation); 0 for the other precisions.
    """

    precision: str
    out_features: int
    in_features: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: torch.Tensor | None = None
    row_sum: torch.Tensor | None = None
    act_qmax: int = 0

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this weight holds."""
        return [t for t in (self.weight, self.bias, self.scale, self.row_sum) if t is not None]

    def nbytes(self) -> int:
        """Exact bytes of tensor data held (for a byte-bounded cache): plain tensors ``numel * element_size``,
        oneDNN tensors their buffer size (``torch.ops.mkldnn._nbytes``: blocked layout incl. padding and, for int8,
        oneDNN's per-channel compensation). Excludes the Python objects (a few hundred bytes) and, for int8, the
        weight zero points oneDNN takes (int64 zeros ``[out]``, one shared constant per ``out``)."""
        return sum(_tensor_nbytes(t) for t in self.tensors())


def _tensor_nbytes(t: torch.Tensor) -> int:
    if t.is_mkldnn:
        return int(torch.ops.mkldnn._nbytes(t))
    return t.numel() * t.element_size()


def materialize(w_q: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None,
                precision: str) -> HotWeight:
    """Build the hot weight ``deq(W_q) ⊙ μ`` of one matrix in ``precision``.

    Args:
        w_q: int8 ``[out, in]`` (the backbone's quantized weight; not modified, not kept).
        scale: float32 ``[out]`` per-channel scales (copied for ``"int8"``).
        mask: bool ``[out, in]`` (True keeps), or uint8 ``[ceil(out*in/8)]`` packed bits in the bundle's bit order
            (:func:`service.kernels.packing.unpack_bits`), or None (nothing pruned).
        bias: ``[out]`` float (kept as a float32 copy) or None.
        precision: one of :data:`ALL_PRECISIONS`.
    Returns:
        a :class:`HotWeight` owning all its tensors, on the CPU.
    Raises:
        ValueError: unknown precision, or a tensor of the wrong dtype, shape or device.
        RuntimeError: the precision is unavailable in this process (:func:`unavailable_reason`).

    Cost of one MiniLM task (36 matrices, 10.6 M weights, this dev box; from bool masks / from packed bits, the
    latter including :func:`~service.kernels.packing.unpack_bits`, 2.7 ms): fp32 6.0 / 7.3 ms, bf16 9.1 / 11.3 ms
    (4.7 ms of it oneDNN's reorder), int8 19.1 / 21.8 ms (16.9 ms of it ``qlinear_prepack``, already on both
    cores), fp32_packed 9.0 / 11.9 ms. Bytes held per task: fp32 42.6 MB, bf16 21.3 MB, int8 10.9 MB.
    """
    if precision not in ALL_PRECISIONS:
        raise ValueError(f"precision must be one of {ALL_PRECISIONS}, got {precision!r}")
    if precision not in ("fp32", "bf16"):
        reason = unavailable_reason(precision)
        if reason is not None:
            raise RuntimeError(reason)
    return _materialize_checked(w_q, scale, mask, bias, precision)


def _materialize_checked(w_q, scale, mask, bias, precision) -> HotWeight:
    if w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.device.type != "cpu":
        raise ValueError(f"w_q must be a CPU int8 [out, in] tensor, got {w_q.dtype} {list(w_q.shape)} on {w_q.device}")
    out_f, in_f = (int(s) for s in w_q.shape)
    if scale.dtype != torch.float32 or tuple(scale.shape) != (out_f,) or scale.device.type != "cpu":
        raise ValueError(f"scale must be a CPU float32 [{out_f}] tensor, got {scale.dtype} {list(scale.shape)}")
    if bias is not None:
        if not bias.is_floating_point() or tuple(bias.shape) != (out_f,) or bias.device.type != "cpu":
            raise ValueError(f"bias must be a CPU float [{out_f}] tensor or None, got {bias.dtype} {list(bias.shape)}")
        bias = bias.detach().to(torch.float32, copy=True).contiguous()
    if mask is not None:
        if mask.device.type != "cpu":
            raise ValueError(f"mask must be on the CPU, got {mask.device}")
        if mask.dtype == torch.uint8 and mask.dim() == 1:
            mask = unpack_bits(mask, (out_f, in_f))  # raises ValueError on a wrong byte count
        elif mask.dtype != torch.bool or tuple(mask.shape) != (out_f, in_f):
            raise ValueError(f"mask must be bool [{out_f}, {in_f}] or packed uint8 [{(out_f * in_f + 7) // 8}], "
                             f"got {mask.dtype} {list(mask.shape)}")
    w_q = w_q.detach().contiguous()
    scale = scale.detach().contiguous()

    if precision == "int8":
        w_m = w_q if mask is None else w_q * mask  # int8 * bool -> int8: still the exact int8 grid
        packed = torch.ops.onednn.qlinear_prepack(w_m, None)
        # numpy's int8 -> int32 row sum: ~100x faster than torch's (torch 2.13 CPU), the same integers
        row_sum = torch.from_numpy(w_m.numpy().sum(axis=1, dtype=np.int32)).to(torch.float32) * scale
        return HotWeight("int8", out_f, in_f, packed, bias, scale=scale.clone(), row_sum=row_sum,
                         act_qmax=_act_qmax())

    if precision == "bf16":
        # round(W_q · scale ⊙ μ) to bf16 in one pass: masked in int8 (exact), then the product computed in float32
        # per element and written as bf16 (same values as forming the float32 weight first; 15x faster)
        w_m = w_q if mask is None else w_q * mask
        w_bf = torch.empty((out_f, in_f), dtype=torch.bfloat16)
        torch.mul(w_m, scale[:, None], out=w_bf)
        if _mkldnn_bf16_pack_ok():
            w_bf = torch.ops.mkldnn._reorder_linear_weight(w_bf)
        return HotWeight("bf16", out_f, in_f, w_bf, bias)

    # deq(W_q) ⊙ μ exactly as the fp32 serving path forms it (backbone.dequantize, then * mask)
    w = w_q.to(torch.float32) * scale[:, None]
    if mask is not None:
        w = w * mask
    if precision == "fp32":
        return HotWeight("fp32", out_f, in_f, w, bias)
    return HotWeight(FP32_PACKED, out_f, in_f, torch.ops.mkldnn._reorder_linear_weight(w), bias)


@functools.lru_cache(maxsize=1)
def _act_qmax() -> int:
    return 255 if cpu_features() & INT8_DOT_FEATURES else 127


# -------------------------------------------------------------------------------------------------- products


def hot_linear(x: torch.Tensor, hot: HotWeight, *, act_quant: str = "row", low: bool = False) -> torch.Tensor:
    """``y = x · (deq(W_q) ⊙ μ)ᵀ + b`` with a :class:`HotWeight`: exactly one dense product.

    Args:
        x: CPU ``[..., in]`` float32 or bfloat16 (bf16 precision: used as is; the others: converted to float32
            first, so a bf16 ``x`` is exact input for them).
        hot: from :func:`materialize`.
        act_quant: ``"int8"`` only: ``"row"`` (default) quantizes each row of ``x`` (each token) with its own
            min/max to ``hot.act_qmax + 1`` uint8 levels and corrects the zero point with ``hot.row_sum``;
            ``"tensor"`` uses one min/max for all of ``x`` (zero kept exact) and lets oneDNN apply scale, zero point
            and bias in the product. Ignored by the other precisions.
        low: ``"bf16"`` only: return the product in bfloat16, the bias added by oneDNN in bf16 (for a consumer that
            computes in bf16 itself: attention, the activation function); ignored by the other precisions.
    Returns:
        float32 ``[..., out]`` whatever ``x``'s dtype (bfloat16 with ``low`` in the bf16 precision). ``"fp32"``: bit-identical to
        ``F.linear(x, deq(W_q) * mask, b)``. A non-finite ``x`` gives non-finite outputs (int8: in the whole row,
        or everywhere for ``"tensor"``).
    Raises:
        ValueError: ``x``'s last dimension is not ``in``, its dtype is not accepted, it is not on the CPU, or
            ``act_quant`` is unknown.
    """
    _check_input(x, hot)
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    p = hot.precision
    if p != "bf16" and x.dtype != torch.float32:
        x = x.to(torch.float32)
    if p == "fp32":
        return F.linear(x, hot.weight, hot.bias)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, hot.in_features).contiguous()
    if x2.shape[0] == 0:
        return x.new_empty((*lead, hot.out_features), dtype=torch.float32)
    if p == FP32_PACKED:
        y = torch.ops.mkldnn._linear_pointwise(x2, hot.weight, hot.bias, "none", [], "")
    elif p == "bf16" and low:
        xb = x2.to(torch.bfloat16)
        b = None if hot.bias is None else hot.bias.to(torch.bfloat16)
        if hot.weight.is_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(xb, hot.weight, b, "none", [], "")
        else:
            y = F.linear(xb, hot.weight, b)
    elif p == "bf16":
        xb = x2.to(torch.bfloat16)
        if hot.weight.is_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(xb, hot.weight, None, "none", [], "")
        else:
            y = F.linear(xb, hot.weight)
        # bf16 product + float32 bias -> float32 in one pass
        y = torch.add(y, hot.bias) if hot.bias is not None else y.to(torch.float32)
    elif act_quant == "row":
        y = _int8_per_row(x2, hot)
    else:
        y = _int8_per_tensor(x2, hot)
    return y.reshape(*lead, hot.out_features)


def plain_product(x: torch.Tensor, hot: HotWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hot_linear` (``act_quant="row"``, ``low`` False) and the activation the product saw.

    Args:
        x: CPU ``[rows, in]`` float32 (or bfloat16).
        hot: an int8, bf16 or fp32 :class:`HotWeight`.
    Returns:
        ``(y float32 [rows, out], seen float32 [rows, in])``: ``seen`` is what ``y`` multiplied ``hot``'s weight by —
        int8: each row's uint8 codes decoded, ``lo + step · q``; bf16: ``x`` rounded to bfloat16; fp32: ``x`` —
        so that ``y − seen · Pᵀ`` removes the terms of a matrix ``P`` of the same stored values exactly up to float
        rounding (:mod:`service.sparse_forms`).
    Raises:
        ValueError: as :func:`hot_linear`, or a precision other than int8 / bf16 / fp32.
    """
    p = hot.precision
    if p == "int8":
        _check_input(x, hot)
        x2 = x.reshape(-1, hot.in_features).to(torch.float32).contiguous()
        if x2.shape[0] == 0:
            return x2.new_empty((0, hot.out_features)), x2
        q, lo, step = _quantize_rows(x2, hot.act_qmax)
        raw = _qlinear(q, 1.0, 0, hot, None)
        base = torch.addcmul(hot.bias, lo, hot.row_sum) if hot.bias is not None else lo * hot.row_sum
        return base.addcmul_(raw, step), torch.addcmul(lo, q.to(torch.float32), step)
    if p == "bf16":
        return hot_linear(x, hot), x.to(torch.bfloat16).to(torch.float32)
    if p == "fp32":
        return hot_linear(x, hot), x.to(torch.float32)
    raise ValueError(f"no plain product with a seen activation for precision {p!r}")


def _check_input(x: torch.Tensor, hot: HotWeight) -> None:
    """Raise ValueError unless ``x`` is a CPU float32 / bfloat16 ``[..., in]`` tensor for ``hot``."""
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU, got {x.device}")
    if x.dim() == 0 or x.shape[-1] != hot.in_features:
        raise ValueError(f"x must be [..., {hot.in_features}], got {list(x.shape)}")
    if x.dtype != torch.float32 and x.dtype != torch.bfloat16:
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")


def _qlinear(q: torch.Tensor, x_scale, x_zp, hot: HotWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[rows, out] = x_scale · scale[o] · Σ_i (q - x_zp)[r, i] · (W_q ⊙ μ)[o, i] + bias[o]``."""
    op = torch.ops.onednn.qlinear_pointwise
    if isinstance(x_scale, torch.Tensor):
        op = op.tensor
    return op(q, x_scale, x_zp, hot.weight, hot.scale, _weight_zero_points(hot.out_features), bias, 1.0, 0,
              torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def _weight_zero_points(out_features: int) -> torch.Tensor:
    """int64 zeros ``[out]``: the symmetric int8 weight's zero points, one read-only constant per ``out``."""
    return torch.zeros(out_features, dtype=torch.int64)


def _quantize_rows(x2: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric uint8 codes: ``x ≈ lo + step · q``, ``q = floor((x - lo) / step + 1/2)`` in ``[0, qmax]``.

    Returns ``(q uint8 [rows, in], lo float32 [rows, 1], step float32 [rows, 1])``. Rounding is the float -> int
    truncation of a non-negative value (+1/2). Float cancellation can garble codes only in a row whose range is below
    ~2^-15 of its magnitude; with ``qmax`` 255 any uint8 code still decodes inside ``[lo, hi]``, so the error stays
    below that tiny range (for ``qmax`` < 255 the codes are clamped, one more pass).
    """
    # as few ops as possible: each costs ~2 us at 12 rows, and ten of them cost as much as the GEMM there
    hi = x2.amax(dim=-1, keepdim=True)  # amax + amin: 20x faster than aminmax(dim=-1) in torch 2.13 on CPU
    lo = x2.amin(dim=-1, keepdim=True)
    width = (hi - lo).clamp_(min=_MIN_ACT_SCALE * qmax)
    inv = torch.div(qmax, width)
    offset = torch.addcmul(_HALF, lo, inv, value=-1.0)  # 1/2 - lo / step
    # float -> int16 -> uint8 is 2.5-3x faster than float -> uint8 in torch 2.13 on x86
    t = torch.addcmul(offset, x2, inv)
    if qmax != 255:
        t = t.clamp_(0.0, qmax + 0.5)
    return t.to(torch.int16).to(torch.uint8), lo, width.mul_(1.0 / qmax)


def _int8_per_row(x2: torch.Tensor, hot: HotWeight) -> torch.Tensor:
    q, lo, step = _quantize_rows(x2, hot.act_qmax)
    raw = _qlinear(q, 1.0, 0, hot, None)  # Σ_i q[r, i] · deq(W_q ⊙ μ)[o, i]
    # y = lo[r] · row_sum[o] + b[o] + step[r] · raw[r, o]
    # (an outer-product addcmul is 1.7x faster than a rank-1 addmm for [1408, 1536] here)
    base = torch.addcmul(hot.bias, lo, hot.row_sum) if hot.bias is not None else lo * hot.row_sum
    return base.addcmul_(raw, step)


def _quantize_tensor(x2: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric uint8 codes with zero exact: ``x ≈ step · (q - zp)``, ``zp`` an integer in
    ``[0, qmax]``. Returns ``(q uint8 [rows, in], step float32 0-d, zp int64 0-d)``."""
    lo, hi = torch.aminmax(x2)
    width = (hi.clamp(min=0.0) - lo.clamp(max=0.0)).clamp_(min=_MIN_ACT_SCALE * qmax)
    inv = torch.div(qmax, width)
    zp = (lo * inv).round_().neg_().clamp_(0, qmax)
    q = torch.addcmul(zp + 0.5, x2, inv).clamp_(0.0, qmax).to(torch.int16).to(torch.uint8)
    return q, width.mul_(1.0 / qmax), zp.to(torch.int64)


def _int8_per_tensor(x2: torch.Tensor, hot: HotWeight) -> torch.Tensor:
    q, step, zp = _quantize_tensor(x2, hot.act_qmax)
    return _qlinear(q, step, zp, hot, hot.bias)
