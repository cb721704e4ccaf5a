"""Fused Triton masked kernels vs the torch references.

Run on CUDA, or on CPU under the Triton interpreter::

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels/test_triton_masked.py -q

Without CUDA and without ``TRITON_INTERPRET=1`` the kernel tests skip; the
mask re-layout tests (plain torch) always run.
"""

from __future__ import annotations

import os

import pytest
import torch

from service.kernels import triton_masked as tm
from service.kernels.packing import pack_bits
from service.kernels.reference import masked_linear_reference, segmented_masked_linear_reference
from tests.kernels.problems import masked_problem

ON_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not ON_CUDA else "cuda"

requires_triton = pytest.mark.skipif(
    not (tm.HAS_TRITON and (ON_CUDA or INTERPRET)),
    reason="needs triton and either CUDA or TRITON_INTERPRET=1")
requires_gpu = pytest.mark.skipif(
    not (tm.HAS_TRITON and ON_CUDA and not INTERPRET),
    reason="full sweep is too slow under the Triton interpreter; needs CUDA")

MINILM_SHAPES = [(384, 384), (1536, 384), (384, 1536)]  # [out, in]
BERT_BASE_SHAPES = [(768, 768), (3072, 768), (768, 3072)]
SPARSITIES = [0.0, 0.01, 0.13, 0.5]
ROWS = [5] if INTERPRET else [5, 300]

# Relative tolerance of one output: float32 accumulation in a different order,
# then one rounding to the output dtype.
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}


def _x(rows: int, in_: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_, generator=g).to(dtype)


def _words(mask: torch.Tensor) -> torch.Tensor:
    out, in_ = mask.shape
    return tm.relayout_mask(pack_bits(mask), out, in_)


def _on(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    rtol = RTOL[ref.dtype]
    atol = rtol * max(1.0, float(ref.float().abs().amax())) if ref.numel() else rtol
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol)


def _skip_unsupported(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's tl.dot gives wrong results for bf16 (numpy has no bf16); CUDA only")


# --------------------------------------------------------------------------- #
# Re-layout (plain torch)
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (5, 40), (7, 64), (2, 100)] + MINILM_SHAPES + BERT_BASE_SHAPES)
def test_relayout_round_trip(shape):
    out, in_ = shape
    mask = torch.rand(out, in_, generator=torch.Generator().manual_seed(out * 7 + in_)) >= 0.5
    words = tm.relayout_mask(pack_bits(mask), out, in_)
    assert words.dtype == torch.int32
    assert tuple(words.shape) == (out, (in_ + 31) // 32)  # 1 bit per weight + row padding
    assert torch.equal(tm.relayout_mask_inverse(words, out, in_), mask)


@pytest.mark.parametrize("in_", [37, 64])  # general path and byte-aligned fast path
def test_relayout_bit_positions(in_):
    # Element [o, i] lives at bit 31 - i % 32 of word [o, i // 32]; padding bits stay 0.
    out = 2
    for o, i in [(0, 0), (0, 31), (1, 32), (1, in_ - 1)]:
        mask = torch.zeros(out, in_, dtype=torch.bool)
        mask[o, i] = True
        words = tm.relayout_mask(pack_bits(mask), out, in_)
        expected = torch.zeros_like(words)
        bit = 31 - i % 32
        expected[o, i // 32] = -(2**31) if bit == 31 else 2**bit
        assert torch.equal(words, expected), (o, i)


def test_relayout_all_ones_leaves_padding_zero():
    words = tm.relayout_mask(pack_bits(torch.ones(3, 40, dtype=torch.bool)), 3, 40)
    assert (words[:, 0] == -1).all()
    assert (words[:, 1] == (0xFF << 24) - 2**32).all()  # 8 real bits, then 24 zero padding bits


def test_relayout_rejects_wrong_byte_count():
    with pytest.raises(ValueError, match="do not fit"):
        tm.relayout_mask(torch.zeros(5, dtype=torch.uint8), 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        tm.relayout_mask(torch.zeros(8, dtype=torch.int32), 8, 8)


# --------------------------------------------------------------------------- #
# Single-task fused kernel
# --------------------------------------------------------------------------- #

def _check_single(out, in_, sparsity, dtype, rows, with_bias=True, **blocks):
    w_q, scale, bias, masks = masked_problem(out, in_, sparsity)
    mask = masks[0]
    bias = bias if with_bias else None
    x = _x(rows, in_, dtype)
    ref = masked_linear_reference(x, w_q, scale, mask, bias)
    y = tm.masked_linear_triton(*_on(x, w_q, scale, _words(mask), bias), **blocks)
    _assert_matches(y, ref)
    return x, w_q, scale, bias, y


@requires_triton
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", MINILM_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_masked_linear_minilm_shapes(shape, sparsity, rows):
    _check_single(*shape, sparsity, torch.float16, rows)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.0, 0.13])
def test_masked_linear_dtypes(dtype, sparsity):
    _skip_unsupported(dtype)
    _check_single(384, 384, sparsity, dtype, 7)


@requires_triton
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", BERT_BASE_SHAPES)
def test_masked_linear_bert_base_shapes(shape, sparsity):
    # 3 rows and wide tiles keep the interpreter quick; more rows and dtypes in the GPU-only sweep below.
    _check_single(*shape, sparsity, torch.float16, 3, block_n=256, block_k=256)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", BERT_BASE_SHAPES)
@pytest.mark.parametrize("rows", [1, 128, 1000])
def test_masked_linear_bert_base_sweep(shape, sparsity, dtype, rows):
    _check_single(*shape, sparsity, dtype, rows)


@requires_triton
def test_masked_linear_ragged_edges_and_no_bias():
    # in not a multiple of 32 (a partial mask word), out and rows not multiples of the tiles.
    _check_single(50, 70, 0.5, torch.float32, 33, with_bias=False, block_m=16, block_n=16, block_k=32)


@requires_triton
def test_masked_linear_mask_is_applied():
    # The masked output must differ from the unmasked one (guards against ignoring the mask bits).
    w_q, scale, bias, masks = masked_problem(64, 96, 0.5)
    x = _x(4, 96, torch.float32)
    y = tm.masked_linear_triton(*_on(x, w_q, scale, _words(masks[0]), bias)).cpu()
    y_full = tm.masked_linear_triton(*_on(x, w_q, scale, _words(torch.ones(64, 96, dtype=torch.bool)), bias)).cpu()
    _assert_matches(y_full, masked_linear_reference(x, w_q, scale, torch.ones(64, 96, dtype=torch.bool), bias))
    assert (y - y_full).abs().max() > 1.0


@requires_triton
def test_masked_linear_validates_shapes():
    w_q, scale, bias, masks = masked_problem(32, 64, 0.1)
    x = _x(2, 64, torch.float32)
    with pytest.raises(ValueError, match="mask_words"):
        tm.masked_linear_triton(x, w_q, scale, _words(masks[0])[:, :1], bias)
    with pytest.raises(ValueError, match="input features"):
        tm.masked_linear_triton(_x(2, 32, torch.float32), w_q, scale, _words(masks[0]), bias)
    with pytest.raises(ValueError, match="int8"):
        tm.masked_linear_triton(x, w_q.float(), scale, _words(masks[0]), bias)


# --------------------------------------------------------------------------- #
# Mixed-task (segmented) kernel
# --------------------------------------------------------------------------- #

# 4 resident tasks; 5 segments with uneven sizes, an empty one, slots out of order.
SEG_LENGTHS = [5, 0, 17, 1, 9]
SEG_SLOTS = [2, 0, 3, 1, 0]


def _segments(lengths, slots):
    starts = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return starts, torch.tensor(slots, dtype=torch.int32)


def _check_segmented(out, in_, dtype, lengths=SEG_LENGTHS, slots=SEG_SLOTS, n_tasks=4, sparsity=0.13, **blocks):
    w_q, scale, bias, masks = masked_problem(out, in_, sparsity, slots=n_tasks)
    seg_starts, seg_slots = _segments(lengths, slots)
    x = _x(int(seg_starts[-1]), in_, dtype)
    ref = segmented_masked_linear_reference(x, w_q, scale, masks, seg_starts, seg_slots, bias)
    words = torch.stack([_words(m) for m in masks])  # [slots, out, ceil(in/32)]
    y = tm.segmented_masked_linear_triton(*_on(x, w_q, scale, words, seg_starts, seg_slots, bias), **blocks)
    _assert_matches(y, ref)
    return x, w_q, scale, bias, masks, y


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(384, 1536), (1536, 384)])
def test_segmented_mixed_batch(shape, dtype):
    _skip_unsupported(dtype)
    x, w_q, scale, bias, masks, y = _check_segmented(*shape, dtype, block_m=16)
    # Each segment really used its own task's mask: swapping in another task's mask changes the rows.
    a, b = sum(SEG_LENGTHS[:2]), sum(SEG_LENGTHS[:3])  # segment 2 (slot 3)
    wrong = masked_linear_reference(x[a:b], w_q, scale, masks[1], bias)
    assert (y[a:b].float().cpu() - wrong.float()).abs().max() > 1e-2


@requires_triton
def test_segmented_bert_base_interpreter():
    _check_segmented(768, 3072, torch.float16, lengths=[3, 0, 2, 1], slots=[1, 3, 0, 2],
                     block_m=16, block_n=256, block_k=256)


@requires_triton
def test_segmented_many_small_segments():
    # More segments than a power of two, several tiles per segment, segments sharing a slot.
    lengths = [1, 40, 0, 3, 0, 0, 18, 2, 33]
    slots = [0, 1, 2, 3, 1, 0, 2, 3, 1]
    _check_segmented(48, 64, torch.float32, lengths=lengths, slots=slots, sparsity=0.5,
                     block_m=16, block_n=16, block_k=32)


@requires_triton
def test_segmented_single_segment_equals_single_task():
    w_q, scale, bias, masks = masked_problem(96, 128, 0.13, slots=3)
    x = _x(21, 128, torch.float16)
    words = torch.stack([_words(m) for m in masks])
    seg_starts, seg_slots = _segments([21], [2])
    y_seg = tm.segmented_masked_linear_triton(*_on(x, w_q, scale, words, seg_starts, seg_slots, bias), block_m=16)
    y_one = tm.masked_linear_triton(*_on(x, w_q, scale, words[2].contiguous(), bias), block_m=16)
    assert torch.equal(y_seg.cpu(), y_one.cpu())


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", MINILM_SHAPES + BERT_BASE_SHAPES)
@pytest.mark.parametrize("n_tasks", [1, 8, 64])
def test_segmented_gpu_sweep(shape, dtype, n_tasks):
    g = torch.Generator().manual_seed(n_tasks)
    lengths = (torch.rand(n_tasks, generator=g) * 300).long().tolist()
    if n_tasks > 1:
        lengths[0] = 0  # an empty segment
    slots = torch.randperm(n_tasks, generator=g).tolist()
    _check_segmented(*shape, dtype, lengths=lengths, slots=slots, n_tasks=n_tasks)


@requires_triton
def test_segmented_validates_metadata():
    w_q, scale, bias, masks = masked_problem(32, 64, 0.1, slots=2)
    words = torch.stack([_words(m) for m in masks])
    x = _x(4, 64, torch.float32)
    with pytest.raises(ValueError, match="num_segments"):
        tm.segmented_masked_linear_triton(x, w_q, scale, words, torch.tensor([0, 4], dtype=torch.int32),
                                          torch.tensor([0, 1], dtype=torch.int32), bias)
    with pytest.raises(ValueError, match="mask_words_slots"):
        tm.segmented_masked_linear_triton(x, w_q, scale, words[0], torch.tensor([0, 4], dtype=torch.int32),
                                          torch.tensor([0], dtype=torch.int32), bias)


@requires_triton
def test_empty_batches():
    w_q, scale, bias, masks = masked_problem(32, 64, 0.1, slots=2)
    words = torch.stack([_words(m) for m in masks])
    x = _x(0, 64, torch.float16)
    y = tm.masked_linear_triton(*_on(x, w_q, scale, words[0].contiguous(), bias))
    assert tuple(y.shape) == (0, 32) and y.dtype == torch.float16
    y = tm.segmented_masked_linear_triton(*_on(x, w_q, scale, words, torch.zeros(3, dtype=torch.int32),
                                               torch.tensor([1, 0], dtype=torch.int32), bias))
    assert tuple(y.shape) == (0, 32)
