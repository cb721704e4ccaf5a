"""Plain torch references for the masked matrix products.

Semantics (Radiya-Dixit & Wang 2020, Eq. 3, over an int8 backbone):

    y = x · (deq(W_q) ⊙ μ)ᵀ + b,   deq(W_q)[o, i] = W_q[o, i] · scale[o]

Every optimized kernel in this package is tested against these functions.
"""

from __future__ import annotations

import torch

from service.kernels.packing import unpack_bits


def masked_linear_reference(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """Materialise ``deq(W_q) ⊙ μ`` and multiply.

    Args:
        x: ``[..., in]`` float.
        w_q: int8 ``[out, in]``.
        scale: float32 ``[out]``.
        mask: bool ``[out, in]`` (True keeps the weight).
        bias: ``[out]`` or None.
    Returns:
        ``[..., out]`` in ``x.dtype`` (computed in float32).
    """
    w = w_q.to(torch.float32) * scale.to(torch.float32)[:, None] * mask.to(torch.float32)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def masked_linear_packed_reference(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor,
                                   bias: torch.Tensor | None) -> torch.Tensor:
    """As :func:`masked_linear_reference`, with the mask given as packed bits
    (uint8 ``[ceil(out*in/8)]``, the bundle's bit order)."""
    return masked_linear_reference(x, w_q, scale, unpack_bits(packed, tuple(w_q.shape)), bias)


def segmented_masked_linear_reference(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor,
                                      masks: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                                      bias: torch.Tensor | None) -> torch.Tensor:
    """Mixed-task batch: rows ``seg_starts[s]:seg_starts[s+1]`` use mask ``masks[seg_slots[s]]``.

    Args:
        x: ``[rows, in]``, rows sorted by task segment.
        masks: bool ``[slots, out, in]``.
        seg_starts: int ``[num_segments + 1]``, ``seg_starts[0] = 0``, ``seg_starts[-1] = rows``.
        seg_slots: int ``[num_segments]``, the mask slot of each segment.
    Returns:
        ``[rows, out]``.
    """
    out = torch.empty(x.shape[0], w_q.shape[0], dtype=x.dtype, device=x.device)
    for s in range(seg_slots.numel()):
        a, b = int(seg_starts[s]), int(seg_starts[s + 1])
        out[a:b] = masked_linear_reference(x[a:b], w_q, scale, masks[int(seg_slots[s])], bias)
    return out


#: the hot tier's precisions this reference models (those of :func:`service.kernels.cpu_hot.hot_linear`)
HOT_PRECISIONS = ("fp32", "fp32_packed", "bf16", "int8")
#: its int8 activation quantizations
ACT_QUANT = ("row", "tensor")
#: the smallest activation step, so a constant row or tensor does not divide by zero
MIN_ACT_STEP = 1e-30


def quantize_rows_reference(x: torch.Tensor, qmax: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric uint8 activation codes, from the definition: for each row, ``lo = min x``, ``hi = max x``,
    ``step = (hi - lo) / qmax``, ``q = floor((x - lo) / step + 1/2)`` in ``[0, qmax]``, so ``x ≈ lo + step · q``.

    Args:
        x: float32 ``[rows, in]``.
        qmax: the largest code: 255, or 127 where the CPU has no VNNI (PyTorch's ``reduce_range``).
    Returns:
        ``(q, lo, step)``: codes float64 ``[rows, in]`` (integers in ``[0, qmax]``), ``lo`` and ``step`` float64
        ``[rows, 1]`` (``step`` at least :data:`MIN_ACT_STEP`).
    """
    x = x.to(torch.float64)
    lo = x.amin(dim=-1, keepdim=True)
    step = ((x.amax(dim=-1, keepdim=True) - lo) / qmax).clamp(min=MIN_ACT_STEP)
    q = torch.floor((x - lo) / step + 0.5).clamp(0, qmax)
    return q, lo, step


def quantize_tensor_reference(x: torch.Tensor, qmax: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric uint8 activation codes with zero exact (ONNX ``DynamicQuantizeLinear``), from the
    definition: ``step = (max(0, hi) - min(0, lo)) / qmax`` over the whole of ``x``, the zero point
    ``zp = clamp(round(-lo / step), 0, qmax)``, ``q = clamp(floor(x / step + zp + 1/2), 0, qmax)``, so
    ``x ≈ step · (q - zp)``.

    Args:
        x: float32 ``[rows, in]``.
        qmax: the largest code (as :func:`quantize_rows_reference`).
    Returns:
        ``(q, step, zp)``: codes float64 ``[rows, in]``, ``step`` and ``zp`` float64 0-d.
    """
    x = x.to(torch.float64)
    lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    step = ((hi - lo) / qmax).clamp(min=MIN_ACT_STEP)
    zp = torch.round(-lo / step).clamp(0, qmax)
    q = torch.floor(x / step + zp + 0.5).clamp(0, qmax)
    return q, step, zp


def hot_linear_reference(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None,
                         bias: torch.Tensor | None, precision: str, *, act_quant: str = "row",
                         act_qmax: int = 255) -> torch.Tensor:
    """Plain-torch model of :func:`service.kernels.cpu_hot.hot_linear`'s arithmetic, computed in float64 (the error
    budget of a precision minus the kernel's own float32 summation order). Shares no code with the kernel.

    ``"fp32"`` / ``"fp32_packed"``: the exact product (as :func:`masked_linear_reference`); ``"bf16"``: weights and
    ``x`` rounded to bfloat16, the product rounded to bfloat16, then the float32 bias added; ``"int8"``: ``x``
    replaced by its decoded uint8 codes, each row's own (``act_quant="row"``, :func:`quantize_rows_reference`) or
    the whole input's (``"tensor"``, :func:`quantize_tensor_reference`), with codes up to ``act_qmax`` (255; a
    kernel's :attr:`service.kernels.cpu_hot.HotWeight.act_qmax` may be 127). The codes are computed in float64:
    a value within float32 rounding of a code boundary may get the next code in the kernel.

    Args:
        x: float32 ``[..., in]``; w_q int8 ``[out, in]``; scale float32 ``[out]``; mask bool ``[out, in]`` or None;
        bias ``[out]`` or None.
    Returns:
        float32 ``[..., out]``.
    Raises:
        ValueError: unknown precision or act_quant.
    """
    if precision not in HOT_PRECISIONS:
        raise ValueError(f"precision must be one of {HOT_PRECISIONS}, got {precision!r}")
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    w = w_q.to(torch.float64) * scale.to(torch.float64)[:, None]
    if mask is not None:
        w = w * mask
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if precision == "bf16":
        w = w.to(torch.float32).to(torch.bfloat16).to(torch.float64)
        y = (x2.to(torch.bfloat16).to(torch.float64) @ w.t()).to(torch.bfloat16).to(torch.float64)
    elif precision == "int8" and x2.shape[0] == 0:
        y = x2.to(torch.float64) @ w.t()
    elif precision == "int8" and act_quant == "row":
        q, lo, step = quantize_rows_reference(x2, act_qmax)
        y = (lo + step * q) @ w.t()
    elif precision == "int8":
        q, step, zp = quantize_tensor_reference(x2, act_qmax)
        y = (step * (q - zp)) @ w.t()
    else:
        y = x2.to(torch.float64) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(torch.float32).reshape(*x.shape[:-1], w_q.shape[0])
