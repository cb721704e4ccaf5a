"""Random masked-matmul problems shared by the kernel tests."""

from __future__ import annotations

import torch


def masked_problem(out: int, in_: int, sparsity: float, slots: int = 1, seed: int = 0):
    """A random int8 backbone matrix and ``slots`` task masks of about the given sparsity.

    Returns:
        ``(w_q, scale, bias, masks)``: int8 ``[out, in]``, float32 ``[out]`` per-channel scales
        (positive), float32 ``[out]`` bias, bool ``[slots, out, in]`` (True keeps the weight;
        each weight pruned with probability ``sparsity``).
    """
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randint(-127, 128, (out, in_), dtype=torch.int8, generator=g)
    scale = torch.rand(out, generator=g) * 0.02 + 1e-3
    bias = torch.randn(out, generator=g)
    masks = torch.rand(slots, out, in_, generator=g) >= sparsity  # True keeps
    return w_q, scale, bias, masks
