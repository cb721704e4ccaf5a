"""CPU hot-tier products: one task's masked weight materialised once in a compute precision, then dense products.

Semantics (same as :func:`service.kernels.reference.masked_linear_reference`)::

    y = x · (deq(W_q) ⊙ μ)ᵀ + b,   deq(W_q)[o, i] = W_q[o, i] · scale[o]

* ``fp32``: ``deq(W_q) ⊙ μ`` in float32, ``F.linear`` (the reference arithmetic).
* ``bf16``: ``deq(W_q) ⊙ μ`` rounded to bfloat16; activations cast to bfloat16,
  oneDNN bf16 GEMM (AVX-512 BF16 / AMX where the CPU has them), result float32.
* ``int8``: ``W_q ⊙ μ`` is still int8 with the backbone's per-channel scales,
  so the int8 hot weight is the exact served weight; it is prepacked once for
  oneDNN (``torch.ops.onednn.qlinear_prepack``). Activations are quantized
  per token row, symmetric: ``s_r = max_i |x[r, i]| / 127``, stored as uint8
  with zero point 128; ``torch.ops.onednn.qlinear_pointwise`` computes
  ``Σ_i (x_q[r, i]) · W_q[o, i] · scale[o]`` (exact int32 accumulation), then
  ``y[r, o] = s_r · that + b[o]``. Per-row scales make a row's result
  independent of the other rows in its batch (a mixed batch equals the
  single-task passes). These are the plain-tensor oneDNN ops PyTorch's
  inductor x86 int8 lowering uses; the quantized-tensor API
  (``torch.ao.quantization``, ``quantize_per_channel``) is deprecated in this
  torch and not used.

Measured on a 2-core AMD EPYC (avx512_bf16, avx512_vnni, no AMX), torch 2.13,
one 1536x384 matrix: 1,408 token rows fp32 7.0 ms, bf16 2.1 ms, int8 1.5 ms;
32 rows 0.25 / 0.11 / 0.08 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

PRECISIONS = ("fp32", "bf16", "int8")
"""Every compute precision :func:`materialize` accepts."""

_ZERO_POINT = 128  # uint8 activations: x_u8 = round(x / s_r) + 128


@dataclass
class HotWeight:
    """One matrix of one task materialised in ``precision``.

    ``weight``: fp32 / bf16 ``[out, in]``, or (int8) the oneDNN-prepacked int8 ``W_q ⊙ μ``;
    ``scale``: float32 ``[out]`` per-channel scales (int8 only); ``bias``: float32 ``[out]`` or None.
    """

    precision: str
    out_features: int
    in_features: int
    weight: torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor | None

    def nbytes(self) -> int:
        """Bytes held by this form's own tensors (the bias is the backbone's, shared). For int8 the
        prepacked oneDNN tensor is opaque: its logical size (1 byte per weight) is counted."""
        n = self.weight.numel() * self.weight.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n


def int8_available() -> bool:
    """Whether the oneDNN int8 ops exist in this torch build."""
    return hasattr(torch.ops.onednn, "qlinear_prepack") and hasattr(torch.ops.onednn, "qlinear_pointwise") \
        and torch.backends.mkldnn.is_available()


def cpu_features() -> frozenset[str]:
    """CPU features relevant to the precision choice, from ``/proc/cpuinfo`` flags (Linux) and torch's
    capability report (``torch.backends.cpu.get_cpu_capability()``, e.g. "AVX512")."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        flags.add("torch_" + torch.backends.cpu.get_cpu_capability().lower())
    except (AttributeError, RuntimeError):
        pass
    keep = {"avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16", "avx512f", "avx2"}
    return frozenset(f for f in flags if f in keep or f.startswith("torch_"))


def auto_precision(features: frozenset[str] | set[str]) -> str:
    """The precision "auto" means on a CPU with ``features`` (from :func:`cpu_features`).

    int8 where the CPU has VNNI (avx512_vnni, avx_vnni or amx_int8) and the oneDNN int8 ops exist:
    fastest at every batch size measured (module docstring); else bf16 where it has AVX-512 BF16 or
    AMX-BF16 (oneDNN bf16 GEMM, 2-3x float32); else fp32.
    """
    if features & {"avx512_vnni", "avx_vnni", "amx_int8"} and int8_available():
        return "int8"
    if features & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    return "fp32"


def materialize(w_q: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None,
                precision: str) -> HotWeight:
    """The hot form of ``deq(W_q) ⊙ μ`` in ``precision``.

    Args:
        w_q: int8 ``[out, in]``; scale: float32 ``[out]``.
        mask: bool ``[out, in]`` (True keeps), or None (nothing pruned).
        bias: ``[out]`` or None (kept as a float32 reference).
        precision: one of :data:`PRECISIONS`.
    Raises:
        ValueError: unknown precision, wrong dtypes or shapes. RuntimeError: int8 without the oneDNN ops.
    """
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"w_q must be int8 [out, in], got {w_q.dtype} {list(w_q.shape)}")
    out, in_ = w_q.shape
    if tuple(scale.shape) != (out,):
        raise ValueError(f"scale must be [{out}], got {list(scale.shape)}")
    if mask is not None and tuple(mask.shape) != (out, in_):
        raise ValueError(f"mask must be [{out}, {in_}], got {list(mask.shape)}")
    b = None if bias is None else bias.detach().to(torch.float32)
    if precision == "int8":
        if not int8_available():
            raise RuntimeError("CPU precision int8 needs torch's oneDNN int8 ops (torch.ops.onednn.qlinear_*), "
                               "absent from this torch build; use bf16 or fp32")
        q = w_q if mask is None else w_q * mask.to(torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)
        return HotWeight("int8", out, in_, packed, scale.detach().to(torch.float32).contiguous(), b)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    w = w_q.to(torch.float32) * scale.to(torch.float32)[:, None]
    if mask is not None:
        w = w * mask
    if precision == "bf16":
        return HotWeight("bf16", out, in_, w.to(torch.bfloat16).contiguous(), None, b)
    return HotWeight("fp32", out, in_, w.contiguous(), None, b)


def hot_linear(x: torch.Tensor, hot: HotWeight) -> torch.Tensor:
    """``y = x · (deq(W_q) ⊙ μ)ᵀ + b`` with ``hot`` from :func:`materialize`.

    Args:
        x: float32 (or bfloat16) ``[..., in]``.
    Returns:
        float32 ``[..., out]``.
    """
    if hot.precision == "fp32":
        return F.linear(x.to(torch.float32), hot.weight, hot.bias)
    if hot.precision == "bf16":
        y = F.linear(x.to(torch.bfloat16), hot.weight)
        return y.float() + hot.bias if hot.bias is not None else y.float()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, hot.in_features).to(torch.float32)
    s = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127.0  # [rows, 1] per-token scales
    xq = torch.round(x2 / s).add_(_ZERO_POINT).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, _ZERO_POINT, hot.weight, hot.scale, _W_ZERO_POINTS(hot), None,
                                           1.0, 0, torch.float32, "none", [], "")
    y = y * s
    if hot.bias is not None:
        y += hot.bias
    return y.reshape(*lead, hot.out_features)


def _W_ZERO_POINTS(hot: HotWeight) -> torch.Tensor:  # noqa: N802 - a cached constant per shape
    zp = _ZPS.get(hot.out_features)
    if zp is None:
        zp = _ZPS[hot.out_features] = torch.zeros(hot.out_features, dtype=torch.long)
    return zp


_ZPS: dict[int, torch.Tensor] = {}
