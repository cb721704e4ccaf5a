"""CPU dense-mask masked product (the ``cpu_dense`` path, chosen for high sparsity).

``W ⊙ μ`` is formed per call in a temporary buffer from the backbone's shared
float32 ``deq(W_q)``, then multiplied: one extra pass over the weight, no
per-task copy kept. The low-sparsity CPU path (``cpu_complement``) is
:func:`service.kernels.sparse_complement.complement_linear`, shared with CUDA.

Semantics (same as :func:`service.kernels.reference.masked_linear_reference`,
up to float rounding)::

    y = x · (deq(W_q) ⊙ μ)ᵀ + b
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def masked_linear_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        mask: torch.Tensor) -> torch.Tensor:
    """``y = x · (W ⊙ μ)ᵀ + b`` with ``W ⊙ μ`` formed in a temporary buffer.

    Args:
        x: ``[..., in]`` activations, float32 (or the weight's dtype).
        weight: ``[out, in]`` de-quantized weight, same dtype as ``x``.
        bias: ``[out]`` or None.
        mask: bool ``[out, in]``.

    Returns:
        ``[..., out]``, the dtype of ``x``.
    """
    return F.linear(x, weight * mask, bias)
