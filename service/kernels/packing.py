"""Mask bits on the torch side, in the bundle's bit order: the one module every torch path packs and unpacks with.

Bit order (:mod:`mask_store.format`, the same as ``numpy.packbits(bitorder="big")``): row-major over ``[out, in]``,
element ``i`` in byte ``i // 8`` at bit ``7 - i % 8`` (MSB first); 1 keeps the weight; padding bits are 0.

:func:`pack_bits` is the bundle writer's own :func:`mask_store.format.pack_mask` (packing happens when a mask is
written or set up, never per request). :func:`unpack_bits` runs on any device (a task's mask is unpacked where its
weights live, a GPU's included), so it spells the order here once; tests check it against ``unpack_mask``.
The Triton kernels' word layout (:func:`service.kernels.triton_masked.relayout_mask`) is built from these bytes.
"""

from __future__ import annotations

import torch

from mask_store.format import pack_mask

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)  # bit of element i % 8 in its byte, MSB first


def unpack_bits(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[ceil(out*in/8)]`` -> bool ``[out, in]``, on ``packed``'s device.

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
    """bool (or 0/1) ``[out, in]`` -> uint8 ``[ceil(out*in/8)]`` on ``mask``'s device (inverse of
    :func:`unpack_bits`): :func:`mask_store.format.pack_mask`'s bytes, packed on the CPU (a device mask makes one
    round trip to the host)."""
    packed = pack_mask(mask.detach().to("cpu").numpy())
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(mask.device) if packed else \
        torch.empty(0, dtype=torch.uint8, device=mask.device)
