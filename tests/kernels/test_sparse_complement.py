"""Sparse-complement path vs the torch references (CPU, float32; CUDA float16 when present)."""

from __future__ import annotations

import pytest
import torch

from service.kernels import sparse_complement as sc
from service.kernels.packing import pack_bits
from service.kernels.reference import masked_linear_reference, segmented_masked_linear_reference
from tests.kernels.problems import masked_problem

SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768)]  # [out, in]
SPARSITIES = [0.0, 0.01, 0.13, 0.5]


def _assert_close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    atol = rtol * float(ref.abs().max().clamp_min(1.0))
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), rtol=rtol, atol=atol)


def test_dequantize_weight_is_per_output_channel():
    w_q = torch.tensor([[1, -2], [3, 127]], dtype=torch.int8)
    scale = torch.tensor([0.5, 2.0])
    w = sc.dequantize_weight(w_q, scale, torch.float32)
    assert torch.equal(w, torch.tensor([[0.5, -1.0], [6.0, 254.0]]))
    assert sc.dequantize_weight(w_q, scale).dtype == torch.float16


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_pruned_csr_holds_exactly_the_pruned_entries(sparsity):
    out, in_ = 64, 96
    w_q, scale, _, masks = masked_problem(out, in_, sparsity)
    weight = sc.dequantize_weight(w_q, scale, torch.float32)
    csr = sc.pruned_csr(weight, pack_bits(masks[0]))
    n_pruned = int((~masks[0]).sum())
    if n_pruned == 0:
        assert csr is None and sc.csr_nbytes(csr) == 0
        return
    assert csr.layout == torch.sparse_csr
    assert csr.crow_indices().dtype == torch.int32 and csr.col_indices().dtype == torch.int32
    assert torch.equal(csr.to_dense(), weight * ~masks[0])
    assert csr.values().numel() == n_pruned
    # Memory proportional to the pruned count: int32 column + fp32 value each, plus row offsets.
    assert sc.csr_nbytes(csr) == n_pruned * (4 + 4) + (out + 1) * 4


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_complement_linear_matches_reference(shape, sparsity):
    out, in_ = shape
    w_q, scale, bias, masks = masked_problem(out, in_, sparsity)
    weight = sc.dequantize_weight(w_q, scale, torch.float32)
    x = torch.randn(7, in_, generator=torch.Generator().manual_seed(1))
    csr = sc.pruned_csr(weight, pack_bits(masks[0]))
    y = sc.complement_linear(x, weight, bias, csr)
    _assert_close(y, masked_linear_reference(x, w_q, scale, masks[0], bias))


def test_complement_linear_without_bias_and_mask_matters():
    w_q, scale, _, masks = masked_problem(48, 80, 0.5)
    weight = sc.dequantize_weight(w_q, scale, torch.float32)
    x = torch.randn(5, 80)
    y = sc.complement_linear(x, weight, None, sc.pruned_csr(weight, pack_bits(masks[0])))
    _assert_close(y, masked_linear_reference(x, w_q, scale, masks[0], None))
    assert (y - x @ weight.t()).abs().max() > 1.0


@pytest.mark.parametrize("shape", [(384, 1536), (3072, 768)])
def test_segmented_complement_mixed_batch(shape):
    # 4 resident tasks (one with nothing pruned), uneven segments, an empty one, a repeated slot.
    out, in_ = shape
    w_q, scale, bias, masks = masked_problem(out, in_, 0.13, slots=4)
    masks[2] = True  # nothing pruned -> CSR None
    weight = sc.dequantize_weight(w_q, scale, torch.float32)
    pruned = [sc.pruned_csr(weight, pack_bits(m)) for m in masks]
    assert pruned[2] is None
    seg_starts = torch.tensor([0, 5, 5, 22, 23, 32], dtype=torch.int32)
    seg_slots = torch.tensor([2, 0, 3, 1, 0], dtype=torch.int32)
    x = torch.randn(32, in_, generator=torch.Generator().manual_seed(2))
    y = sc.segmented_complement_linear(x, weight, bias, pruned, seg_starts, seg_slots)
    ref = segmented_masked_linear_reference(x, w_q, scale, masks, seg_starts, seg_slots, bias)
    _assert_close(y, ref)
    # Segment 2 (rows 5..22, slot 3) must not match another task's mask.
    wrong = masked_linear_reference(x[5:22], w_q, scale, masks[1], bias)
    assert (y[5:22] - wrong).abs().max() > 1e-2


def test_segmented_complement_accepts_python_lists():
    w_q, scale, bias, masks = masked_problem(32, 64, 0.2, slots=2)
    weight = sc.dequantize_weight(w_q, scale, torch.float32)
    pruned = [sc.pruned_csr(weight, pack_bits(m)) for m in masks]
    x = torch.randn(6, 64)
    y = sc.segmented_complement_linear(x, weight, bias, pruned, [0, 2, 6], [1, 0])
    ref = segmented_masked_linear_reference(x, w_q, scale, masks, torch.tensor([0, 2, 6]), torch.tensor([1, 0]), bias)
    _assert_close(y, ref)


def test_segmented_complement_validates_metadata():
    w_q, scale, bias, masks = masked_problem(16, 32, 0.2, slots=2)
    weight = sc.dequantize_weight(w_q, scale, torch.float32)
    pruned = [sc.pruned_csr(weight, pack_bits(m)) for m in masks]
    x = torch.randn(6, 32)
    with pytest.raises(ValueError, match="num_segments"):
        sc.segmented_complement_linear(x, weight, bias, pruned, [0, 6], [0, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        sc.segmented_complement_linear(x, weight, bias, pruned, [0, 4, 2], [0, 1])
    with pytest.raises(ValueError, match="slot 5"):
        sc.segmented_complement_linear(x, weight, bias, pruned, [0, 6], [5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (float16 sparse products)")
@pytest.mark.parametrize("shape", SHAPES)
def test_segmented_complement_cuda_fp16(shape):
    out, in_ = shape
    w_q, scale, bias, masks = masked_problem(out, in_, 0.13, slots=4)
    weight = sc.dequantize_weight(w_q.cuda(), scale.cuda(), torch.float16)
    pruned = [sc.pruned_csr(weight, pack_bits(m).cuda()) for m in masks]
    seg_starts, seg_slots = [0, 50, 50, 300, 301], [3, 1, 0, 2]
    x = torch.randn(301, in_).to(torch.float16)
    y = sc.segmented_complement_linear(x.cuda(), weight, bias.cuda(), pruned, seg_starts, seg_slots)
    ref = segmented_masked_linear_reference(x, w_q, scale, masks, torch.tensor(seg_starts), torch.tensor(seg_slots),
                                            bias)
    # fp16 weights and an fp16 subtraction: a few fp16 ulps of the unmasked output.
    _assert_close(y, ref, rtol=1e-2)


def test_complement_unsupported_probe():
    assert sc.complement_unsupported("cpu", torch.float32) is None
    if torch.cuda.is_available():  # report, do not assume: cuSPARSE float16 support varies by release
        print("cuda float16:", sc.complement_unsupported("cuda", torch.float16))
    else:  # CPU sparse products have no float16: the probe says why instead of raising
        reason = sc.complement_unsupported("cpu", torch.float16)
        assert reason is not None and "Half" in reason
