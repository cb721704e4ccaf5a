"""Fused Triton masked matrix products over the int8 backbone (CUDA path).

Semantics (same as :func:`service.kernels.reference.masked_linear_reference`)::

    y = x · (deq(W_q) ⊙ μ)ᵀ + b,   deq(W_q)[o, i] = W_q[o, i] · scale[o]

Because ``scale`` is per output channel it factors out of the sum over ``in``::

    y[r, o] = scale[o] · Σ_i x[r, i] · (W_q ⊙ μ)[o, i] + b[o]

so each kernel tile loads int8 weights and the packed mask words, zeroes the
pruned weights in registers (the masked int8 values are exact in fp16/bf16),
multiplies with ``tl.dot`` into a float32 accumulator and applies ``scale``
and ``b`` once in the epilogue. Nothing of size ``[out, in]`` is materialised
per task or per request.

Kernel mask layout ("mask words"), made once when a task is loaded
(:func:`relayout_mask`): int32 ``[out, ceil(in / 32)]``; element ``[o, i]``
is bit ``31 - i % 32`` of word ``[o, i // 32]`` (MSB first, the bundle's own
bit order within each row, so for ``in % 8 == 0`` a row's words are its
bundle bytes read big-endian, 4 at a time). Bits past ``in`` are 0. That is
1 bit per weight plus at most 31 padding bits per row. A ``[BLOCK_K, BLOCK_N]``
weight tile needs the ``[BLOCK_K / 32, BLOCK_N]`` words above it, broadcast
32-fold along K and shifted.

The mixed-task kernel (:func:`segmented_masked_linear_triton`) takes rows
sorted into task segments and one stacked tensor of every resident task's
mask words; one launch covers the whole batch (like Punica's SGMV for LoRA):
each program finds its segment and row tile from ``seg_starts`` on the device,
so the host never synchronises to build the launch.

Triton is optional: ``HAS_TRITON`` is False when it does not import, and the
wrappers then raise ``RuntimeError``. :func:`relayout_mask` and
:func:`relayout_mask_inverse` are plain torch and run anywhere. Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly; used by
the tests), except that the interpreter's ``tl.dot`` is wrong for bf16.
"""

from __future__ import annotations

import torch

from service.kernels.packing import pack_bits, unpack_bits

try:  # optional dependency: the CUDA path only
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

WORD_BITS = 32
"""Mask bits per int32 word of the kernel layout."""

_SUPPORTED_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

NUM_WARPS = 4
"""Warps per program of both kernels unless the caller passes ``num_warps``."""

NUM_STAGES = 3
"""Software-pipelining stages of the K loop unless the caller passes ``num_stages``."""


# --------------------------------------------------------------------------- #
# Mask re-layout (plain torch, CPU or GPU)
# --------------------------------------------------------------------------- #

def mask_words_shape(out: int, in_: int) -> tuple[int, int]:
    """Shape ``[out, ceil(in / 32)]`` of one matrix's mask words."""
    return out, (in_ + WORD_BITS - 1) // WORD_BITS


def relayout_mask(packed_uint8: torch.Tensor, out: int, in_: int) -> torch.Tensor:
    """Bundle mask bits -> kernel mask words.

    Semantics: ``words[o, w]`` holds mask elements ``[o, 32w : 32w + 32]``,
    element ``[o, i]`` at bit ``31 - i % 32`` (see the module docstring);
    bits past ``in`` are 0.

    Input shapes: ``packed_uint8`` uint8 ``[ceil(out * in / 8)]`` in the bundle's
    bit order (row-major over ``[out, in]``, MSB first in each byte), on any device.

    Returns:
        int32 ``[out, ceil(in / 32)]`` on ``packed_uint8.device``.

    Raises:
        ValueError: wrong dtype or byte count.
    """
    if packed_uint8.dtype != torch.uint8:
        raise ValueError(f"packed mask must be uint8, got {packed_uint8.dtype}")
    if out < 0 or in_ < 0:
        raise ValueError(f"shape must be non-negative, got [{out}, {in_}]")
    expected = (out * in_ + 7) // 8
    packed = packed_uint8.reshape(-1)
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes do not fit shape [{out}, {in_}] ({expected} expected)")
    n_words = mask_words_shape(out, in_)[1]
    if in_ % 8 == 0:  # every row starts on a byte boundary: its bytes as they are (no 8x bool expansion)
        row_bytes = packed.reshape(out, in_ // 8)
    else:  # rows cross bytes: each row re-packed on its own (service.kernels.packing, the bundle's bit order)
        bits = unpack_bits(packed, (out, in_))
        bits = torch.cat([bits, bits.new_zeros(out, (-in_) % 8)], dim=1)  # each row a whole number of bytes
        row_bytes = pack_bits(bits).reshape(out, (in_ + 7) // 8)
    pad = n_words * 4 - row_bytes.shape[1]
    if pad:
        row_bytes = torch.cat([row_bytes, row_bytes.new_zeros(out, pad)], dim=1)
    b = row_bytes.reshape(out, n_words, 4).to(torch.int64)  # [out, words, 4]: a word's bytes, most significant first
    words = (b[..., 0] << 24) | (b[..., 1] << 16) | (b[..., 2] << 8) | b[..., 3]  # [out, words], 0 .. 2^32-1
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32 range
    return words.to(torch.int32).contiguous()


def relayout_mask_inverse(words: torch.Tensor, out: int, in_: int) -> torch.Tensor:
    """Kernel mask words -> bool mask (inverse of :func:`relayout_mask`, for tests).

    Input shapes: ``words`` int32 ``[out, ceil(in / 32)]``.

    Returns:
        bool ``[out, in]`` (True keeps the weight).
    """
    if tuple(words.shape) != mask_words_shape(out, in_):
        raise ValueError(f"mask words of shape {list(words.shape)} do not fit [{out}, {in_}] "
                         f"({list(mask_words_shape(out, in_))} expected)")
    w = words.to(torch.int64) & 0xFFFFFFFF  # [out, words]
    row_bytes = torch.stack([(w >> 24) & 0xFF, (w >> 16) & 0xFF, (w >> 8) & 0xFF, w & 0xFF], dim=-1)  # [out, words, 4]
    bits = unpack_bits(row_bytes.to(torch.uint8).reshape(-1), (out, words.shape[1] * WORD_BITS))
    return bits[:, :in_]


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #

if HAS_TRITON:

    @triton.jit
    def _masked_tile_acc(x_ptr, w_ptr, m_ptr, offs_m, row_end, offs_n, N, K,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mw,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         IEEE: tl.constexpr):
        """acc[BLOCK_M, BLOCK_N] (fp32) = x[offs_m, :] · (W_q ⊙ μ)[offs_n, :]ᵀ, unscaled.

        Rows ``>= row_end`` and columns ``>= N`` read as zero.
        """
        BLOCK_KW: tl.constexpr = BLOCK_K // 32
        n_words = (K + 31) // 32
        offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        offs_kw = tl.arange(0, BLOCK_KW)  # [BLOCK_KW]
        shift = 31 - (offs_k % 32)  # [BLOCK_K], bit of element k in its word
        row_ok = offs_m < row_end  # [BLOCK_M]
        col_ok = offs_n < N  # [BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k  # [BLOCK_K]
            kw = k0 // 32 + offs_kw  # [BLOCK_KW]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=row_ok[:, None] & (k[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                        mask=col_ok[None, :] & (k[:, None] < K), other=0)  # [BLOCK_K, BLOCK_N] int8
            words = tl.load(m_ptr + offs_n[None, :] * stride_mn + kw[:, None] * stride_mw,
                            mask=col_ok[None, :] & (kw[:, None] < n_words), other=0)  # [BLOCK_KW, BLOCK_N]
            words = tl.reshape(tl.broadcast_to(words[:, None, :], (BLOCK_KW, 32, BLOCK_N)),
                               (BLOCK_K, BLOCK_N))  # [BLOCK_K, BLOCK_N], row k holds word k // 32
            keep = ((words >> shift[:, None]) & 1) != 0  # [BLOCK_K, BLOCK_N]
            w = tl.where(keep, w, 0).to(x.dtype)  # masked int8 values: exact in fp16/bf16/fp32
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        return acc

    @triton.jit
    def _epilogue_store(y_ptr, acc, scale_ptr, bias_ptr, offs_m, row_end, offs_n, N, stride_ym, stride_yn,
                        HAS_BIAS: tl.constexpr):
        """y[offs_m, offs_n] = acc · scale[offs_n] + b[offs_n], cast to y's dtype."""
        col_ok = offs_n < N  # [BLOCK_N]
        scale = tl.load(scale_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        y = acc * scale[None, :]  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
            y = y + bias[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 y.to(y_ptr.dtype.element_ty), mask=(offs_m < row_end)[:, None] & col_ok[None, :])

    @triton.jit
    def _masked_linear_kernel(x_ptr, w_ptr, scale_ptr, m_ptr, bias_ptr, y_ptr, M, N, K,
                              stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mw,
                              stride_ym, stride_yn,
                              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One task. Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        acc = _masked_tile_acc(x_ptr, w_ptr, m_ptr, offs_m, M, offs_n, N, K,
                               stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mw,
                               BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        _epilogue_store(y_ptr, acc, scale_ptr, bias_ptr, offs_m, M, offs_n, N, stride_ym, stride_yn, HAS_BIAS)

    @triton.jit
    def _segmented_masked_linear_kernel(x_ptr, w_ptr, scale_ptr, m_ptr, bias_ptr, y_ptr,
                                        seg_starts_ptr, seg_slots_ptr, num_segments, N, K,
                                        stride_xm, stride_xk, stride_wn, stride_wk,
                                        stride_ms, stride_mn, stride_mw, stride_ym, stride_yn,
                                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SEG_BLOCK: tl.constexpr,
                                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Mixed-task batch. Grid: (cdiv(N, BLOCK_N), cdiv(rows, BLOCK_M) + num_segments).

        Axis 1 enumerates the row tiles of all segments in order (segment 0's
        tiles, then segment 1's, ...); that count never exceeds the grid bound,
        and programs past it return at once.
        """
        pid_n = tl.program_id(0)
        pid_t = tl.program_id(1)
        # Find this program's segment: tiles per segment, inclusive prefix sum.
        s = tl.arange(0, SEG_BLOCK)  # [SEG_BLOCK]
        s_ok = s < num_segments
        starts = tl.load(seg_starts_ptr + s, mask=s_ok, other=0)  # [SEG_BLOCK]
        ends = tl.load(seg_starts_ptr + s + 1, mask=s_ok, other=0)  # [SEG_BLOCK]
        tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # [SEG_BLOCK], 0 for empty and padding segments
        tiles_end = tl.cumsum(tiles, 0)  # [SEG_BLOCK], first tile index after each segment
        if pid_t >= tl.sum(tiles):
            return
        seg = tl.sum((tiles_end <= pid_t).to(tl.int32))  # scalar, the segment holding tile pid_t
        tiles_before = tl.sum(tl.where(s < seg, tiles, 0))
        seg_start = tl.sum(tl.where(s == seg, starts, 0))
        seg_end = tl.sum(tl.where(s == seg, ends, 0))
        slot = tl.load(seg_slots_ptr + seg).to(tl.int64)

        offs_m = seg_start + (pid_t - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        acc = _masked_tile_acc(x_ptr, w_ptr, m_ptr + slot * stride_ms, offs_m, seg_end, offs_n, N, K,
                               stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mw,
                               BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        _epilogue_store(y_ptr, acc, scale_ptr, bias_ptr, offs_m, seg_end, offs_n, N, stride_ym, stride_yn, HAS_BIAS)


# --------------------------------------------------------------------------- #
# Wrappers
# --------------------------------------------------------------------------- #

def _check_common(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the torch paths (service.kernels.selector)")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in], got shape {list(x.shape)}")
    if x.dtype not in _SUPPORTED_X_DTYPES:
        raise ValueError(f"x dtype must be one of {[str(d) for d in _SUPPORTED_X_DTYPES]}, got {x.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"w_q must be int8 [out, in], got {w_q.dtype} {list(w_q.shape)}")
    if x.shape[1] != w_q.shape[1]:
        raise ValueError(f"x has {x.shape[1]} input features, w_q expects {w_q.shape[1]}")
    if tuple(scale.shape) != (w_q.shape[0],):
        raise ValueError(f"scale must be [{w_q.shape[0]}], got {list(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (w_q.shape[0],):
        raise ValueError(f"bias must be [{w_q.shape[0]}], got {list(bias.shape)}")
    devices = {t.device for t in (x, w_q, scale) if t is not None} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def pick_blocks(rows_per_tile: int, block_m: int | None, block_n: int | None,
                block_k: int | None, dtype: torch.dtype = torch.float16) -> tuple[int, int, int]:
    """Tile sizes ``(BLOCK_M, BLOCK_N, BLOCK_K)`` a launch uses; a None argument takes its default.

    float16 / bfloat16 activations (tensor cores): BLOCK_M follows the (average) rows per task
    segment, the next power of two clamped to 16..64; BLOCK_N 128; BLOCK_K 64. float32 (the
    "ieee" dot on CUDA cores) takes smaller tiles: BLOCK_M 16..32, BLOCK_N 64, BLOCK_K 32. With the
    half-precision tiles the float32 kernels spill 0.6-8.8 KB of registers per thread to the stack
    on sm_80/sm_90; with these, at most 16 bytes (``benchmarks/kernel_compile.py``, compiled for
    those targets without a GPU).

    Raises:
        ValueError: a block that is not a power of two >= 16, or ``block_k`` not a multiple of 32.
    """
    wide = dtype != torch.float32
    if block_m is None:
        block_m = min(64 if wide else 32, max(16, triton.next_power_of_2(max(rows_per_tile, 1))))
    if block_n is None:
        block_n = 128 if wide else 64
    if block_k is None:
        block_k = 64 if wide else 32
    if block_k % WORD_BITS or block_k <= 0:
        raise ValueError(f"block_k must be a positive multiple of {WORD_BITS}, got {block_k}")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    return block_m, block_n, block_k


def masked_linear_triton(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, mask_words: torch.Tensor,
                         bias: torch.Tensor | None, *, block_m: int | None = None, block_n: int | None = None,
                         block_k: int | None = None, num_warps: int = NUM_WARPS,
                         num_stages: int = NUM_STAGES) -> torch.Tensor:
    """One task's masked linear layer in one fused kernel.

    Semantics: ``y = x · (deq(W_q) ⊙ μ)ᵀ + b`` with ``μ`` read from ``mask_words``
    (accumulated in float32, returned in ``x.dtype``).

    Input shapes:
        x: ``[rows, in]`` float16 / bfloat16 / float32.
        w_q: int8 ``[out, in]``.
        scale: float32 ``[out]``.
        mask_words: int32 ``[out, ceil(in / 32)]`` from :func:`relayout_mask`.
        bias: float ``[out]`` or None.
        block_m, block_n, block_k: tile sizes (powers of two >= 16, block_k a
            multiple of 32); None picks defaults.

    Returns:
        ``[rows, out]`` in ``x.dtype``.
    """
    _check_common(x, w_q, scale, bias)
    out, in_ = w_q.shape
    if mask_words.dtype != torch.int32 or tuple(mask_words.shape) != mask_words_shape(out, in_):
        raise ValueError(f"mask_words must be int32 {list(mask_words_shape(out, in_))}, "
                         f"got {mask_words.dtype} {list(mask_words.shape)}")
    rows = x.shape[0]
    y = torch.empty(rows, out, dtype=x.dtype, device=x.device)
    if rows == 0 or out == 0:
        return y
    if in_ == 0:
        return y.copy_(torch.zeros_like(y) if bias is None else bias.to(x.dtype).expand_as(y))
    bm, bn, bk = pick_blocks(rows, block_m, block_n, block_k, x.dtype)
    grid = (triton.cdiv(out, bn), triton.cdiv(rows, bm))
    _masked_linear_kernel[grid](
        x, w_q, scale, mask_words, bias if bias is not None else scale, y, rows, out, in_,
        x.stride(0), x.stride(1), w_q.stride(0), w_q.stride(1), mask_words.stride(0), mask_words.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages)
    return y


def segmented_masked_linear_triton(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor,
                                   mask_words_slots: torch.Tensor, seg_starts: torch.Tensor,
                                   seg_slots: torch.Tensor, bias: torch.Tensor | None, *,
                                   block_m: int | None = None, block_n: int | None = None,
                                   block_k: int | None = None, num_warps: int = NUM_WARPS,
                                   num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Mixed-task batch in one launch: each row segment uses its task's mask.

    Semantics: for every segment ``s``, rows ``seg_starts[s] : seg_starts[s+1]`` get
    ``y = x · (deq(W_q) ⊙ μ_{seg_slots[s]})ᵀ + b`` (as
    :func:`service.kernels.reference.segmented_masked_linear_reference`).
    Rows outside every segment are left uninitialised. Segment values are not
    checked (that would need a device sync): callers keep ``seg_starts``
    non-decreasing from 0 to at most ``rows`` and ``seg_slots`` within ``[0, slots)``.

    Input shapes:
        x: ``[rows, in]`` float16 / bfloat16 / float32, rows sorted by segment.
        w_q: int8 ``[out, in]``; scale: float32 ``[out]``; bias: float ``[out]`` or None.
        mask_words_slots: int32 ``[slots, out, ceil(in / 32)]``, one
            :func:`relayout_mask` result per resident task.
        seg_starts: int32 ``[num_segments + 1]`` on ``x.device``.
        seg_slots: int32 ``[num_segments]`` on ``x.device``.

    Returns:
        ``[rows, out]`` in ``x.dtype``.
    """
    _check_common(x, w_q, scale, bias)
    out, in_ = w_q.shape
    if mask_words_slots.dtype != torch.int32 or mask_words_slots.dim() != 3 \
            or tuple(mask_words_slots.shape[1:]) != mask_words_shape(out, in_):
        raise ValueError(f"mask_words_slots must be int32 [slots, {', '.join(map(str, mask_words_shape(out, in_)))}], "
                         f"got {mask_words_slots.dtype} {list(mask_words_slots.shape)}")
    num_segments = seg_slots.numel()
    if seg_starts.dim() != 1 or seg_starts.numel() != num_segments + 1:
        raise ValueError(f"seg_starts must be [num_segments + 1] = [{num_segments + 1}], got {list(seg_starts.shape)}")
    for name, t in (("seg_starts", seg_starts), ("seg_slots", seg_slots), ("mask_words_slots", mask_words_slots)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    seg_starts = seg_starts.to(torch.int32)
    seg_slots = seg_slots.to(torch.int32)
    rows = x.shape[0]
    y = torch.empty(rows, out, dtype=x.dtype, device=x.device)
    if rows == 0 or out == 0 or num_segments == 0:
        return y
    if in_ == 0:
        return y.copy_(torch.zeros_like(y) if bias is None else bias.to(x.dtype).expand_as(y))
    bm, bn, bk = pick_blocks(rows // num_segments, block_m, block_n, block_k, x.dtype)
    grid = (triton.cdiv(out, bn), triton.cdiv(rows, bm) + num_segments)
    _segmented_masked_linear_kernel[grid](
        x, w_q, scale, mask_words_slots, bias if bias is not None else scale, y,
        seg_starts, seg_slots, num_segments, out, in_,
        x.stride(0), x.stride(1), w_q.stride(0), w_q.stride(1),
        mask_words_slots.stride(0), mask_words_slots.stride(1), mask_words_slots.stride(2),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        SEG_BLOCK=triton.next_power_of_2(num_segments),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages)
    return y
