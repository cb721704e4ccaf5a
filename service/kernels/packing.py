"""Torch-side pack/unpack of mask bits in the bundle's bit order.

Bit order (``mask_store.format``): row-major over ``[out, in]``, element ``i``
in byte ``i // 8`` at bit ``7 - i % 8`` (MSB first); 1 keeps the weight.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[ceil(out*in/8)]`` -> bool ``[out, in]``.

    Raises:
        ValueError: the byte count does not fit ``shape``.
    """
    n = shape[0] * shape[1]
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"{packed.numel()} packed bytes do not fit shape {list(shape)} ({(n + 7) // 8} expected)")
    shifts = _SHIFTS.to(packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].reshape(shape).to(torch.bool)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[out, in]`` -> uint8 ``[ceil(out*in/8)]`` (inverse of :func:`unpack_bits`)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = _SHIFTS.to(mask.device)
    return (flat.reshape(-1, 8) << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)
