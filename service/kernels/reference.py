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
